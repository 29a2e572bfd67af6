"""Splits this machine's CPU into logical devices so distributed code really runs.

TensorFlow lets the device list be set only before its runtime starts, so every test
module calls `configure_logical_cpus` at import time, before it touches a tensor. Under
pytest all modules share one process: the first call configures, the others check.
"""

import tensorflow as tf

from training import strategy as strategy_lib

NUM_LOGICAL_CPUS = 8


def configure_logical_cpus(count=NUM_LOGICAL_CPUS):
  """Makes `count` logical CPU devices, or checks that they already exist."""
  strategy_lib.split_cpu(count)


def cpu_mirrored_strategy(count=NUM_LOGICAL_CPUS):
  """A MirroredStrategy over the first `count` logical CPUs (real collectives)."""
  configure_logical_cpus(max(count, NUM_LOGICAL_CPUS))
  return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(count)])
