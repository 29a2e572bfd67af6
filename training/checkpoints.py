"""Checkpoints a run can trust: matched to the model, finite, saved together on preemption.

* Saving: every worker saves (reading batch-norm statistics may need collectives); only
  the chief's copy lands in `<model_dir>/checkpoints`. A save first checks that every
  variable is finite, so a diverged run never replaces the last good checkpoint.
* Restoring: the latest checkpoint must fit the model being built. The model-defining
  settings are written beside the checkpoints (`checkpoint_config.json`) and compared
  first, so a mismatch names the flag that differs; the restore itself must then match
  every variable (no partial restores). An unreadable checkpoint (truncated, corrupt)
  falls back to the previous one, with a warning that names it.
* Preemption: `tf.distribute.experimental.PreemptionCheckpointHandler` catches SIGTERM
  and agrees with the other workers on the step at which all of them save, then this
  module's exit raises `Preempted`. On platforms where TensorFlow's handler stands down
  (Cloud TPU and CPU VMs: it logs that it does not support them and installs nothing),
  a single-client run (TPUStrategy, one process) falls back to catching SIGTERM itself
  and saving at the next step: with one client there is nobody to agree with.
"""

import json
import os
import signal
import threading

import tensorflow as tf
from absl import logging

from input_pipeline import dataset_info
from training import config as config_lib
from training import strategy as strategy_lib

CHECKPOINT_CONFIG_FILENAME = "checkpoint_config.json"


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of the last finished step was saved."""

  def __init__(self, step):
    super().__init__(f"preempted (SIGTERM): saved a checkpoint at step {step}")
    self.step = step


class CheckpointMismatch(config_lib.ConfigError):
  """The model dir's checkpoints were written by another model or recipe."""


def all_finite(variables) -> bool:
  """True if no variable holds a NaN or an infinity (read as the checkpoint would)."""
  checks = [tf.reduce_all(tf.math.is_finite(tf.cast(v.read_value(), tf.float32)))
            for v in variables if v.dtype.is_floating]
  return bool(tf.reduce_all(checks)) if checks else True


def checkpoint_paths(checkpoint_dir):
  """The checkpoints the state file lists, newest first."""
  state = tf.train.get_checkpoint_state(checkpoint_dir)
  if state is None:
    return []
  # get_checkpoint_state has already put checkpoint_dir in front of relative paths
  # (joining it again broke every restore under a relative --model_dir).
  paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
  return sorted(set(paths), key=_checkpoint_number, reverse=True)


def _checkpoint_number(path):
  suffix = path.rsplit("-", 1)[-1]
  return int(suffix) if suffix.isdigit() else -1


def check_checkpoint_config(checkpoint_dir, model_dir, settings):
  """Raises CheckpointMismatch naming the first flag whose value differs from the run
  that wrote the checkpoints (nothing to compare: fine)."""
  path = os.path.join(checkpoint_dir, CHECKPOINT_CONFIG_FILENAME)
  if not tf.io.gfile.exists(path):
    return
  with tf.io.gfile.GFile(path) as f:
    saved = json.load(f)
  for flag, value in settings.items():
    if flag in saved and saved[flag] != value:
      raise CheckpointMismatch(
          flag, f"--model_dir={model_dir} holds checkpoints of a run with --{flag} "
          f"{saved[flag]}, this run has {value}; use {saved[flag]} to resume it, or a "
          "new --model_dir")


def write_checkpoint_config(checkpoint_dir, settings):
  """Writes the model-defining settings beside the checkpoints, unless already there."""
  path = os.path.join(checkpoint_dir, CHECKPOINT_CONFIG_FILENAME)
  if tf.io.gfile.exists(path):
    return
  tf.io.gfile.makedirs(checkpoint_dir)
  dataset_info.write_json_atomically(path, settings)


# A checkpoint whose files cannot be read (the reader raises IndexError on a truncated
# data file, OpErrors on a missing or corrupt one); a ValueError or AssertionError (a
# shape or structure that does not fit) means another model, which no fallback fixes.
_UNREADABLE = (tf.errors.OpError, IndexError, OSError)


