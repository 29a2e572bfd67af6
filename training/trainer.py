"""The training loop: Keras `fit`/`evaluate` around an explicit all-reduce train step.

`fit` is driven in *loops* of `log_every_steps` steps (Keras "epochs"): each loop logs a
progress line and TensorBoard scalars, and every `checkpoint_every_steps` the state is
saved. A run restarted with the same model directory restores the latest checkpoint,
positions the input stream where the interrupted run left it, and carries on, so a crash
loses at most the steps since the last checkpoint.
"""

import dataclasses
import json
import os
import tempfile
import time
from typing import Callable, Optional

import tensorflow as tf
import tf_keras
from absl import logging

from training import optimizer as optimizer_lib
from training import strategy as strategy_lib

# Builds one input pipeline's dataset: (input_context, start_step) -> dataset of
# per-replica batches. start_step > 0 asks for the stream an uninterrupted run would be
# reading at that step.
TrainDatasetFn = Callable[[tf.distribute.InputContext, int], tf.data.Dataset]
EvalDatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


@dataclasses.dataclass(frozen=True)
class DataSource:
  """What the trainer needs to know about the data, and nothing about files."""
  make_train_dataset: TrainDatasetFn
  make_eval_dataset: EvalDatasetFn
  num_train_examples: int
  num_eval_examples: int
  input_options: Optional[tf.distribute.InputOptions] = None


class ImageClassifier(tf_keras.Model):
  """A backbone plus the train step: loss, gradients, one explicit aggregation.

  The loss on each replica is its examples' loss divided by the *global* batch, so the
  sum over replicas that the optimizer's gradient aggregator performs is the gradient
  of the global mean; nothing else averages (a doubled sum is the classic bug).
  """

  def __init__(self, backbone, *, global_batch_size, num_classes, label_smoothing=0.0,
               l2_weight_decay=0.0, **kwargs):
    super().__init__(**kwargs)
    self.backbone = backbone
    self.global_batch_size = global_batch_size
    self.num_classes = num_classes
    self.label_smoothing = label_smoothing
    self.l2_weight_decay = l2_weight_decay
    self.loss_tracker = tf_keras.metrics.Mean(name="loss")
    self.top1 = tf_keras.metrics.SparseCategoricalAccuracy(name="top1")
    self.top5 = tf_keras.metrics.SparseTopKCategoricalAccuracy(
        k=min(5, num_classes), name="top5")

  @property
  def metrics(self):
    return [self.loss_tracker, self.top1, self.top5]

  def call(self, images, training=False):
    return self.backbone(images, training=training)

  def per_example_loss(self, labels, logits):
    """Softmax cross-entropy against labels smoothed towards uniform."""
    targets = tf.one_hot(labels, self.num_classes)
    if self.label_smoothing:
      targets = (targets * (1.0 - self.label_smoothing)
                 + self.label_smoothing / self.num_classes)
    return tf.nn.softmax_cross_entropy_with_logits(targets, tf.cast(logits, tf.float32))

  def _update_metrics(self, labels, logits, per_example_loss):
    self.loss_tracker.update_state(tf.reduce_mean(per_example_loss))
    self.top1.update_state(labels, logits)
    self.top5.update_state(labels, logits)
    return {m.name: m.result() for m in self.metrics}

  def train_step(self, data):
    images, labels = data
    variables = self.trainable_variables
    with tf.GradientTape() as tape:
      logits = self(images, training=True)
      per_example_loss = self.per_example_loss(labels, logits)
      loss = tf.nn.compute_average_loss(
          per_example_loss, global_batch_size=self.global_batch_size)
      if self.l2_weight_decay:
        loss += tf.nn.scale_regularization_loss(
            optimizer_lib.l2_penalty(variables, self.l2_weight_decay))
      if isinstance(self.optimizer, tf_keras.mixed_precision.LossScaleOptimizer):
        loss = self.optimizer.get_scaled_loss(loss)
    gradients = tape.gradient(loss, variables)
    if isinstance(self.optimizer, tf_keras.mixed_precision.LossScaleOptimizer):
      gradients = self.optimizer.get_unscaled_gradients(gradients)
    # The optimizer's gradient_aggregator sums over replicas (torus or strategy).
    self.optimizer.apply_gradients(zip(gradients, variables))
    return self._update_metrics(labels, logits, per_example_loss)

  def test_step(self, data):
    images, labels = data
    logits = self(images, training=False)
    return self._update_metrics(labels, logits, self.per_example_loss(labels, logits))


