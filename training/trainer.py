"""The training loop: Keras `fit`/`evaluate` around an explicit all-reduce train step.

`fit` is driven in *loops* of `log_every_steps` steps (Keras "epochs"): each loop logs a
progress line and TensorBoard scalars, and every `checkpoint_every_steps` the state is
saved. A run restarted with the same model directory restores the latest checkpoint,
positions the input stream where the interrupted run left it, and carries on, so a crash
loses at most the steps since the last checkpoint.
"""

import dataclasses
import functools
import os
from typing import Callable, Optional, Union

import tensorflow as tf
import tf_keras
from absl import logging

from training import checkpoints as checkpoints_lib
from training import model as model_lib
from training import optimizer as optimizer_lib
from training import progress
from training import strategy as strategy_lib

# Re-exported: callers catch it from the trainer that raises it.
TrainingDiverged = model_lib.TrainingDiverged

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


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What is trained and how: the optimizer, its schedule and the numerics.

  `learning_rate` is a float or a schedule of the step. `ema_decay` > 0 keeps a moving
  average of the weights for the final evaluation (evaluations during training use the
  live weights). `precision` is "float32", "mixed_bfloat16" or "mixed_float16".
  """
  num_classes: int
  learning_rate: Union[float, Callable]
  optimizer_name: str = "sgd"
  momentum: float = 0.9
  weight_decay: float = 0.0
  label_smoothing: float = 0.0
  ema_decay: float = 0.0
  precision: str = "float32"
  jit_compile: bool = False


@dataclasses.dataclass(frozen=True)
class Cadence:
  """The run's length and rhythm, in steps; batches are global (over all replicas)."""
  total_steps: int
  global_batch_size: int
  eval_batch_size: int
  steps_per_execution: int = 1
  log_every_steps: int = 10
  checkpoint_every_steps: int = 100
  eval_every_steps: Optional[int] = None


