"""Training images/s per accelerator: the project's trainer, plain Keras, Model Garden.

READY FOR A GPU MACHINE, NOT YET RUN ON ONE. On a machine with GPUs run:

    .venv/bin/python benchmarks/accelerator.py              # ResNet-50, 224x224, all GPUs

and on a CPU-only machine, to check that the script works end to end (its figures mean
nothing about accelerators):

    .venv/bin/python benchmarks/accelerator.py --cpu_smoke --image_size=32 \\
        --resnet_depth=18 --steps=3 --rounds=1 --per_replica_batch=4

Every arm runs under the same `MirroredStrategy` over the visible GPUs (NCCL all-reduce
for the arms that use the strategy's own; `--cpu_smoke`: 2 logical CPUs), with the same
per-replica batch, precision and input:

* trainer: `training.run.build_trainer` on a `TrainConfig`: the project's ResNet (v1.5,
  from its stage table), its batch norm (`--bn_group_size`), the 2-D torus gradient
  all-reduce as the optimizer's aggregator, driven by `Trainer.train()`.
* keras: `tf_keras.applications.ResNet50` (for other depths, the project's ResNet with
  plain Keras batch norm), `model.compile(...)` and `model.fit`, the strategy's own
  all-reduce.
* garden: Model Garden's `official.vision.modeling.backbones.ResNet` under a
  `ClassificationModel` head, compiled and fitted like the Keras arm.

Precision: `--precision=mixed_float16` (default; dynamic loss scaling through
`LossScaleOptimizer` on every arm), `mixed_bfloat16` or `float32`. Input: `synthetic`
(one fixed batch, `input_pipeline.synthetic`: the accelerator's ceiling) and `tfrecord`
(photo crops written as JPEG TFRecords by `input_pipeline.write_tfrecords` into a
temporary folder, read, decoded and augmented by the project's pipeline, the same
stream for every arm). XLA: each arm with `jit_compile` off and on.

For each (input, XLA) pair every arm is built and run once to trace and compile
(excluded), then the arms alternate for `--rounds` rounds of `--steps` steps. Steps
after the first of each round are timed one by one (the trainer from its own per-loop
progress lines, one loop per step; the Keras arms by a batch callback); the median step
gives images/s, divided by the number of accelerators. An arm that fails to build or
run prints its error and is left out. Last line: `images_per_s_per_accelerator: <N>`,
N the trainer's best configuration on the TFRecord input (on synthetic input when only
that ran).
"""

import argparse
import logging as logging_lib
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import tensorflow as tf
import tf_keras
from absl import logging
from PIL import Image
from sklearn.datasets import load_sample_images

from allreduce import topology
from input_pipeline import write_tfrecords
from resnet import resnet_model
from training import config as config_lib
from training import data_sources
from training import run as run_lib
from training import strategy as strategy_lib

CPU_SMOKE_REPLICAS = 2
ARMS = ("trainer", "keras", "garden")


def make_strategy(cpu_smoke, jit_compile):
  """MirroredStrategy over the GPUs with NCCL; logical CPUs for the smoke run.

  The smoke run's XLA arms get one CPU: XLA compiles every logical CPU's replica for
  the same host device, and then fails reading the variables of the other replicas
  ("Trying to access resource ... located in device CPU:1 from device CPU:0", an XLA
  known issue). GPUs are separate devices and do not have this problem.
  """
  if cpu_smoke:
    devices = strategy_lib.split_cpu(CPU_SMOKE_REPLICAS)
    return tf.distribute.MirroredStrategy(devices[:1] if jit_compile else devices)
  gpus = tf.config.list_logical_devices("GPU")
  if not gpus:
    raise SystemExit("no GPU visible: run with --cpu_smoke to check the script on CPU")
  return tf.distribute.MirroredStrategy(
      [gpu.name for gpu in gpus], cross_device_ops=tf.distribute.NcclAllReduce())


def write_photo_records(output_dir, num_examples, num_classes, seed=0):
  """`num_examples` ImageNet-sized (375x500) crops of scikit-learn's two photos, as
  JPEG files in class folders, then as TFRecord shards (train and validation)."""
  photos = load_sample_images().images  # two 427x640 photographs
  rng = np.random.default_rng(seed)
  image_dir = os.path.join(output_dir, "images")
  for index in range(num_examples):
    photo = photos[index % len(photos)]
    top, left = rng.integers(0, 427 - 375 + 1), rng.integers(0, 640 - 500 + 1)
    crop = photo[top:top + 375, left:left + 500]
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    class_dir = os.path.join(image_dir, f"class_{index % num_classes:04d}")
    os.makedirs(class_dir, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(crop)).save(
        os.path.join(class_dir, f"{index:06d}.jpg"), quality=90)
  records_dir = os.path.join(output_dir, "records")
  for split in ("train", "validation"):
    write_tfrecords.write_image_folder(image_dir, records_dir, split, num_shards=4,
                                       show_progress=False)
  return records_dir