def restore_latest_readable(checkpoint, checkpoint_dir, model_dir):
  """Restores the newest readable checkpoint, every variable matched; returns its path.

  Returns None when there is none. Raises CheckpointMismatch (naming --model_dir) when
  the checkpoint's variables do not fit the model's.
  """
  for path in checkpoint_paths(checkpoint_dir):
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
      return path
    except _UNREADABLE as e:
      logging.warning("Checkpoint %s cannot be read (%s); trying the one before it.",
                      path, str(e).strip().splitlines()[0][:200])
    except (ValueError, AssertionError) as e:
      raise CheckpointMismatch(
          "model_dir", f"{model_dir}: checkpoint {path} does not fit the model being "
          "built (another --resnet_depth, --resnet_width, --num_classes, --optimizer, "
          f"--ema_decay or --precision?): {str(e).strip().splitlines()[0][:200]}; "
          "use the flags it was trained with, or a new --model_dir") from None
  return None


class RunCheckpoints:
  """One run's checkpoints: where they go, and what a restore must match.

  Every worker saves (saving may need collectives); only the chief's copy is kept in
  `<model_dir>/checkpoints`, the others' in a folder of their own under the model dir.

  Args:
    strategy: the run's strategy (restores happen in its scope).
    model_dir: the run's folder.
    checkpoint: the `tf.train.Checkpoint` of the model and optimizer.
    settings: {flag: value} of the settings that shape the checkpoint (see
      `check_checkpoint_config`).
  """

  def __init__(self, strategy, model_dir, checkpoint, settings):
    self._strategy = strategy
    self._model_dir = model_dir
    self._checkpoint = checkpoint
    self._settings = dict(settings or {})
    self._is_chief = strategy_lib.is_chief(strategy)
    self._config_written = False
    self.directory = os.path.join(model_dir, "checkpoints")
    own_dir = self.directory if self._is_chief else os.path.join(
        strategy_lib.worker_scratch_dir(strategy, model_dir), "checkpoints")
    self.manager = tf.train.CheckpointManager(checkpoint, own_dir, max_to_keep=3)

  def restore(self):
    """Restores the newest readable checkpoint, if any; returns its path or None.
    Raises CheckpointMismatch when the model dir belongs to another model."""
    check_checkpoint_config(self.directory, self._model_dir, self._settings)
    with self._strategy.scope():
      return restore_latest_readable(self._checkpoint, self.directory, self._model_dir)

  def save(self, step):
    """Saves as checkpoint number `step` (the caller checks that it is sound)."""
    if self._is_chief and not self._config_written:
      write_checkpoint_config(self.directory, self._settings)
      self._config_written = True
    self.manager.save(checkpoint_number=step)


class PreemptionWatch:
  """Saves at the same step on every worker when any of them gets SIGTERM.

  Call `after_step()` once per executed batch on every worker (the handler counts
  calls to align the workers); it raises `Preempted` once the checkpoint is saved.
  """

  def __init__(self, strategy, checkpoint_dir, save_fn, step_fn, single_client):
    self._step_fn = step_fn
    self._save_fn = save_fn
    self._signalled = threading.Event()
    previous = signal.getsignal(signal.SIGTERM)
    # The handler needs a checkpoint to restore its own step counter from; ours are
    # restored (and checked) elsewhere, so it gets an empty one of its own, and saving
    # goes through `save_fn`.
    handler_checkpoint = tf.train.Checkpoint()
    manager = tf.train.CheckpointManager(
        handler_checkpoint, os.path.join(checkpoint_dir, "preemption_handler"),
        max_to_keep=1)
    self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        getattr(strategy, "cluster_resolver", None), manager,
        termination_config=tf.distribute.experimental.TerminationConfig(
            exit_fn=self._exit, save_fn=self._save))
    self._fallback = signal.getsignal(signal.SIGTERM) is previous
    if self._fallback:
      if not single_client:
        logging.warning("TensorFlow's preemption handler is inactive on this platform; "
                        "SIGTERM will end this multi-worker run without a checkpoint.")
        self._fallback = False
      else:
        signal.signal(signal.SIGTERM, lambda signum, frame: self._signalled.set())

  def _save(self, *args, **kwargs):
    del args, kwargs
    self._save_fn(self._step_fn())

  def _exit(self):
    raise Preempted(self._step_fn())

  def after_step(self):
    if self._fallback:
      if self._signalled.is_set():
        self._save(None)
        self._exit()
      return
    self._handler.save_checkpoint_if_preempted()