class Trainer:
  """Owns the model, optimizer and checkpoints of one run under one strategy.

  Args:
    strategy: the distribution strategy (see training/strategy.py).
    model_dir: where checkpoints, summaries and the run summary go.
    build_backbone: () -> tf_keras.Model of logits, called under the strategy's scope.
    data: the data source.
    recipe: the optimizer, schedule and numerics.
    cadence: run length, batch sizes and loop cadence.
    gradient_aggregator: sums gradients over replicas inside the optimizer; None keeps
      the strategy's own all-reduce.
    checkpoint_settings: {flag: value} of the settings that shape the checkpoint
      (depth, width, classes, optimizer, ...); a model dir whose checkpoints were
      written with other values is refused, naming the flag.
  """

  def __init__(self, *, strategy, model_dir, build_backbone, data: DataSource,
               recipe: Recipe, cadence: Cadence, gradient_aggregator=None,
               checkpoint_settings=None):
    self.strategy = strategy
    self.model_dir = model_dir
    self.data = data
    self.recipe = recipe
    self.cadence = cadence
    self.total_steps = cadence.total_steps
    self.is_chief = strategy_lib.is_chief(strategy)
    self.checkpoint_settings = dict(checkpoint_settings or {})

    tf_keras.mixed_precision.set_global_policy(recipe.precision)
    with strategy.scope():
      backbone = build_backbone()
      # LARS decays weights itself; SGD gets the L2 term in the loss.
      l2 = recipe.weight_decay if recipe.optimizer_name == "sgd" else 0.0
      self.model = model_lib.ImageClassifier(
          backbone, global_batch_size=cadence.global_batch_size,
          num_classes=recipe.num_classes, label_smoothing=recipe.label_smoothing,
          l2_weight_decay=l2, ema_decay=recipe.ema_decay)
      optimizer = optimizer_lib.build_optimizer(
          recipe.optimizer_name, recipe.learning_rate, momentum=recipe.momentum,
          weight_decay=recipe.weight_decay, gradient_aggregator=gradient_aggregator)
      if recipe.precision == "mixed_float16":
        optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
      self.model.compile(optimizer=optimizer,
                         steps_per_execution=cadence.steps_per_execution,
                         jit_compile=recipe.jit_compile)
      self.optimizer = optimizer
      # Slots and the step counter exist before any restore, so that a restore fills
      # every variable at once and a checkpoint that does not fit fails there, not
      # at the first step. (`_create_all_weights` is what `apply_gradients` itself
      # calls; legacy optimizers have no public equivalent.)
      self.optimizer._create_all_weights(self.model.trainable_variables)  # pylint: disable=protected-access
      self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=optimizer)
    self.checkpoint_dir = os.path.join(model_dir, "checkpoints")
    # Every worker saves (saving may need collectives); only the chief's copy is kept
    # in checkpoints/, the others' in a folder of their own under the model dir.
    own_dir = self.checkpoint_dir if self.is_chief else os.path.join(
        strategy_lib.worker_scratch_dir(strategy, model_dir), "checkpoints")
    self.checkpoint_manager = tf.train.CheckpointManager(
        self.checkpoint, own_dir, max_to_keep=3)

  @property
  def step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def restore(self) -> int:
    """Restores the newest readable checkpoint in the model dir, if any; returns the
    step. Raises CheckpointMismatch when the model dir belongs to another model."""
    checkpoints_lib.check_checkpoint_config(self.checkpoint_dir, self.model_dir,
                                            self.checkpoint_settings)
    with self.strategy.scope():
      path = checkpoints_lib.restore_latest_readable(
          self.checkpoint, self.checkpoint_dir, self.model_dir)
    if path:
      logging.info("Resumed from %s at step %d.", path, self.step)
    return self.step

  def check_finite(self):
    """Raises TrainingDiverged if a step's loss was NaN or infinite."""
    step = self.model.divergence.step()
    if step < 0:
      return
    hint = (f"lower --base_learning_rate or lengthen --warmup_epochs")
    if self.recipe.precision == "mixed_float16":
      hint += (", or use --precision=mixed_bfloat16 or float32 (float16 overflowed "
               "despite loss scaling)")
    raise model_lib.TrainingDiverged(step, hint)

  def save_checkpoint(self, step):
    """Saves the state at `step` unless anything diverged (then raises instead)."""
    self.check_finite()
    if not checkpoints_lib.all_finite(self.checkpoint_variables()):
      raise model_lib.TrainingDiverged(step, "a weight is NaN or infinite although the loss was "
                             "finite; lower --base_learning_rate")
    if self.is_chief:
      checkpoints_lib.write_checkpoint_config(self.checkpoint_dir,
                                              self.checkpoint_settings)
    self.checkpoint_manager.save(checkpoint_number=step)

  def checkpoint_variables(self):
    """The weights and optimizer slots. Batch-norm statistics are left out: reading
    them takes a collective per variable, and they go non-finite only through the
    activations, which the loss watch already catches."""
    return self.model.trainable_variables + self.optimizer.variables()

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
    segments, step, loop = [], start_step, self.cadence.log_every_steps
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

    SIGTERM (preemption) makes every worker save at the same finished step, then
    raises `checkpoints.Preempted`; a loss that turns NaN or infinite raises
    `TrainingDiverged` at the end of its loop, before anything is saved. In a
    single-worker run Ctrl-C also saves the last finished step. In every case a
    rerun of the same command resumes exactly.

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
    single_worker = strategy_lib.is_single_client(self.strategy)
    preemption = checkpoints_lib.PreemptionWatch(
        self.strategy, self.checkpoint_manager.directory, self.save_checkpoint,
        lambda: self.step, single_client=single_worker)
    loop_callback = progress.LoopCallback(
        self.cadence, self.recipe.learning_rate, summary_writer=writer,
        save_checkpoint=self.save_checkpoint, check_finite=self.check_finite,
        preemption=preemption)
    logging.info("Training from step %d to %d: %d images per step over %d replicas.",
                 start_step, self.total_steps, self.cadence.global_batch_size,
                 self.strategy.num_replicas_in_sync)
    try:
      for steps_per_loop, num_loops in self._loop_segments(start_step):
        fit_kwargs = {}
        first_step = self.step
        # Evaluate on multiples of eval_every_steps, but not at the last step: the
        # final evaluation follows training.
        every = self.cadence.eval_every_steps
        loop_ends = [first_step + i * steps_per_loop for i in range(1, num_loops + 1)]
        eval_loops = [i + 1 for i, end in enumerate(loop_ends)
                      if with_eval and every and end < self.total_steps and end % every == 0]
        if eval_loops:
          fit_kwargs = dict(validation_data=self._eval_input(),
                            validation_steps=self.eval_steps, validation_freq=eval_loops)
        self.model.fit(self._train_input(first_step), epochs=num_loops,
                       steps_per_epoch=steps_per_loop, callbacks=[loop_callback],
                       verbose=0, **fit_kwargs)
    except KeyboardInterrupt:
      # Alone, this process may save by itself; a worker of several must not (the
      # others would never join its collectives).
      if single_worker:
        logging.warning("Interrupted at step %d: saving a checkpoint to resume from.",
                        self.step)
        self.save_checkpoint(self.step)
      raise
    finally:
      writer.close()
    return loop_callback.loops

  def evaluate(self):
    """Top-1/top-5 and loss on the evaluation set, with the weight average if kept."""
    model_lib.average_replica_statistics(self.model)
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
    """<model_dir>/summary.json, from the chief (see progress.write_run_summary)."""
    if self.is_chief:
      progress.write_run_summary(self.model_dir, self.step, final_results, loops,
                                 config_dict)