def trainer_config(args, input_kind, jit_compile, model_dir, records_dir,
                   global_batch, num_replicas):
  return config_lib.build_config(
      "cpu_demo", model_dir=model_dir,
      dataset="imagenet" if input_kind == "tfrecord" else "synthetic",
      data_dir=records_dir if input_kind == "tfrecord" else None,
      image_size=args.image_size, num_classes=args.num_classes,
      resnet_depth=args.resnet_depth, resnet_width=64, train_batch_size=global_batch,
      eval_batch_size=global_batch, bn_group_size=args.bn_group_size,
      torus_shape=topology.most_square_grid(num_replicas), allreduce="torus",
      precision=args.precision, jit_compile=jit_compile,
      train_steps=args.warmup_steps, log_every_steps=1, checkpoint_every_steps=10**6,
      num_cpu_devices=CPU_SMOKE_REPLICAS)


def compiled_keras_model(args, strategy, arm, jit_compile):
  """The Keras or Model Garden ResNet, compiled for `fit` with the strategy's all-reduce."""
  tf_keras.mixed_precision.set_global_policy(args.precision)
  shape = (args.image_size, args.image_size, 3)
  with strategy.scope():
    if arm == "garden":
      from official.vision.modeling import backbones
      from official.vision.modeling import classification_model
      input_specs = tf_keras.layers.InputSpec(shape=[None, *shape])
      backbone = backbones.ResNet(model_id=args.resnet_depth, input_specs=input_specs)
      model = classification_model.ClassificationModel(
          backbone, num_classes=args.num_classes, input_specs=input_specs)
    elif args.resnet_depth == 50:
      model = tf_keras.applications.ResNet50(
          weights=None, input_shape=shape, classes=args.num_classes,
          classifier_activation=None)
    else:
      model = resnet_model.build_resnet_for_depth(
          args.resnet_depth, num_classes=args.num_classes, image_size=args.image_size)
    optimizer = tf_keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    if args.precision == "mixed_float16":
      optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile)
  return model


class _StepTimes(tf_keras.callbacks.Callback):
  """Seconds between consecutive batch ends: each step after the first."""

  def __init__(self, sink):
    super().__init__()
    self.sink = sink
    self.last = None

  def on_train_begin(self, logs=None):
    self.last = None

  def on_train_batch_end(self, batch, logs=None):
    now = time.perf_counter()
    if self.last is not None:
      self.sink.append(now - self.last)
    self.last = now


class _TrainerStepTimes(logging_lib.Handler):
  """The trainer's own per-loop progress lines ("... 0.123 s/step"), one loop a step."""

  def __init__(self, sink):
    super().__init__()
    self.sink = sink
    self.capturing = False

  def emit(self, record):
    match = re.search(r"([0-9.]+) s/step", record.getMessage())
    if match and self.capturing:
      self.sink.append(float(match.group(1)))


def _error_summary(error):
  """The error's type and its last informative line (TF puts the cause last)."""
  lines = [line.strip() for line in str(error).splitlines()
           if line.strip() and not line.strip().startswith(("File ", "[[", "Cf. "))]
  cause = next((line for line in reversed(lines) if "Op:__inference" not in line), "")
  return f"{type(error).__name__}: {cause[:240]}"


