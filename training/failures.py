"""How a run that cannot go on ends: one line that names the cause and the fix, and an
exit code a scheduler can act on. docs/RELIABILITY.md lists each case and its test.

  0    finished
  2    a bad flag, data set or model dir (the line names the flag)
  3    the loss became NaN or infinite (nothing from that step on was saved)
  4    a collective across workers failed: a worker died or hung
  130  interrupted (Ctrl-C)
  143  preempted (SIGTERM): every worker saved the same step; rerun to resume
"""

import re
from typing import Optional, Tuple

import tensorflow as tf

from input_pipeline import DataError
from training import checkpoints
from training import config as config_lib
from training import data_sources
from training import trainer

CONFIG_OR_DATA = 2
DIVERGED = 3
LOST_WORKER = 4
INTERRUPTED = 130
PREEMPTED = 143

# What a peer's death or silence surfaces as, inside a collective or the coordination
# service's key-value calls.
_PEER_ERRORS = (tf.errors.DeadlineExceededError, tf.errors.UnavailableError,
                tf.errors.AbortedError, tf.errors.CancelledError)


def first_lines(error: BaseException, max_chars: int = 300) -> str:
  """TensorFlow's message without its function-node prefix, on one line."""
  text = str(getattr(error, "message", None) or error)
  text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
  text = " ".join(line.strip() for line in text.splitlines()[:3] if line.strip())
  return text[:max_chars] or type(error).__name__


def describe(error: BaseException,
             collective_timeout_seconds: Optional[float]) -> Optional[Tuple[int, str]]:
  """(exit code, the line for stderr) for an expected failure; None for a bug."""
  if isinstance(error, (config_lib.ConfigError, DataError)):
    return CONFIG_OR_DATA, f"main.py: error: {error}"
  if isinstance(error, trainer.TrainingDiverged):
    return DIVERGED, f"main.py: error: {error}"
  if isinstance(error, checkpoints.Preempted):
    return PREEMPTED, f"main.py: {error}; run the same command again to resume."
  if isinstance(error, tf.errors.InvalidArgumentError):
    if data_sources.LABEL_OUT_OF_RANGE not in error.message:
      return None
    seen = error.message.split(data_sources.LABEL_OUT_OF_RANGE, 1)[1].splitlines()[0]
    return CONFIG_OR_DATA, (
        "main.py: error: --num_classes: the data holds a label outside "
        f"[0, --num_classes) (--num_classes, labels seen: {seen.strip()[:200]}); pass "
        "the data set's class count")
  if isinstance(error, _PEER_ERRORS):
    bound = (f"--collective_timeout_seconds={collective_timeout_seconds:g}"
             if collective_timeout_seconds is not None else "the collective timeout")
    return LOST_WORKER, (
        f"main.py: error: a collective across workers failed (bounded by {bound}): a "
        f"worker stopped or cannot be reached: {type(error).__name__}: "
        f"{first_lines(error)}")
  if isinstance(error, KeyboardInterrupt):
    return INTERRUPTED, ("main.py: interrupted; the last finished step is "
                         "checkpointed: run the same command again to resume.")
  return None
