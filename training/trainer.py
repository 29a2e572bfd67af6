"""The training loop: Keras `fit`/`evaluate` around an explicit all-reduce train step.

`fit` is driven in *loops* of `log_every_steps` steps (Keras "epochs"): each loop logs a
progress line and TensorBoard scalars, and every `checkpoint_every_steps` the state is
saved. A run restarted with the same model directory restores the latest checkpoint,
positions the input stream where the interrupted run left it, and carries on, so a crash
loses at most the steps since the last checkpoint.
"""

import dataclasses
import functools
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
# Builds one input pipeline's evaluation dataset: exactly eval_steps(input_context) *
# (replicas per pipeline) per-replica batches of (images, labels) or, padded to full
# batches, (images, labels, weights) with weight 0 for padding.
EvalDatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]
# The number of evaluation steps, the same whichever pipeline's context it is given.
EvalStepsFn = Callable[[tf.distribute.InputContext], int]


@dataclasses.dataclass(frozen=True)
class DataSource:
  """What the trainer needs to know about the data, and nothing about files."""
  make_train_dataset: TrainDatasetFn
  make_eval_dataset: EvalDatasetFn
  num_train_examples: int
  num_eval_examples: int
  eval_steps: EvalStepsFn
  input_options: Optional[tf.distribute.InputOptions] = None