class _LoopCallback(tf_keras.callbacks.Callback):
  """Per loop: progress line, TensorBoard scalars, checkpoint, stop at the last step."""

  def __init__(self, *, total_steps, global_batch_size, checkpoint_manager,
               checkpoint_every_steps, learning_rate, summary_writer):
    super().__init__()
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.checkpoint_manager = checkpoint_manager
    self.checkpoint_every_steps = checkpoint_every_steps
    self.learning_rate = learning_rate
    self.summary_writer = summary_writer

  def _step(self):
    return int(self.model.optimizer.iterations.numpy())

  def on_epoch_begin(self, epoch, logs=None):
    self._loop_start_time = time.time()
    self._loop_start_step = self._step()

  def on_train_batch_end(self, batch, logs=None):
    if self._step() >= self.total_steps:
      self.model.stop_training = True

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    step = self._step()
    seconds = max(time.time() - self._loop_start_time, 1e-9)
    steps = step - self._loop_start_step
    images_per_second = steps * self.global_batch_size / seconds
    learning_rate = float(self.learning_rate(step)) if callable(
        self.learning_rate) else float(self.learning_rate)
    logging.info(
        "step %d/%d  loss %.4f  top1 %.4f  top5 %.4f  lr %.5f  %.1f images/s  "
        "%.3f s/step%s", step, self.total_steps, logs.get("loss", float("nan")),
        logs.get("top1", float("nan")), logs.get("top5", float("nan")), learning_rate,
        images_per_second, seconds / max(steps, 1),
        "  | eval top1 %.4f" % logs["val_top1"] if "val_top1" in logs else "")
    with self.summary_writer.as_default(step=step):
      for name in ("loss", "top1", "top5"):
        if name in logs:
          tf.summary.scalar(f"train/{name}", logs[name])
        if "val_" + name in logs:
          tf.summary.scalar(f"eval/{name}", logs["val_" + name])
      tf.summary.scalar("train/learning_rate", learning_rate)
      tf.summary.scalar("train/images_per_second", images_per_second)
    self.summary_writer.flush()
    if step % self.checkpoint_every_steps == 0 or step >= self.total_steps:
      self.checkpoint_manager.save(checkpoint_number=step)


