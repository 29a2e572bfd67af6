"""The one configuration object: every hyper-parameter, its default, and its checks.

Defaults come from a named preset (`cpu_demo` is the embedded default run); values the
user sets explicitly override the preset. `build_config` returns a frozen `TrainConfig`
that has passed every check that needs only the values themselves;
`check_against_replicas` adds the checks that need the replica count, which is known only
once the strategy exists. Each failure is a `ConfigError` that names the flag and the fix.
"""

import dataclasses
import math
import os
from typing import Optional, Tuple

from allreduce import topology
from resnet import resnet_model

MODES = ("train", "eval", "train_and_eval")
DATASETS = ("digits", "imagenet", "synthetic")  # or "tfds/<builder name>"
ALLREDUCE_KINDS = ("torus", "strategy")
OPTIMIZERS = ("sgd", "lars")
LR_DECAYS = ("polynomial", "cosine")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


class ConfigError(ValueError):
  """A bad setting; `flag` names the command-line flag that holds it."""

  def __init__(self, flag: str, message: str):
    super().__init__(f"--{flag}: {message}")
    self.flag = flag


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run needs. Batch sizes are global (summed over all replicas)."""
  preset: str = "cpu_demo"
  mode: str = "train_and_eval"
  model_dir: str = "runs/cpu_demo"
  # Data.
  dataset: str = "digits"
  data_dir: Optional[str] = None
  image_size: int = 32
  num_classes: int = 10
  cache_dataset: bool = False
  # Model.
  resnet_depth: int = 50
  resnet_width: int = 64
  bn_group_size: int = 1
  bn_momentum: float = 0.9
  precision: str = "float32"
  # Distribution.
  tpu: Optional[str] = None
  num_cpu_devices: int = 8
  torus_shape: Optional[Tuple[int, int]] = None
  allreduce: str = "torus"
  allreduce_pack_mb: float = 32.0
  # Schedule and optimizer.
  train_batch_size: int = 64
  eval_batch_size: int = 64
  train_steps: Optional[int] = None
  train_epochs: Optional[float] = 3.0
  optimizer: str = "sgd"
  base_learning_rate: float = 0.1  # per 256 examples; scaled linearly with the batch
  warmup_epochs: float = 1.0
  ema_decay: float = 0.0  # 0: no moving average of the weights
  lr_decay: str = "cosine"
  momentum: float = 0.9
  weight_decay: float = 1e-4
  label_smoothing: float = 0.0
  # Loop cadence.
  steps_per_execution: int = 1
  log_every_steps: int = 10
  checkpoint_every_steps: int = 100
  eval_every_steps: Optional[int] = None
  seed: int = 0

  @property
  def learning_rate(self) -> float:
    """Peak learning rate: the base rate scaled linearly with the global batch."""
    return self.base_learning_rate * self.train_batch_size / 256.0

  def steps_for(self, num_train_examples: int) -> int:
    """Total training steps: `train_steps`, or epochs converted (rounded up)."""
    if self.train_steps:
      return self.train_steps
    return math.ceil(self.train_epochs * num_train_examples / self.train_batch_size)

  def topology(self, num_replicas: int) -> topology.TorusTopology:
    return topology.TorusTopology.for_replicas(num_replicas, self.torus_shape)


PRESETS = {
    # The embedded default: a few minutes on a 2-core machine, 8 logical CPU replicas
    # as a 2x4 torus, batch-norm statistics over neighbouring pairs.
    "cpu_demo": dict(
        model_dir="runs/cpu_demo", dataset="digits", image_size=32, num_classes=10,
        resnet_depth=18, train_batch_size=64, eval_batch_size=64, train_epochs=6.0,
        bn_group_size=2, base_learning_rate=0.4, warmup_epochs=0.5, lr_decay="cosine",
        weight_decay=5e-5, log_every_steps=5, checkpoint_every_steps=20,
        num_cpu_devices=8, torus_shape=(2, 4)),
    # The classic ImageNet recipe (batch 1024, 90 epochs) on TFRecords in --data_dir.
    "imagenet": dict(
        model_dir="runs/imagenet", dataset="imagenet", image_size=224,
        num_classes=1000, resnet_depth=50, train_batch_size=1024, eval_batch_size=1024,
        train_epochs=90.0, base_learning_rate=0.1, warmup_epochs=5.0,
        lr_decay="polynomial", weight_decay=1e-4, label_smoothing=0.1,
        steps_per_execution=100, log_every_steps=100, checkpoint_every_steps=1000,
        eval_every_steps=5000, bn_group_size=1, cache_dataset=False),
}

# The paper's pod runs (Ying et al., 2018) on ImageNet TFRecords in --data_dir with
# --tpu: 1024 TPU v3 chips = 2048 replicas. LARS with the reference trainers' peak rate
# and warm-up for each global batch, polynomial (power 2) decay, label smoothing 0.1,
# no decay on batch norm or biases, bfloat16. The batch-norm group is chosen so that
# each group sees 32 examples (our rule, not a figure from the paper): 2 replicas of
# 16 at 32k, 1 replica of 32 at 64k.
_PAPER_COMMON = dict(
    dataset="imagenet", image_size=224, num_classes=1000, resnet_depth=50,
    # The reference evaluates with batch 1024, which does not divide over 2048 replicas.
    eval_batch_size=4096, optimizer="lars", lr_decay="polynomial", momentum=0.9,
    weight_decay=1e-4, label_smoothing=0.1, precision="mixed_bfloat16",
    steps_per_execution=100, log_every_steps=100, checkpoint_every_steps=500,
    eval_every_steps=500, allreduce="torus")
PRESETS["paper_32k"] = dict(
    _PAPER_COMMON, model_dir="runs/paper_32k", train_batch_size=32768,
    # 3558 steps (about 91 epochs); peak 34.0 after 12 epochs of warm-up.
    train_steps=3558, train_epochs=None, base_learning_rate=34.0 * 256 / 32768,
    warmup_epochs=12.0, bn_group_size=2)
PRESETS["paper_64k"] = dict(
    _PAPER_COMMON, model_dir="runs/paper_64k", train_batch_size=65536,
    # 90 epochs; peak 41.0 after 16 epochs of warm-up.
    train_epochs=90.0, base_learning_rate=41.0 * 256 / 65536, warmup_epochs=16.0,
    bn_group_size=1)


def build_config(preset: str = "cpu_demo", **overrides) -> TrainConfig:
  """The preset's values, then `overrides`, checked. Unknown names are a TypeError."""
  if preset not in PRESETS:
    raise ConfigError("preset", f"unknown preset {preset!r}; choose one of "
                      f"{', '.join(sorted(PRESETS))}")
  values = dict(PRESETS[preset], preset=preset)
  values.update({k: v for k, v in overrides.items() if v is not None})
  # Exactly one of steps and epochs: an explicit one replaces the preset's other.
  if overrides.get("train_steps") is not None:
    values["train_epochs"] = None
  elif overrides.get("train_epochs") is not None:
    values["train_steps"] = None
  config = TrainConfig(**values)
  check(config)
  return config