class WeightAverage(tf.Module):
  """An exponential moving average of variables, for evaluation.

  The decay ramps up as min(decay, (1 + t) / (10 + t)) so early averages are not
  dominated by the random initialisation. Every replica holds the same weights, so the
  first replica's update is the one kept.
  """

  def __init__(self, variables, decay):
    super().__init__(name="weight_average")
    self.decay = decay
    self.variables_to_average = list(variables)
    self.num_updates = tf.Variable(0, trainable=False, dtype=tf.int64,
                                   aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    self.averages = [
        tf.Variable(v.read_value(), trainable=False, name=v.name.split(":")[0] + "_ema",
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        for v in self.variables_to_average]

  def update(self):
    t = tf.cast(self.num_updates.assign_add(1), tf.float32)
    decay = tf.minimum(self.decay, (1.0 + t) / (10.0 + t))
    for average, variable in zip(self.averages, self.variables_to_average):
      average.assign(decay * average + (1.0 - decay) * tf.cast(variable, average.dtype))

  def swap(self):
    """Exchanges the live weights and their averages (call twice to undo)."""
    for average, variable in zip(self.averages, self.variables_to_average):
      live = tf.identity(variable.read_value())
      variable.assign(average.read_value())
      average.assign(live)


class ImageClassifier(tf_keras.Model):
  """A backbone plus the train step: loss, gradients, one explicit aggregation.

  The loss on each replica is its examples' loss divided by the *global* batch, so the
  sum over replicas that the optimizer's gradient aggregator performs is the gradient
  of the global mean; nothing else averages (a doubled sum is the classic bug).

  Evaluation batches may carry per-example weights (padding to full batches has weight
  0); loss, top-1 and top-5 are then weighted means and "images" counts the real ones.
  """

  def __init__(self, backbone, *, global_batch_size, num_classes, label_smoothing=0.0,
               l2_weight_decay=0.0, ema_decay=0.0, **kwargs):
    super().__init__(**kwargs)
    self.backbone = backbone
    self.weight_average = (WeightAverage(backbone.trainable_variables, ema_decay)
                           if ema_decay else None)
    self.global_batch_size = global_batch_size
    self.num_classes = num_classes
    self.label_smoothing = label_smoothing
    self.l2_weight_decay = l2_weight_decay
    self.loss_tracker = tf_keras.metrics.Mean(name="loss")
    self.top1 = tf_keras.metrics.SparseCategoricalAccuracy(name="top1")
    self.top5 = tf_keras.metrics.SparseTopKCategoricalAccuracy(
        k=min(5, num_classes), name="top5")
    self.image_count = tf_keras.metrics.Sum(name="images")

  @property
  def metrics(self):
    # Keras takes a loop's logs from these metrics (summed over replicas) only when the
    # step returns exactly their names, so every step, training too, updates all four.
    return [self.loss_tracker, self.top1, self.top5, self.image_count]

  def call(self, images, training=False):
    return self.backbone(images, training=training)

  def per_example_loss(self, labels, logits):
    """Softmax cross-entropy against labels smoothed towards uniform."""
    targets = tf.one_hot(labels, self.num_classes)
    if self.label_smoothing:
      targets = (targets * (1.0 - self.label_smoothing)
                 + self.label_smoothing / self.num_classes)
    return tf.nn.softmax_cross_entropy_with_logits(targets, tf.cast(logits, tf.float32))

  def _update_metrics(self, labels, logits, per_example_loss, weights=None):
    """Means over examples, weighted if `weights` are given; returns every metric."""
    if weights is None:
      weights = tf.ones_like(per_example_loss)
    self.loss_tracker.update_state(per_example_loss, sample_weight=weights)
    self.top1.update_state(labels, logits, sample_weight=weights)
    self.top5.update_state(labels, logits, sample_weight=weights)
    self.image_count.update_state(tf.reduce_sum(weights))
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
    if self.weight_average is not None:
      self.weight_average.update()
    return self._update_metrics(labels, logits, per_example_loss)

  def test_step(self, data):
    images, labels, weights = tf_keras.utils.unpack_x_y_sample_weight(data)
    logits = self(images, training=False)
    return self._update_metrics(labels, logits, self.per_example_loss(labels, logits),
                                weights)


def average_replica_statistics(model):
  """Sets every replica's batch-norm moving statistics to their mean over replicas.

  With grouped batch norm each group keeps its own moving statistics (they are per
  replica, ON_READ variables). Evaluating with them would make a result depend on which
  replica saw which batch, and would differ from a run restored from a checkpoint
  (which stores the mean). Moving averages are linear, so replacing each with the mean
  of all changes nothing in expectation for training that follows.
  """
  for variable in model.non_trainable_variables:
    if (variable.synchronization == tf.VariableSynchronization.ON_READ
        and variable.aggregation == tf.VariableAggregation.MEAN):
      variable.assign(variable.read_value())


class _LoopCallback(tf_keras.callbacks.Callback):
  """Per loop: progress line, TensorBoard scalars, checkpoint; records evaluations."""

  def __init__(self, *, total_steps, global_batch_size, checkpoint_manager,
               checkpoint_every_steps, learning_rate, summary_writer):
    super().__init__()
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.checkpoint_manager = checkpoint_manager
    self.checkpoint_every_steps = checkpoint_every_steps
    self.learning_rate = learning_rate
    self.summary_writer = summary_writer
    self.loops = []  # per loop: step, metrics, throughput (see Trainer.train)

  def _step(self):
    return int(self.model.optimizer.iterations.numpy())

  def on_test_begin(self, logs=None):
    average_replica_statistics(self.model)

  def on_epoch_begin(self, epoch, logs=None):
    self._loop_start_time = time.time()
    self._loop_start_step = self._step()

  def on_epoch_end(self, epoch, logs=None):
    logs = logs or {}
    step = self._step()
    seconds = max(time.time() - self._loop_start_time, 1e-9)
    steps = step - self._loop_start_step
    images_per_second = steps * self.global_batch_size / seconds
    seconds_per_step = seconds / max(steps, 1)
    learning_rate = float(self.learning_rate(step)) if callable(
        self.learning_rate) else float(self.learning_rate)
    logging.info(
        "step %d/%d  loss %.4f  top1 %.4f  top5 %.4f  lr %.5f  %.1f images/s  "
        "%.3f s/step%s", step, self.total_steps, logs.get("loss", float("nan")),
        logs.get("top1", float("nan")), logs.get("top5", float("nan")), learning_rate,
        images_per_second, seconds_per_step,
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
    self.loops.append(dict({k: float(v) for k, v in logs.items()}, step=step,
                           images_per_second=images_per_second,
                           seconds_per_step=seconds_per_step))
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
    ema_decay: keep a moving average of the weights and evaluate with it (0: off).
      Evaluations during training use the live weights; `evaluate` the average.
    gradient_aggregator: sums gradients over replicas inside the optimizer; None keeps
      the strategy's own all-reduce.
    precision: "float32", "mixed_bfloat16" or "mixed_float16".
    steps_per_execution, log_every_steps, checkpoint_every_steps, eval_every_steps:
      loop cadence, in steps.
  """

  def __init__(self, *, strategy, model_dir, build_backbone, data: DataSource,
               total_steps, global_batch_size, eval_batch_size, num_classes,
               learning_rate, optimizer_name="sgd", momentum=0.9, weight_decay=0.0,
               label_smoothing=0.0, ema_decay=0.0, gradient_aggregator=None,
               precision="float32",
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
          label_smoothing=label_smoothing, l2_weight_decay=l2, ema_decay=ema_decay)
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

  @functools.cached_property
  def eval_steps(self) -> int:
    """Steps that cover the whole evaluation set (padded; see README "Evaluation")."""
    return self.data.eval_steps(
        strategy_lib.input_context(self.strategy, self.data.input_options))

  def _loop_segments(self, start_step):
    """Splits start_step..total_steps into `fit` calls of equal loops.

    Keras needs one loop length per `fit` call. Loops end on multiples of
    `log_every_steps` (so logs, checkpoints and evaluations land on round steps): a run
    resumed off that grid first runs a short loop up to it, and a total that is not a
    multiple of it ends with a short loop.

    Returns:
      [(steps per loop, number of loops), ...].
    """
    segments, step, loop = [], start_step, self.log_every_steps
    head = min(-step % loop, self.total_steps - step)
    if head:
      segments.append((head, 1))
      step += head
    if (self.total_steps - step) // loop:
      segments.append((loop, (self.total_steps - step) // loop))
      step += segments[-1][1] * loop
    if self.total_steps > step:
      segments.append((self.total_steps - step, 1))
    return segments

  def train(self, with_eval=False):
    """Trains to `total_steps` from wherever the model dir says.

    An interruption (Ctrl-C, or SIGTERM, which main.py turns into one) saves a
    checkpoint at the last finished step before it propagates, so a preempted run
    loses nothing and resumes exactly.

    Returns:
      One dict per loop run by this call: "step", the loop's mean "loss", "top1",
      "top5", its "images_per_second" and "seconds_per_step", and "val_top1" etc.
      where it ended with an evaluation ([] if the model dir already holds a finished
      run).
    """
    start_step = self.restore()
    if start_step >= self.total_steps:
      logging.info("Already trained to step %d; nothing to do.", start_step)
      return []
    summary_dir = os.path.join(self.model_dir, "summaries", "train")
    writer = (tf.summary.create_file_writer(summary_dir) if self.is_chief
              else tf.summary.create_noop_writer())
    loop_callback = _LoopCallback(
        total_steps=self.total_steps, global_batch_size=self.global_batch_size,
        checkpoint_manager=self.checkpoint_manager,
        checkpoint_every_steps=self.checkpoint_every_steps,
        learning_rate=self.learning_rate, summary_writer=writer)
    logging.info("Training from step %d to %d: %d images per step over %d replicas.",
                 start_step, self.total_steps, self.global_batch_size,
                 self.strategy.num_replicas_in_sync)
    try:
      for steps_per_loop, num_loops in self._loop_segments(start_step):
        fit_kwargs = {}
        first_step = self.step
        # Evaluate on multiples of eval_every_steps, but not at the last step: the
        # final evaluation follows training.
        loop_ends = [first_step + i * steps_per_loop for i in range(1, num_loops + 1)]
        eval_loops = [i + 1 for i, end in enumerate(loop_ends)
                      if with_eval and self.eval_every_steps and end < self.total_steps
                      and end % self.eval_every_steps == 0]
        if eval_loops:
          fit_kwargs = dict(validation_data=self._eval_input(),
                            validation_steps=self.eval_steps, validation_freq=eval_loops)
        self.model.fit(self._train_input(first_step), epochs=num_loops,
                       steps_per_epoch=steps_per_loop, callbacks=[loop_callback],
                       verbose=0, **fit_kwargs)
    except KeyboardInterrupt:
      logging.warning("Interrupted at step %d: saving a checkpoint to resume from.",
                      self.step)
      self.checkpoint_manager.save(checkpoint_number=self.step)
      raise
    return loop_callback.loops

  def evaluate(self):
    """Top-1/top-5 and loss on the evaluation set, with the weight average if kept."""
    average_replica_statistics(self.model)
    average = self.model.weight_average
    if average is not None:
      average.swap()
    try:
      results = self.model.evaluate(self._eval_input(), steps=self.eval_steps,
                                    verbose=0, return_dict=True)
    finally:
      if average is not None:
        average.swap()
    results = {k: float(v) for k, v in results.items()}
    logging.info("eval at step %d%s: top1 %.4f  top5 %.4f  loss %.4f  (%d images)",
                 self.step, " (weight average)" if average is not None else "",
                 results["top1"], results["top5"], results["loss"], results["images"])
    if int(results["images"]) != self.data.num_eval_examples:
      logging.warning(
          "Evaluated %d images, but the evaluation set has %d: undecodable images "
          "(logged above as skipped) are left out; otherwise dataset_info.json next to "
          "the shards is out of date (rewrite it with input_pipeline.write_tfrecords).",
          int(results["images"]), self.data.num_eval_examples)
    if self.is_chief:
      writer = tf.summary.create_file_writer(
          os.path.join(self.model_dir, "summaries", "eval"))
      with writer.as_default(step=self.step):
        for name, value in results.items():
          tf.summary.scalar(f"eval/{name}", value)
      writer.close()
    return results

  def write_summary(self, final_results, loops=(), config_dict=None):
    """Writes <model_dir>/summary.json: final and best top-1, every evaluation, config.

    `loops` are `train`'s per-loop records; their evaluations and the final one are
    the candidates for best.
    """
    if not self.is_chief:
      return
    evaluations = [{"step": loop["step"], "top1": loop["val_top1"]}
                   for loop in loops if "val_top1" in loop]
    if final_results:
      evaluations.append({"step": self.step, "top1": final_results["top1"]})
    best = max(evaluations, key=lambda e: e["top1"]) if evaluations else None
    summary = {
        "step": self.step,
        "final": final_results,
        "best_top1": best["top1"] if best else None,
        "best_step": best["step"] if best else None,
        "evaluations": evaluations,
        "config": config_dict,
    }
    logging.info("final top1 %s, best top1 %s at step %s",
                 final_results.get("top1") if final_results else None,
                 summary["best_top1"], summary["best_step"])
    path = os.path.join(self.model_dir, "summary.json")
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump(summary, f, indent=2, default=str)
