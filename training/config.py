"""The configuration: five frozen sections, every setting declared once with its help.

A run's `TrainConfig` holds a `data`, `model`, `distribution`, `optimizer` and `loop`
section; each builder takes the sections it needs. Every field is also a command-line
flag of the same name (`main.py` generates the flags from the fields and their help),
so a setting is written down in one place. Defaults come from a named preset
(training/presets.py); values set explicitly override it. `build_config` returns a
config that has passed every check that needs only the values themselves, each check
beside its section; `check_against_replicas` adds those that need the replica count,
known once the strategy exists. Each failure is a `ConfigError` that names the flag and
the fix.
"""

import dataclasses
import math
import os
from typing import Optional, Tuple

from allreduce import topology
from allreduce.torus_aggregator import DEFAULT_PACK_SIZE_BYTES
from resnet import resnet_model
from training import presets
from training import service_address
from training.flag_error import FlagError

MODES = ("train", "eval", "train_and_eval")
DATASETS = ("digits", "imagenet", "synthetic")  # or "tfds/<builder name>"
ALLREDUCE_KINDS = ("torus", "strategy")
OPTIMIZERS = ("sgd", "lars")
LR_DECAYS = ("polynomial", "cosine")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
WEIGHT_UPDATE_SHARDINGS = ("auto", "off", "x", "xy")

# A bad setting; `flag` names the command-line flag that holds it.
ConfigError = FlagError
PRESETS = presets.PRESETS


def setting(default, help_text, choices=None):
  """A config field that is also a flag: its default, help and allowed values."""
  return dataclasses.field(default=default,
                           metadata={"help": help_text, "choices": choices})


def _require(condition: bool, flag: str, message: str):
  if not condition:
    raise ConfigError(flag, message)


def _check_choices(section):
  for field in dataclasses.fields(section):
    choices = field.metadata.get("choices")
    value = getattr(section, field.name)
    _require(not choices or value in choices, field.name,
             f"unknown value {value!r}; choose one of {', '.join(choices or ())}")