class Trainer:
  """Owns the model, optimizer and checkpoints of one run under one strategy.

  Args:
    strategy: the distribution strategy (see training/strategy.py).
    model_dir: where checkpoints, summaries and the run summary go.
    build_backbone: () -> tf_keras.Model of logits, called under the strategy's scope.
    data: the data source.
    total_steps, global_batch_size, eval_batch_size: run shape (batches are global).
    learning_rate: a float or a schedule of the step.
    optimizer_name, momentum, weight_decay, label_smoothing: the recipe.
    gradient_aggregator: sums gradients over replicas inside the optimizer; None keeps
      the strategy's own all-reduce.
    precision: "float32", "mixed_bfloat16" or "mixed_float16".
    steps_per_execution, log_every_steps, checkpoint_every_steps, eval_every_steps:
      loop cadence, in steps.
  """

  def __init__(self, *, strategy, model_dir, build_backbone, data: DataSource,
               total_steps, global_batch_size, eval_batch_size, num_classes,
               learning_rate, optimizer_name="sgd", momentum=0.9, weight_decay=0.0,
               label_smoothing=0.0, gradient_aggregator=None, precision="float32",
               steps_per_execution=1, log_every_steps=10, checkpoint_every_steps=100,
               eval_every_steps=None):
    self.strategy = strategy
    self.model_dir = model_dir
    self.data = data
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.eval_batch_size = eval_batch_size
    self.log_every_steps = log_every_steps
    self.checkpoint_every_steps = checkpoint_every_steps
    self.eval_every_steps = eval_every_steps
    self.learning_rate = learning_rate
    self.is_chief = strategy_lib.is_chief(strategy)

    tf_keras.mixed_precision.set_global_policy(precision)
    with strategy.scope():
      backbone = build_backbone()
      # LARS decays weights itself; SGD gets the L2 term in the loss.
      l2 = weight_decay if optimizer_name == "sgd" else 0.0
      self.model = ImageClassifier(
          backbone, global_batch_size=global_batch_size, num_classes=num_classes,
          label_smoothing=label_smoothing, l2_weight_decay=l2)
      optimizer = optimizer_lib.build_optimizer(
          optimizer_name, learning_rate, momentum=momentum, weight_decay=weight_decay,
          gradient_aggregator=gradient_aggregator)
      if precision == "mixed_float16":
        optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
      self.model.compile(optimizer=optimizer, steps_per_execution=steps_per_execution)
      self.optimizer = optimizer
      # Creates the step counter now so a restore can fill it before training.
      self.optimizer.iterations  # pylint: disable=pointless-statement
      self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=optimizer)
    # Every worker saves (saving may need collectives); only the chief's copy is kept.
    checkpoint_dir = os.path.join(model_dir, "checkpoints")
    if not self.is_chief:
      checkpoint_dir = tempfile.mkdtemp(prefix="worker_checkpoints_")
    self.checkpoint_manager = tf.train.CheckpointManager(
        self.checkpoint, checkpoint_dir, max_to_keep=3)

  @property
  def step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def restore(self) -> int:
    """Restores the latest checkpoint in the model dir, if any; returns the step."""
    latest = tf.train.latest_checkpoint(os.path.join(self.model_dir, "checkpoints"))
    if latest:
      with self.strategy.scope():
        self.checkpoint.restore(latest).expect_partial()
      logging.info("Resumed from %s at step %d.", latest, self.step)
    return self.step

  def _train_input(self, start_step):
    def dataset_fn(input_context):
      return self.data.make_train_dataset(input_context, start_step)
    return tf_keras.utils.experimental.DatasetCreator(
        dataset_fn, input_options=self.data.input_options)

  def _eval_input(self):
    return tf_keras.utils.experimental.DatasetCreator(
        self.data.make_eval_dataset, input_options=self.data.input_options)

  @property
  def eval_steps(self) -> int:
    # The eval pipeline drops the last partial batch; see README ("Evaluation").
    return max(self.data.num_eval_examples // self.eval_batch_size, 1)

  def train(self, with_eval=False):
    """Trains to `total_steps` from wherever the model dir says.

    Returns:
      The Keras history of this call: each metric's value per loop ({} if the model
      dir already holds a finished run).
    """
    start_step = self.restore()
    if start_step >= self.total_steps:
      logging.info("Already trained to step %d; nothing to do.", start_step)
      return {}
    summary_dir = os.path.join(self.model_dir, "summaries", "train")
    writer = (tf.summary.create_file_writer(summary_dir) if self.is_chief
              else tf.summary.create_noop_writer())
    loop_callback = _LoopCallback(
        total_steps=self.total_steps, global_batch_size=self.global_batch_size,
        checkpoint_manager=self.checkpoint_manager,
        checkpoint_every_steps=self.checkpoint_every_steps,
        learning_rate=self.learning_rate, summary_writer=writer)
    num_loops = -(-self.total_steps // self.log_every_steps)
    fit_kwargs = {}
    if with_eval and self.eval_every_steps:
      fit_kwargs = dict(validation_data=self._eval_input(),
                        validation_steps=self.eval_steps,
                        validation_freq=self.eval_every_steps // self.log_every_steps)
    logging.info("Training from step %d to %d: %d images per step over %d replicas.",
                 start_step, self.total_steps, self.global_batch_size,
                 self.strategy.num_replicas_in_sync)
    history = self.model.fit(
        self._train_input(start_step), initial_epoch=start_step // self.log_every_steps,
        epochs=num_loops, steps_per_epoch=self.log_every_steps,
        callbacks=[loop_callback], verbose=0, **fit_kwargs)
    return history.history

  def evaluate(self):
    """Top-1/top-5 and loss of the current weights on the evaluation set."""
    results = self.model.evaluate(self._eval_input(), steps=self.eval_steps,
                                  verbose=0, return_dict=True)
    results = {k: float(v) for k, v in results.items()}
    logging.info("eval at step %d: top1 %.4f  top5 %.4f  loss %.4f  (%d images)",
                 self.step, results["top1"], results["top5"], results["loss"],
                 self.eval_steps * self.eval_batch_size)
    if self.is_chief:
      writer = tf.summary.create_file_writer(
          os.path.join(self.model_dir, "summaries", "eval"))
      with writer.as_default(step=self.step):
        for name, value in results.items():
          tf.summary.scalar(f"eval/{name}", value)
      writer.close()
    return results

  def write_summary(self, results, config_dict=None):
    """Writes the final results (and the run's configuration) as JSON."""
    if not self.is_chief:
      return
    path = os.path.join(self.model_dir, "summary.json")
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump({"step": self.step, "eval": results, "config": config_dict}, f,
                indent=2, default=str)