def build_arm(args, arm, strategy, input_kind, jit_compile, work_dir, records_dir,
              global_batch, trainer_log):
  """Builds one arm, runs its warm-up steps; returns run(steps) -> step seconds."""
  tag = f"{arm}_{input_kind}_xla{int(jit_compile)}"
  config = trainer_config(args, input_kind, jit_compile, os.path.join(work_dir, tag),
                          records_dir, global_batch, strategy.num_replicas_in_sync)
  if arm == "trainer":
    trainer = run_lib.build_trainer(config, strategy)
    trainer.train()

    def run_trainer(steps):
      del trainer_log.sink[:]
      trainer.extend_run(steps)
      trainer_log.capturing = True
      try:
        trainer.train()
      finally:
        trainer_log.capturing = False
      return list(trainer_log.sink[1:])  # the first loop also starts the input stream
    return run_trainer

  # The same stream as the trainer's, through the same pipeline.
  data = data_sources.data_source_for(config.data, config.loop,
                                      scratch_dir=os.path.join(work_dir, tag))
  model = compiled_keras_model(args, strategy, arm, jit_compile)

  def keras_input():
    return tf_keras.utils.experimental.DatasetCreator(
        lambda context: data.make_train_dataset(context, 0),
        input_options=data.input_options)

  model.fit(keras_input(), epochs=1, steps_per_epoch=args.warmup_steps, verbose=0)

  def run_keras(steps):
    seconds = []
    model.fit(keras_input(), epochs=1, steps_per_epoch=steps, verbose=0,
              callbacks=[_StepTimes(seconds)])
    return seconds
  return run_keras


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--resnet_depth", type=int, default=50)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--per_replica_batch", type=int, default=128)
  parser.add_argument("--precision", default="mixed_float16",
                      choices=("mixed_float16", "mixed_bfloat16", "float32"))
  parser.add_argument("--bn_group_size", type=int, default=1)
  parser.add_argument("--inputs", default="synthetic,tfrecord")
  parser.add_argument("--xla", default="off,on")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--num_examples", type=int, default=2048,
                      help="photo crops written as TFRecords for the tfrecord input")
  parser.add_argument("--warmup_steps", type=int, default=2)
  parser.add_argument("--steps", type=int, default=20, help="steps per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--cpu_smoke", action="store_true",
                      help="2 logical CPUs instead of GPUs: checks the script runs")
  args = parser.parse_args(argv)
  inputs = [name for name in args.inputs.split(",") if name]
  xla_settings = [{"off": False, "on": True}[name] for name in args.xla.split(",")]
  arms = [name for name in args.arms.split(",") if name]

  # Before any op: the CPU splits only once.
  strategies = {jit_compile: make_strategy(args.cpu_smoke, jit_compile)
                for jit_compile in xla_settings}
  logging.set_verbosity(logging.ERROR)
  tf.get_logger().setLevel("ERROR")
  device = "logical CPU" if args.cpu_smoke else "GPU"
  replicas = sorted({s.num_replicas_in_sync for s in strategies.values()})
  print(f"ResNet-{args.resnet_depth} at {args.image_size}x{args.image_size}, "
        f"{args.precision}, batch {args.per_replica_batch} per replica on "
        f"{' or '.join(map(str, replicas))} {device}(s); {args.rounds} "
        f"alternating rounds of {args.steps} steps per arm"
        + ("; CPU SMOKE RUN: not an accelerator figure" if args.cpu_smoke else ""),
        flush=True)

  work_dir = tempfile.mkdtemp(prefix="accelerator_benchmark_")
  records_dir = None
  if "tfrecord" in inputs:
    started = time.perf_counter()
    records_dir = write_photo_records(work_dir, args.num_examples, args.num_classes)
    print(f"  wrote {args.num_examples} photo crops as JPEG TFRecords in "
          f"{time.perf_counter() - started:.0f} s", flush=True)

  trainer_log = _TrainerStepTimes([])
  absl_logger = logging_lib.getLogger("absl")
  absl_logger.addHandler(trainer_log)
  absl_logger.propagate = False  # keep the trainer's progress lines off the console
  absl_logger.setLevel(logging_lib.INFO)

  results = {}  # (arm, input, xla) -> images/s per accelerator
  for input_kind in inputs:
    for jit_compile in xla_settings:
      strategy = strategies[jit_compile]
      num_accelerators = strategy.num_replicas_in_sync
      global_batch = args.per_replica_batch * num_accelerators
      runs = {}
      for arm in arms:
        started = time.perf_counter()
        try:
          runs[arm] = build_arm(args, arm, strategy, input_kind, jit_compile, work_dir,
                                records_dir, global_batch, trainer_log)
          print(f"  {arm:>7} {input_kind} xla={'on' if jit_compile else 'off'}: built "
                f"and warmed up in {time.perf_counter() - started:.0f} s", flush=True)
        except Exception as e:  # pylint: disable=broad-except
          print(f"  {arm:>7} {input_kind} xla={'on' if jit_compile else 'off'}: FAILED "
                f"to build: {_error_summary(e)}",
                flush=True)
      step_seconds = {arm: [] for arm in runs}
      for round_index in range(args.rounds):
        for arm in list(runs):
          try:
            seconds = runs[arm](args.steps)
          except Exception as e:  # pylint: disable=broad-except
            print(f"  {arm:>7}: FAILED in round {round_index + 1}: "
                  f"{_error_summary(e)}", flush=True)
            del runs[arm], step_seconds[arm]
            continue
          step_seconds[arm].extend(seconds)
          if seconds:
            print(f"  round {round_index + 1} {arm:>7}: {statistics.median(seconds):.3f} "
                  f"s/step median of {len(seconds)}", flush=True)
      for arm, seconds in step_seconds.items():
        if seconds:
          results[(arm, input_kind, jit_compile)] = (
              global_batch / statistics.median(seconds) / num_accelerators)

  print(f"images/s per {device}, median step after the first of each round:")
  header = "  ".join(f"{arm:>9}" for arm in arms)
  print(f"  {'input':>9}  {'xla':>3}  {header}")
  for input_kind in inputs:
    for jit_compile in xla_settings:
      cells = "  ".join(
          f"{results[(arm, input_kind, jit_compile)]:9.1f}"
          if (arm, input_kind, jit_compile) in results else f"{'-':>9}" for arm in arms)
      print(f"  {input_kind:>9}  {'on' if jit_compile else 'off':>3}  {cells}")
  trainer_results = {key: value for key, value in results.items() if key[0] == "trainer"}
  real = {key: value for key, value in trainer_results.items() if key[1] == "tfrecord"}
  best = real or trainer_results
  if not best:
    raise SystemExit("the trainer arm did not run; no figure to report")
  (_, input_kind, jit_compile), value = max(best.items(), key=lambda item: item[1])
  print(f"best trainer configuration: {input_kind} input, XLA "
        f"{'on' if jit_compile else 'off'}"
        + (" (CPU smoke run)" if args.cpu_smoke else ""))
  print(f"images_per_s_per_accelerator: {value:.1f}")


if __name__ == "__main__":
  main()