def _require(condition: bool, flag: str, message: str):
  if not condition:
    raise ConfigError(flag, message)


def _check_choice(config, name, choices):
  value = getattr(config, name)
  _require(value in choices, name,
           f"unknown value {value!r}; choose one of {', '.join(choices)}")


def _check_positive(config, name):
  value = getattr(config, name)
  _require(value is not None and value > 0, name,
           f"must be a positive number, got {value}")


def check(config: TrainConfig):
  """The checks that need only the configuration itself."""
  _check_choice(config, "mode", MODES)
  _check_choice(config, "allreduce", ALLREDUCE_KINDS)
  _check_choice(config, "optimizer", OPTIMIZERS)
  _check_choice(config, "lr_decay", LR_DECAYS)
  _check_choice(config, "precision", PRECISIONS)
  _require(config.dataset in DATASETS or (config.dataset.startswith("tfds/")
                                          and len(config.dataset) > 5),
           "dataset", f"unknown dataset {config.dataset!r}; choose one of "
           f"{', '.join(DATASETS)} or tfds/<builder name>, e.g. tfds/imagenet2012")
  if config.dataset in ("imagenet",) or config.dataset.startswith("tfds/"):
    _require(bool(config.data_dir), "data_dir",
             f"dataset {config.dataset} needs --data_dir pointing at its prepared files")
  if config.data_dir and "://" not in config.data_dir:
    _require(os.path.isdir(config.data_dir), "data_dir",
             f"directory {config.data_dir!r} does not exist; pass the folder that "
             "holds the train-*/validation-* shards")
  _require(bool(config.model_dir), "model_dir", "must name a directory to write to")
  for name in ("train_batch_size", "eval_batch_size", "image_size", "resnet_width",
               "steps_per_execution", "log_every_steps", "checkpoint_every_steps",
               "bn_group_size", "allreduce_pack_mb", "base_learning_rate"):
    _check_positive(config, name)
  _require(config.num_classes >= 2, "num_classes",
           f"must be at least 2, got {config.num_classes}")
  _require(config.resnet_depth in resnet_model.RESNET_SPECS, "resnet_depth",
           f"unsupported depth {config.resnet_depth}; choose one of "
           f"{sorted(resnet_model.RESNET_SPECS)}")
  if config.train_steps is not None:
    _check_positive(config, "train_steps")
  else:
    _check_positive(config, "train_epochs")
  _require(config.log_every_steps % config.steps_per_execution == 0,
           "log_every_steps", f"{config.log_every_steps} must be a multiple of "
           f"--steps_per_execution={config.steps_per_execution}")
  _require(config.checkpoint_every_steps % config.log_every_steps == 0,
           "checkpoint_every_steps", f"{config.checkpoint_every_steps} must be a "
           f"multiple of --log_every_steps={config.log_every_steps}")
  if config.eval_every_steps is not None:
    _check_positive(config, "eval_every_steps")
    _require(config.eval_every_steps % config.log_every_steps == 0,
             "eval_every_steps", f"{config.eval_every_steps} must be a multiple of "
             f"--log_every_steps={config.log_every_steps}")
  _require(0.0 <= config.label_smoothing < 1.0, "label_smoothing",
           f"must be in [0, 1), got {config.label_smoothing}")
  _require(config.weight_decay >= 0, "weight_decay",
           f"must not be negative, got {config.weight_decay}")
  _require(0.0 <= config.ema_decay < 1.0, "ema_decay",
           f"must be in [0, 1) (0 turns the average off), got {config.ema_decay}")
  _require(config.warmup_epochs >= 0, "warmup_epochs",
           f"must not be negative, got {config.warmup_epochs}")
  _require(config.tpu is not None or config.num_cpu_devices >= 1, "num_cpu_devices",
           f"must be at least 1, got {config.num_cpu_devices}")


def check_against_replicas(config: TrainConfig, num_replicas: int):
  """The checks that need the replica count of the strategy in use."""
  for name in ("train_batch_size", "eval_batch_size"):
    value = getattr(config, name)
    _require(value % num_replicas == 0, name,
             f"global batch {value} does not divide over {num_replicas} replicas; "
             f"use a multiple of {num_replicas}, e.g. "
             f"{max(1, round(value / num_replicas)) * num_replicas}")
  try:
    grid = config.topology(num_replicas)
  except topology.TopologyError as e:
    raise ConfigError("torus_shape", str(e)) from None
  try:
    grid.block_groups(config.bn_group_size)
  except topology.TopologyError as e:
    raise ConfigError("bn_group_size", str(e)) from None
