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

import tensorflow as tf
import tf_keras
from absl import logging

from training import checkpoints as checkpoints_lib
from training import evaluation
from training import model as model_lib
from training import optimizer as optimizer_lib
from training import progress
from training import sharded_optimizer
from training import strategy as strategy_lib
from training.specs import Cadence, DataSource, Recipe

# Re-exported: callers catch it from the trainer that raises it.
TrainingDiverged = model_lib.TrainingDiverged


class Trainer:
  """Owns the model, optimizer and checkpoints of one run under one strategy.

  Args:
    strategy: the distribution strategy (see training/strategy.py).
    model_dir: where checkpoints, summaries and the run summary go.
    build_backbone: () -> tf_keras.Model of logits, called under the strategy's scope.
    data: the data source.
    recipe: the optimizer, schedule and numerics.
    cadence: run length, batch sizes and loop cadence.
    gradient_aggregator, weight_update_sharding: how the optimizer sums and updates
      (see `optimizer.for_recipe`); both None: the strategy's own all-reduce, every
      replica updating every weight.
    checkpoint_settings: {flag: value} of the settings that shape the checkpoint
      (depth, width, classes, optimizer, ...); a model dir whose checkpoints were
      written with other values is refused, naming the flag.
  """

  def __init__(self, *, strategy, model_dir, build_backbone, data: DataSource,
               recipe: Recipe, cadence: Cadence, gradient_aggregator=None,
               weight_update_sharding=None, checkpoint_settings=None):
    self.strategy = strategy
    self.model_dir = model_dir
    self.data = data
    self.recipe = recipe
    self.cadence = cadence
    self.is_chief = strategy_lib.is_chief(strategy)

    tf_keras.mixed_precision.set_global_policy(recipe.precision)
    with strategy.scope():
      backbone = build_backbone()
      # LARS decays weights itself; SGD gets the L2 term in the loss.
      l2 = recipe.weight_decay if recipe.optimizer_name == "sgd" else 0.0
      self.model = model_lib.ImageClassifier(
          backbone, global_batch_size=cadence.global_batch_size,
          num_classes=recipe.num_classes, label_smoothing=recipe.label_smoothing,
          l2_weight_decay=l2, ema_decay=recipe.ema_decay)
      self.optimizer = optimizer_lib.for_recipe(recipe, gradient_aggregator,
                                                weight_update_sharding)
      self.model.compile(optimizer=self.optimizer,
                         steps_per_execution=cadence.steps_per_execution,
                         jit_compile=recipe.jit_compile)
      # Slots and the step counter exist before any restore, so that a restore fills
      # every variable at once and a checkpoint that does not fit fails there, not
      # at the first step. (`_create_all_weights` is what `apply_gradients` itself
      # calls; legacy optimizers have no public equivalent.)
      self.optimizer._create_all_weights(self.model.trainable_variables)  # pylint: disable=protected-access
      checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
    self.checkpoints = checkpoints_lib.RunCheckpoints(strategy, model_dir, checkpoint,
                                                      checkpoint_settings)
    # The sharded update keeps its slots in shards, and full-size only in checkpoints.
    inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
    self._sharded_update = (inner if isinstance(inner, sharded_optimizer.ShardedUpdate)
                            else None)

  @property
  def total_steps(self) -> int:
    return self.cadence.total_steps

  def extend_run(self, steps: int):
    """Moves the end of the run `steps` past the current step (the next `train()`
    call runs them: benchmarks time one call after another)."""
    self.cadence = dataclasses.replace(self.cadence, total_steps=self.step + steps)

  @property
  def step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def restore(self) -> int:
    """Restores the newest readable checkpoint in the model dir, if any; returns the
    step. Raises CheckpointMismatch when the model dir belongs to another model."""
    path = self.checkpoints.restore()
    if path:
      if self._sharded_update:
        self._sharded_update.shard_slots_after_restore()
      logging.info("Resumed from %s at step %d.", path, self.step)
    return self.step

  def check_finite(self):
    """Raises TrainingDiverged if a step's loss was NaN or infinite."""
    step = self.model.divergence.step()
    if step < 0:
      return
    hint = "lower --base_learning_rate or lengthen --warmup_epochs"
    if self.recipe.precision == "mixed_float16":
      hint += (", or use --precision=mixed_bfloat16 or float32 (float16 overflowed "
               "despite loss scaling)")
    raise model_lib.TrainingDiverged(step, hint)

  def save_checkpoint(self, step):
    """Saves the state at `step` unless anything diverged (then raises instead)."""
    self.check_finite()
    if self._sharded_update:
      self._sharded_update.gather_slots_for_checkpoint()
    # Batch-norm statistics are left out: reading them takes a collective per
    # variable, and they go non-finite only through the activations, which the loss
    # watch already catches.
    if not checkpoints_lib.all_finite(self.model.trainable_variables
                                      + self.optimizer.variables()):
      raise model_lib.TrainingDiverged(
          step, "a weight is NaN or infinite although the loss was finite; lower "
          "--base_learning_rate")
    self.checkpoints.save(step)

  @functools.cached_property
  def eval_steps(self) -> int:
    """Steps that cover the whole evaluation set (padded; see README "Evaluation")."""
    return self.data.eval_steps(
        strategy_lib.input_context(self.strategy, self.data.input_options))

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
    writer = (tf.summary.create_file_writer(
        os.path.join(self.model_dir, "summaries", "train")) if self.is_chief
              else tf.summary.create_noop_writer())
    single_worker = strategy_lib.is_single_client(self.strategy)
    preemption = checkpoints_lib.PreemptionWatch(
        self.strategy, self.checkpoints.manager.directory, self.save_checkpoint,
        lambda: self.step, single_client=single_worker)
    loop_callback = progress.LoopCallback(
        self.cadence, self.recipe.learning_rate, summary_writer=writer,
        save_checkpoint=self.save_checkpoint, check_finite=self.check_finite,
        preemption=preemption)
    logging.info("Training from step %d to %d: %d images per step over %d replicas.",
                 start_step, self.total_steps, self.cadence.global_batch_size,
                 self.strategy.num_replicas_in_sync)
    try:
      for segment in self.cadence.loop_segments(start_step):
        first_step = self.step
        eval_loops = (self.cadence.loops_ending_in_evaluation(first_step, segment)
                      if with_eval else [])
        fit_kwargs = {}
        if eval_loops:
          fit_kwargs = dict(validation_data=self.data.eval_input(),
                            validation_steps=self.eval_steps, validation_freq=eval_loops)
        self.model.fit(self.data.train_input(first_step), epochs=segment[1],
                       steps_per_epoch=segment[0], callbacks=[loop_callback],
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
    return evaluation.evaluate(
        self.model, self.data.eval_input(), self.eval_steps,
        num_eval_examples=self.data.num_eval_examples, step=self.step,
        summary_dir=(os.path.join(self.model_dir, "summaries", "eval")
                     if self.is_chief else None))

  def write_summary(self, final_results, loops=(), config_dict=None):
    """<model_dir>/summary.json, from the chief (see progress.write_run_summary)."""
    if self.is_chief:
      progress.write_run_summary(self.model_dir, self.step, final_results, loops,
                                 config_dict)
