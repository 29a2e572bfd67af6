"""Trains and evaluates ResNet with the three techniques of Ying et al. (2018).

  python main.py                                  # the embedded default (cpu_demo preset)
  python main.py --preset=imagenet --data_dir=/path/to/tfrecords --tpu=local

Every flag left unset takes its value from --preset; the full configuration is printed
at start-up and written to <model_dir>/summary.json at the end.
"""

import os
import signal
import sys

# TensorFlow's C++ INFO lines (one per finished input pipeline, per collective group)
# drown the progress lines; warnings and errors still show. Must precede its import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging

from allreduce import topology
from input_pipeline import DataError
from training import config as config_lib
from training import run as run_lib

_PRESET = flags.DEFINE_enum("preset", "cpu_demo", sorted(config_lib.PRESETS),
                            "Named set of defaults for every flag below.")

# Flags that override the preset. None means "the preset's value".
flags.DEFINE_enum("mode", None, config_lib.MODES, "What to run.")
flags.DEFINE_string("model_dir", None, "Checkpoints, summaries and results go here.")
flags.DEFINE_string("dataset", None, "digits (embedded), imagenet (TFRecord shards in "
                    "--data_dir), synthetic, or tfds/<builder> read from --data_dir.")
flags.DEFINE_string("data_dir", None, "Folder of the prepared data set.")
flags.DEFINE_integer("image_size", None, "Height and width of the model's input.")
flags.DEFINE_integer("num_classes", None, "Number of classes.")
flags.DEFINE_bool("cache_dataset", None, "Cache encoded records in host memory.")
flags.DEFINE_integer("resnet_depth", None, "ResNet depth (50 is the paper's model).")
flags.DEFINE_integer("resnet_width", None, "Stem channels (64 in the real model).")
flags.DEFINE_integer("bn_group_size", None,
                     "Replicas whose batch-norm statistics are pooled (1 = per replica).")
flags.DEFINE_float("bn_momentum", None, "Batch-norm moving-statistics momentum.")
flags.DEFINE_enum("precision", None, config_lib.PRECISIONS, "Compute precision.")
flags.DEFINE_string("tpu", None, "TPU name or address; 'local' on a TPU VM.")
flags.DEFINE_integer("num_cpu_devices", None,
                     "Logical CPU replicas when no accelerator is present.")
flags.DEFINE_string("torus_shape", None, "Replica grid XxY, e.g. 2x4 (default: the "
                    "most square grid for the replica count).")
flags.DEFINE_enum("allreduce", None, config_lib.ALLREDUCE_KINDS,
                  "Gradient all-reduce: the 2-D torus, or the strategy's own.")
flags.DEFINE_float("allreduce_pack_mb", None, "Cap on each packed gradient buffer.")
flags.DEFINE_integer("train_batch_size", None, "Global training batch.")
flags.DEFINE_integer("eval_batch_size", None, "Global evaluation batch.")
flags.DEFINE_integer("train_steps", None, "Training steps (overrides --train_epochs).")
flags.DEFINE_float("train_epochs", None, "Training epochs (overrides --train_steps).")
flags.DEFINE_enum("optimizer", None, config_lib.OPTIMIZERS, "Optimizer.")
flags.DEFINE_float("base_learning_rate", None, "Peak learning rate per 256 examples.")
flags.DEFINE_float("warmup_epochs", None, "Linear warm-up length.")
flags.DEFINE_enum("lr_decay", None, config_lib.LR_DECAYS, "Decay after warm-up.")
flags.DEFINE_float("momentum", None, "Momentum.")
flags.DEFINE_float("weight_decay", None, "Weight decay (not on batch norm or biases).")
flags.DEFINE_float("label_smoothing", None, "Label smoothing.")
flags.DEFINE_float("ema_decay", None, "Decay of a moving average of the weights used "
                   "for the final evaluation (0 = off).")
flags.DEFINE_integer("steps_per_execution", None,
                     "Steps per device loop (the TPU 'iterations per loop').")
flags.DEFINE_integer("log_every_steps", None, "Progress line and summaries cadence.")
flags.DEFINE_integer("checkpoint_every_steps", None, "Checkpoint cadence.")
flags.DEFINE_integer("eval_every_steps", None, "Evaluation cadence during training.")
flags.DEFINE_integer("seed", None, "Random seed for initialisation and data order.")

_OVERRIDES = [name for name in config_lib.TrainConfig.__dataclass_fields__
              if name != "preset"]


def _config_from_flags():
  values = {}
  for name in _OVERRIDES:
    value = flags.FLAGS[name].value
    if value is not None and name == "torus_shape":
      try:
        value = topology.parse_grid(value)
      except topology.TopologyError as e:
        raise config_lib.ConfigError(name, str(e)) from None
    values[name] = value
  return config_lib.build_config(_PRESET.value, **values)


def _interrupt_on_sigterm(signum, frame):
  del signum, frame
  # Preemption (spot TPUs, schedulers) sends SIGTERM: stop like Ctrl-C, so the trainer
  # saves a checkpoint at the last finished step.
  raise KeyboardInterrupt


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
  # TensorFlow's Python INFO lines (how each all-reduce is placed) likewise.
  tf.get_logger().setLevel("WARNING")
  try:
    config = _config_from_flags()
    run_lib.train_and_evaluate(config)
  except (config_lib.ConfigError, DataError) as e:
    logging.flush()
    print(f"main.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    logging.flush()
    print("main.py: interrupted; the last finished step is checkpointed: run the same "
          "command again to resume.", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
