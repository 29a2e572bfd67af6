"""Trains and evaluates ResNet with the three techniques of Ying et al. (2018).

  python main.py                                  # the embedded default (cpu_demo preset)
  python main.py --preset=imagenet --data_dir=/path/to/tfrecords --tpu=local

Every flag left unset takes its value from --preset; the full configuration is printed
at start-up and written to <model_dir>/summary.json at the end.
"""

import os
import sys
import threading
import typing

# TensorFlow's C++ INFO lines (one per finished input pipeline, per collective group)
# drown the progress lines; warnings and errors still show. Must precede its import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging

from allreduce import topology
from training import config as config_lib
from training import failures
from training import run as run_lib
from training import strategy as strategy_lib

_PRESET = flags.DEFINE_enum("preset", "cpu_demo", sorted(config_lib.PRESETS),
                            "Named set of defaults for every flag below.")


def _define_flags():
  """One flag per config setting, with the setting's help; None means "the preset's
  value". A grid is written XxY and parsed in _config_from_flags."""
  for _, field in config_lib.setting_fields():
    kind = typing.get_args(field.type)[0] if typing.get_args(field.type) else field.type
    help_text, choices = field.metadata["help"], field.metadata["choices"]
    if choices:
      flags.DEFINE_enum(field.name, None, choices, help_text)
    elif kind is bool:
      flags.DEFINE_bool(field.name, None, help_text)
    elif kind is int:
      flags.DEFINE_integer(field.name, None, help_text)
    elif kind is float:
      flags.DEFINE_float(field.name, None, help_text)
    else:
      flags.DEFINE_string(field.name, None, help_text)


_define_flags()


def _config_from_flags():
  values = {}
  for _, field in config_lib.setting_fields():
    value = flags.FLAGS[field.name].value
    if value is not None and field.name == "torus_shape":
      try:
        value = topology.parse_grid(value)
      except topology.TopologyError as e:
        raise config_lib.ConfigError(field.name, str(e)) from None
    values[field.name] = value
  return config_lib.build_config(_PRESET.value, **values)


def _run():
  """Runs the job; returns (exit code, the line for stderr or None)."""
  config = None
  try:
    config = _config_from_flags()
    run_lib.train_and_evaluate(config)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    outcome = failures.describe(e, config and config.distribution.collective_timeout_seconds)
    if outcome is None:
      raise
    return outcome
  return 0, None


def _log_background_failure(args):
  # TensorFlow's preemption watcher threads fail loudly when a peer vanishes; the main
  # thread reports the cause in one line.
  logging.warning("background thread %s ended: %s", args.thread.name,
                  failures.first_lines(args.exc_value))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # TensorFlow's Python INFO lines (how each all-reduce is placed) likewise.
  tf.get_logger().setLevel("WARNING")
  threading.excepthook = _log_background_failure
  code, message = _run()
  logging.flush()
  if message:
    print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  if strategy_lib.multi_worker_task_count() > 1:
    # A multi-worker strategy's gRPC server cannot be stopped, and its shutdown can
    # wait forever on a peer that is gone: leave without the interpreter's teardown.
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


if __name__ == "__main__":
  app.run(main)