def _check_positive(section, *names):
  for name in names:
    value = getattr(section, name)
    _require(value is not None and value > 0, name,
             f"must be a positive number, got {value}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read: the data set, and the image and label shapes the model sees."""
  dataset: str = setting("digits", "digits (embedded), imagenet (TFRecord shards in "
                         "--data_dir), synthetic, or tfds/<builder> read from --data_dir.")
  data_dir: Optional[str] = setting(None, "Folder of the prepared data set (only read).")
  image_size: int = setting(32, "Height and width of the model's input.")
  num_classes: int = setting(10, "Number of classes.")
  cache_dataset: bool = setting(False, "Cache encoded records in host memory.")
  deterministic_input: bool = setting(
      True, "Keep the training stream's order a function of --seed and the position, so "
      "a resumed run continues the interrupted run's stream exactly. False lets a slow "
      "read be overtaken (faster input); resuming is then approximate.")
  input_threadpool_size: Optional[int] = setting(
      None, "Threads of a tf.data pool of the input pipeline's own (default: "
      "TensorFlow's shared pool; 0: sized by TensorFlow from the host's cores).")
  input_max_intra_op_parallelism: Optional[int] = setting(
      None, "Threads one tf.data op may use inside itself (default: TensorFlow's).")
  input_ram_budget_mb: Optional[int] = setting(
      None, "MiB the tf.data autotuner may spend on buffers (default: TensorFlow's, "
      "half the host's RAM).")
  data_service_address: Optional[str] = setting(
      None, "A tf.data service dispatcher, e.g. grpc://host:5050 (start one with "
      "`python -m tools.data_service`): its workers make the training input, each "
      "example once per epoch in no fixed order; evaluation stays local. The workers "
      "must read the same --data_dir (or --model_dir for the digits).")

  def check(self):
    _require(self.dataset in DATASETS or (self.dataset.startswith("tfds/")
                                          and len(self.dataset) > 5),
             "dataset", f"unknown dataset {self.dataset!r}; choose one of "
             f"{', '.join(DATASETS)} or tfds/<builder name>, e.g. tfds/imagenet2012")
    if self.dataset == "imagenet" or self.dataset.startswith("tfds/"):
      _require(bool(self.data_dir), "data_dir",
               f"dataset {self.dataset} needs --data_dir pointing at its prepared files")
    if self.dataset in ("digits", "synthetic"):
      # The digits are generated under --model_dir and synthetic data is made in
      # memory: neither reads a folder, and a folder given here is the user's data,
      # never ours to write into (the usual slip: forgetting --preset=imagenet).
      _require(not self.data_dir, "data_dir",
               f"dataset {self.dataset} reads no --data_dir (it is made by the program, "
               f"under --model_dir); to train on the files in {self.data_dir!r} pass "
               "--dataset=imagenet (TFRecord shards) or --dataset=tfds/<builder>, or "
               "--preset=imagenet")
    if self.data_dir and "://" not in self.data_dir:
      _require(os.path.isdir(self.data_dir), "data_dir",
               f"directory {self.data_dir!r} does not exist; pass the folder that "
               "holds the train-*/validation-* shards")
    if self.data_service_address:
      # The service splits the record files by shard (see training/data_service.py;
      # a tfds split is TFRecord files too); synthetic batches have no files to split.
      _require(self.dataset != "synthetic", "data_service_address",
               "the tf.data service serves data sets read from files (digits, "
               "imagenet, tfds/<builder>), not synthetic; drop --data_service_address")
      try:
        service_address.split_address(self.data_service_address)
      except service_address.AddressError as e:
        raise ConfigError("data_service_address", str(e)) from None
    _check_positive(self, "image_size")
    for name in ("input_max_intra_op_parallelism", "input_ram_budget_mb"):
      if getattr(self, name) is not None:
        _check_positive(self, name)
    _require(self.input_threadpool_size is None or self.input_threadpool_size >= 0,
             "input_threadpool_size",
             f"must not be negative, got {self.input_threadpool_size}")
    _require(self.num_classes >= 2, "num_classes",
             f"must be at least 2, got {self.num_classes}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The network and its numerics."""
  resnet_depth: int = setting(50, "ResNet depth (50 is the paper's model).")
  resnet_width: int = setting(64, "Stem channels (64 in the real model).")
  bn_group_size: int = setting(1, "Replicas whose batch-norm statistics are pooled "
                               "(1 = per replica).")
  bn_momentum: float = setting(0.9, "Batch-norm moving-statistics momentum.")
  precision: str = setting("float32", "Compute precision.", PRECISIONS)

  def check(self):
    _check_choices(self)
    _check_positive(self, "resnet_width", "bn_group_size")
    _require(self.resnet_depth in resnet_model.RESNET_SPECS, "resnet_depth",
             f"unsupported depth {self.resnet_depth}; choose one of "
             f"{sorted(resnet_model.RESNET_SPECS)}")


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
  """Where the replicas run and how they talk."""
  tpu: Optional[str] = setting(None, "TPU name or address; 'local' on a TPU VM.")
  num_cpu_devices: int = setting(8, "Logical CPU replicas when no accelerator is present.")
  torus_shape: Optional[Tuple[int, int]] = setting(
      None, "Replica grid XxY, e.g. 2x4 (default: the most square grid for the replica "
      "count; on TPU the chips' physical grid).")
  allreduce: str = setting("torus", "Gradient all-reduce: the 2-D torus, or the "
                           "strategy's own (packed into --allreduce_pack_mb buffers "
                           "too).", ALLREDUCE_KINDS)
  # The aggregator's own default (allreduce/torus_aggregator.py says why 16 MiB).
  allreduce_pack_mb: float = setting(DEFAULT_PACK_SIZE_BYTES / 2**20,
                                     "Cap on each packed gradient buffer, in MiB.")
  # Ten minutes covers a peer that is still tracing its first step.
  collective_timeout_seconds: float = setting(
      600.0, "Multi-worker runs: a worker that is silent (no heartbeat) this long ends "
      "the run on every other worker instead of hanging it (0 = TensorFlow's default).")
  jit_compile: bool = setting(False, "XLA-compile the train step (GPUs; TPUs always "
                              "compile).")
  # 'auto' is 'xy' with the torus: the fastest measured (docs/RESULTS.md, "Sharded
  # weight update"), and it moves the bytes of the plain 2-D all-reduce. On TPU too:
  # the step with run-time shard offsets is traced, run (its TPU ops emulated) and
  # checked for XLA in tests/sharded_update_test.py, though never run on a TPU
  # (docs/TPU.md, "Sharded weight update").
  shard_weight_update: str = setting(
      "auto", "With the torus all-reduce: each replica applies the optimizer to 1/x "
      "('x') or 1/(x*y) ('xy') of the weights and the updated weights are "
      "all-gathered; 'off': every replica updates every weight; 'auto': 'xy' with "
      "--allreduce=torus (on TPU too), else 'off'.", WEIGHT_UPDATE_SHARDINGS)

  @property
  def weight_update_shards(self) -> str:
    """The sharding 'auto' resolves to: "off", "x" or "xy"."""
    if self.shard_weight_update != "auto":
      return self.shard_weight_update
    return "xy" if self.allreduce == "torus" else "off"

  def check(self):
    _check_choices(self)
    _check_positive(self, "allreduce_pack_mb")
    _require(self.collective_timeout_seconds >= 0, "collective_timeout_seconds",
             f"must not be negative (0 waits forever), got "
             f"{self.collective_timeout_seconds}")
    _require(self.tpu is not None or self.num_cpu_devices >= 1, "num_cpu_devices",
             f"must be at least 1, got {self.num_cpu_devices}")
    _require(self.weight_update_shards == "off" or self.allreduce == "torus",
             "shard_weight_update", f"{self.shard_weight_update!r} shards the update "
             "after the torus reduce-scatter; use --allreduce=torus, or "
             "--shard_weight_update=off")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The recipe: optimizer, learning-rate schedule, regularisation."""
  optimizer: str = setting("sgd", "Optimizer.", OPTIMIZERS)
  base_learning_rate: float = setting(0.1, "Peak learning rate per 256 examples "
                                      "(scaled linearly with the global batch).")
  warmup_epochs: float = setting(1.0, "Linear warm-up length.")
  lr_decay: str = setting("cosine", "Decay after warm-up.", LR_DECAYS)
  momentum: float = setting(0.9, "Momentum.")
  weight_decay: float = setting(1e-4, "Weight decay (not on batch norm or biases).")
  label_smoothing: float = setting(0.0, "Label smoothing.")
  ema_decay: float = setting(0.0, "Decay of a moving average of the weights used for "
                             "the final evaluation (0 = off).")

  def check(self):
    _check_choices(self)
    _check_positive(self, "base_learning_rate")
    _require(0.0 <= self.label_smoothing < 1.0, "label_smoothing",
             f"must be in [0, 1), got {self.label_smoothing}")
    _require(self.weight_decay >= 0, "weight_decay",
             f"must not be negative, got {self.weight_decay}")
    _require(0.0 <= self.ema_decay < 1.0, "ema_decay",
             f"must be in [0, 1) (0 turns the average off), got {self.ema_decay}")
    _require(self.warmup_epochs >= 0, "warmup_epochs",
             f"must not be negative, got {self.warmup_epochs}")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """What to run, for how long, in which rhythm, and where it writes."""
  mode: str = setting("train_and_eval", "What to run.", MODES)
  model_dir: str = setting("runs/cpu_demo", "Checkpoints, summaries and results go here "
                           "(the only folder the program writes to).")
  train_batch_size: int = setting(64, "Global training batch.")
  eval_batch_size: int = setting(64, "Global evaluation batch.")
  train_steps: Optional[int] = setting(None, "Training steps (overrides --train_epochs).")
  train_epochs: Optional[float] = setting(3.0, "Training epochs (overrides "
                                          "--train_steps).")
  steps_per_execution: int = setting(1, "Steps per device loop (the TPU 'iterations "
                                     "per loop').")
  log_every_steps: int = setting(10, "Progress line and summaries cadence.")
  checkpoint_every_steps: int = setting(100, "Checkpoint cadence.")
  eval_every_steps: Optional[int] = setting(None, "Evaluation cadence during training.")
  seed: int = setting(0, "Random seed for initialisation and data order.")

  def check(self):
    _check_choices(self)
    _require(bool(self.model_dir), "model_dir", "must name a directory to write to")
    _check_positive(self, "train_batch_size", "eval_batch_size", "steps_per_execution",
                    "log_every_steps", "checkpoint_every_steps")
    _check_positive(self, "train_steps" if self.train_steps is not None
                    else "train_epochs")
    _require(self.log_every_steps % self.steps_per_execution == 0,
             "log_every_steps", f"{self.log_every_steps} must be a multiple of "
             f"--steps_per_execution={self.steps_per_execution}")
    _require(self.checkpoint_every_steps % self.log_every_steps == 0,
             "checkpoint_every_steps", f"{self.checkpoint_every_steps} must be a "
             f"multiple of --log_every_steps={self.log_every_steps}")
    if self.eval_every_steps is not None:
      _check_positive(self, "eval_every_steps")
      _require(self.eval_every_steps % self.log_every_steps == 0,
               "eval_every_steps", f"{self.eval_every_steps} must be a multiple of "
               f"--log_every_steps={self.log_every_steps}")

  def steps_for(self, num_train_examples: int) -> int:
    """Total training steps: `train_steps`, or epochs converted (rounded up)."""
    if self.train_steps:
      return self.train_steps
    return math.ceil(self.train_epochs * num_train_examples / self.train_batch_size)


SECTIONS = {"data": DataConfig, "model": ModelConfig,
            "distribution": DistributionConfig, "optimizer": OptimizerConfig,
            "loop": LoopConfig}


def setting_fields():
  """(section name, field) for every setting: the flags `main.py` defines."""
  return [(name, field) for name, section in SECTIONS.items()
          for field in dataclasses.fields(section)]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run needs, by section. Batch sizes are global (over all replicas)."""
  preset: str = "cpu_demo"
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  distribution: DistributionConfig = DistributionConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  loop: LoopConfig = LoopConfig()

  @classmethod
  def from_flat(cls, preset="cpu_demo", **values):
    """Builds the sections from flag-named values (unknown names are a TypeError)."""
    by_section = {name: {} for name in SECTIONS}
    owner = {field.name: name for name, field in setting_fields()}
    for key, value in values.items():
      if key not in owner:
        raise TypeError(f"unknown setting {key!r}")
      by_section[owner[key]][key] = value
    return cls(preset=preset, **{name: SECTIONS[name](**by_section[name])
                                 for name in SECTIONS})

  def flat(self) -> dict:
    """{flag: value} for every setting, and the preset: for logs and summary.json."""
    values = {"preset": self.preset}
    for name in SECTIONS:
      values.update(dataclasses.asdict(getattr(self, name)))
    return values

  @property
  def learning_rate(self) -> float:
    """Peak learning rate: the base rate scaled linearly with the global batch."""
    return self.optimizer.base_learning_rate * self.loop.train_batch_size / 256.0

  def grid(self, num_replicas: int) -> topology.TorusTopology:
    """The replica torus: --torus_shape, or the most square grid of the replicas."""
    return topology.TorusTopology.for_replicas(num_replicas,
                                               self.distribution.torus_shape)


def build_config(preset: str = "cpu_demo", **overrides) -> TrainConfig:
  """The preset's values, then `overrides` (flag names), checked."""
  if preset not in PRESETS:
    raise ConfigError("preset", f"unknown preset {preset!r}; choose one of "
                      f"{', '.join(sorted(PRESETS))}")
  values = dict(PRESETS[preset])
  values.update({k: v for k, v in overrides.items() if v is not None})
  # Exactly one of steps and epochs: an explicit one replaces the preset's other.
  if overrides.get("train_steps") is not None:
    values["train_epochs"] = None
  elif overrides.get("train_epochs") is not None:
    values["train_steps"] = None
  config = TrainConfig.from_flat(preset, **values)
  check(config)
  return config


def check(config: TrainConfig):
  """The checks that need only the configuration itself, section by section."""
  for name in SECTIONS:
    getattr(config, name).check()


def check_against_replicas(config: TrainConfig, num_replicas: int):
  """The checks that need the replica count of the strategy in use."""
  for name in ("train_batch_size", "eval_batch_size"):
    value = getattr(config.loop, name)
    _require(value % num_replicas == 0, name,
             f"global batch {value} does not divide over {num_replicas} replicas; "
             f"use a multiple of {num_replicas}, e.g. "
             f"{max(1, round(value / num_replicas)) * num_replicas}")
  try:
    grid = config.grid(num_replicas)
  except topology.TopologyError as e:
    raise ConfigError("torus_shape", str(e)) from None
  try:
    grid.block_groups(config.model.bn_group_size)
  except topology.TopologyError as e:
    raise ConfigError("bn_group_size", str(e)) from None
