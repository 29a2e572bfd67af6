"""End-to-end training images/s: the project's trainer against plain tf_keras ResNet50.

Both sides run under the same `MirroredStrategy` over 8 logical CPUs, on the same data
(the digits as JPEG TFRecords, read and decoded by the project's input pipeline at
`--image_size`, default 32, the smallest input `tf_keras.applications.ResNet50`
accepts), with the same global batch:

* trainer: `build_trainer` from the `cpu_demo` preset with ResNet-50: grouped sync
  batch norm over neighbouring pairs (`bn_group_size` 2 on the 2x4 torus), the 2-D
  torus gradient all-reduce and the input pipeline, driven by `Trainer.train()`.
* keras: `tf_keras.applications.ResNet50(weights=None)` compiled with momentum SGD and
  trained with `model.fit` (per-replica fused batch norm, the strategy's all-reduce).

Each side is first run once to trace and compile (excluded). Then the sides alternate,
`--rounds` times, each round a fresh call of `--steps_per_round` steps timed by the wall
clock: for the trainer one `Trainer.train()` call (which also restores its checkpoint,
rebuilds the input stream and saves a checkpoint at the end), for Keras one `fit` call
(which rebuilds its input stream). The median round gives each side's images/s. Last
line: `trainer_vs_keras: <trainer images/s / keras images/s>x`.

`--compare=updates` instead times whole LARS steps of four trainers built alike but
for the summation and the update: the torus with every replica updating every weight
("unsharded"), the torus with the update sharded over x ("sharded_x") and over x and
y ("sharded", `xy`, the default with the torus), each with the overlap of summation
and backprop, and the strategy's all-reduce packed into the same buffers
("packed_strategy"). Per-step times come from the trainer's own progress lines, each
call's first step left out; it prints the optimizer-slot bytes per replica of each,
each round's two headline ratios (the spread says how much a run's ratio can be
trusted), the two ratios for `sharded_x`, then
`torus_step_vs_packed_strategy_step: <sharded / packed strategy>x` and, last, `sharded_update_speedup: <unsharded / sharded>x`.

Grappler is off by default, for both sides: rewriting the graph of 8 replicas of
ResNet-50 takes minutes on two cores. `--grappler` turns it back on.

    .venv/bin/python benchmarks/train_step.py [--rounds 5] [--steps_per_round 6] [--global_batch 32]
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
import tensorflow as tf
import tf_keras
from absl import logging

from training import config as config_lib
from training import data_sources
from training import run as run_lib
from training import strategy as strategy_lib

NUM_REPLICAS = 8


def build_project_trainer(args, strategy, model_dir, data_root, **overrides):
  """The project's trainer on the digits written once under `data_root`."""
  settings = dict(
      model_dir=model_dir, image_size=args.image_size,
      resnet_depth=50, resnet_width=64, train_batch_size=args.global_batch,
      eval_batch_size=args.global_batch, bn_group_size=2, torus_shape=(2, 4),
      allreduce="torus", train_steps=args.warmup_steps, log_every_steps=1,
      checkpoint_every_steps=10**6)
  settings.update(overrides)
  config = config_lib.build_config("cpu_demo", **settings)
  data = data_sources.data_source_for(config.data, config.loop, scratch_dir=data_root)
  return data, run_lib.build_trainer(config, strategy, data=data)


# --compare=updates: whole LARS steps of trainers that differ only in how the
# gradients are summed and the weights updated. "sharded" is the default with the
# torus (--shard_weight_update=auto).
UPDATE_CONTENDERS = {
    "unsharded": dict(allreduce="torus", shard_weight_update="off"),
    "sharded_x": dict(allreduce="torus", shard_weight_update="x"),
    "sharded": dict(allreduce="torus", shard_weight_update="xy"),
    "packed_strategy": dict(allreduce="strategy", shard_weight_update="off"),
}


def optimizer_slot_bytes(trainer):
  """Bytes of optimizer slots one replica works with (a sharded update's shards)."""
  optimizer = trainer.model.optimizer
  if hasattr(optimizer, "slot_bytes_per_replica"):
    return optimizer.slot_bytes_per_replica()["shards"]
  return sum(v.shape.num_elements() * v.dtype.size for v in optimizer.variables()
             if v is not optimizer.iterations)


def compare_updates(args, strategy, work_dir):
  """Times whole steps of UPDATE_CONTENDERS side by side; prints the two ratios."""
  # Per contender, one list of step times per round.
  step_seconds = {name: [] for name in UPDATE_CONTENDERS}
  active = {"name": None}

  class StepTimes(logging_lib.Handler):
    def emit(self, record):
      match = re.search(r"([0-9.]+) s/step", record.getMessage())
      if match and active["name"]:
        step_seconds[active["name"]][-1].append(float(match.group(1)))

  absl_logger = logging_lib.getLogger("absl")
  absl_logger.addHandler(StepTimes())
  absl_logger.propagate = False
  absl_logger.setLevel(logging_lib.INFO)

  trainers = {}
  for name, overrides in UPDATE_CONTENDERS.items():
    started = time.perf_counter()
    _, trainers[name] = build_project_trainer(
        args, strategy, os.path.join(work_dir, name), work_dir, optimizer="lars",
        **overrides)
    trainers[name].train()
    print(f"  {name}: built, traced and ran {args.warmup_steps} steps in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
  for _ in range(args.rounds):
    for name, trainer in trainers.items():
      trainer.extend_run(args.steps_per_round)
      active["name"] = name
      step_seconds[name].append([])
      trainer.train()
      active["name"] = None
      del step_seconds[name][-1][0]  # the call's first step also starts the input
  all_steps = {name: sum(rounds, []) for name, rounds in step_seconds.items()}
  medians = {name: statistics.median(steps) for name, steps in all_steps.items()}
  for name, trainer in trainers.items():
    print(f"  {name:>15}: {medians[name]:.3f} s/step (median of "
          f"{len(all_steps[name])} steps), optimizer slots "
          f"{optimizer_slot_bytes(trainer):,} bytes per replica", flush=True)
  # The machine's speed drifts between rounds by more than the contenders differ
  # within one: each round's ratio, of contenders timed minutes apart at most,
  # shows whether a headline ratio holds round by round.
  for label, numerator, denominator in (("sharded/packed_strategy", "sharded",
                                         "packed_strategy"),
                                        ("unsharded/sharded", "unsharded",
                                         "sharded")):
    ratios = [statistics.median(a) / statistics.median(b) for a, b in
              zip(step_seconds[numerator], step_seconds[denominator])]
    print(f"  per round, {label}: " + ", ".join(f"{r:.2f}x" for r in ratios))
  print("sharded_x_step_vs_packed_strategy_step: "
        f"{medians['sharded_x'] / medians['packed_strategy']:.2f}x")
  print("sharded_x_update_speedup: "
        f"{medians['unsharded'] / medians['sharded_x']:.2f}x")
  print("torus_step_vs_packed_strategy_step: "
        f"{medians['sharded'] / medians['packed_strategy']:.2f}x")
  print(f"sharded_update_speedup: {medians['unsharded'] / medians['sharded']:.2f}x")


def build_keras_model(args, strategy):
  with strategy.scope():
    model = tf_keras.applications.ResNet50(
        weights=None, input_shape=(args.image_size, args.image_size, 3), classes=10)
    model.compile(
        optimizer=tf_keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(),
        metrics=[tf_keras.metrics.SparseCategoricalAccuracy(name="top1")])
  return model


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--global_batch", type=int, default=32)
  parser.add_argument("--warmup_steps", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps_per_round", type=int, default=6)
  parser.add_argument("--grappler", action="store_true",
                      help="keep grappler's graph rewrites (minutes per model)")
  parser.add_argument("--compare", choices=("keras", "updates"), default="keras",
                      help="keras: the trainer against plain Keras; updates: LARS "
                      "steps unsharded, sharded and with the packed strategy "
                      "all-reduce")
  args = parser.parse_args(argv)

  # Before any TensorFlow op: the CPU can be split only once per process.
  strategy_lib.split_cpu(NUM_REPLICAS)
  logging.set_verbosity(logging.ERROR)
  tf.get_logger().setLevel("ERROR")  # AutoGraph notes about the pipeline's lambdas
  if not args.grappler:
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
  strategy = tf.distribute.MirroredStrategy(
      [f"/cpu:{i}" for i in range(NUM_REPLICAS)])

  print(f"ResNet-50, digits TFRecords at {args.image_size}x{args.image_size} through "
        f"the project's input pipeline, global batch {args.global_batch} over "
        f"{NUM_REPLICAS} logical CPUs; {args.rounds} alternating rounds of "
        f"{args.steps_per_round} steps per side; grappler "
        f"{'on' if args.grappler else 'off'}", flush=True)
  work_dir = tempfile.mkdtemp(prefix="train_step_")
  if args.compare == "updates":
    compare_updates(args, strategy, work_dir)
    return
  started = time.perf_counter()
  data, trainer = build_project_trainer(
      args, strategy, os.path.join(work_dir, "trainer"), work_dir)
  trainer.train()
  print(f"  trainer: built, traced and ran {args.warmup_steps} steps in "
        f"{time.perf_counter() - started:.0f} s", flush=True)

  # The same data, through the same pipeline, for the plain Keras model. Its pixels
  # arrive as uint8 and Keras only casts them, while the project's model also
  # normalises them on the device: the baseline does a little less work per step.
  def keras_input():
    return tf_keras.utils.experimental.DatasetCreator(
        lambda context: data.make_train_dataset(context, 0),
        input_options=data.input_options)

  started = time.perf_counter()
  keras_model = build_keras_model(args, strategy)
  keras_model.fit(keras_input(), epochs=1, steps_per_epoch=args.warmup_steps, verbose=0)
  print(f"  keras:   built, traced and ran {args.warmup_steps} steps in "
        f"{time.perf_counter() - started:.0f} s", flush=True)

  step_seconds = {"trainer": [], "keras": []}

  class TrainerStepTimes(logging_lib.Handler):
    """Collects the seconds per step of the trainer's own per-loop progress lines."""

    def emit(self, record):
      match = re.search(r"([0-9.]+) s/step", record.getMessage())
      if match and capture["on"]:
        step_seconds["trainer"].append(float(match.group(1)))

  capture = {"on": False}
  absl_logger = logging_lib.getLogger("absl")
  absl_logger.addHandler(TrainerStepTimes())
  absl_logger.propagate = False  # keep the progress lines off the console
  absl_logger.setLevel(logging_lib.INFO)

  class KerasStepTimes(tf_keras.callbacks.Callback):
    """The same measurement for Keras: wall time of each one-step loop."""

    def on_epoch_begin(self, epoch, logs=None):
      self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      step_seconds["keras"].append(time.perf_counter() - self.started)

  def run_trainer():
    trainer.extend_run(args.steps_per_round)
    capture["on"] = True
    trainer.train()
    capture["on"] = False

  def run_keras():
    # Loops of one step, like the trainer's (log_every_steps=1).
    keras_model.fit(keras_input(), epochs=args.steps_per_round, steps_per_epoch=1,
                    callbacks=[KerasStepTimes()], verbose=0)

  images = args.steps_per_round * args.global_batch
  rates = {"trainer": [], "keras": []}
  steady = {"trainer": [], "keras": []}
  for round_index in range(args.rounds):
    for name, run in (("trainer", run_trainer), ("keras", run_keras)):
      del step_seconds[name][:]
      round_started = time.perf_counter()
      run()
      seconds = time.perf_counter() - round_started
      rates[name].append(images / seconds)
      # The first step of a call also starts the input stream: left out of steady state.
      steady[name].extend(step_seconds[name][1:])
      print(f"  round {round_index + 1} {name:>7}: {images / seconds:6.1f} images/s "
            f"for the whole call ({seconds:.1f} s); steps after the first "
            f"{statistics.median(step_seconds[name][1:]):.3f} s median", flush=True)

  medians = {name: statistics.median(values) for name, values in rates.items()}
  steady_rates = {name: args.global_batch / statistics.median(values)
                  for name, values in steady.items()}
  for name, values in rates.items():
    print(f"{name:>8}: {steady_rates[name]:6.1f} images/s in steady state (median of "
          f"{len(steady[name])} steps); {medians[name]:6.1f} images/s per whole call "
          f"(median of {len(values)}, range {min(values):.1f}-{max(values):.1f})")
  print(f"whole calls, trainer/keras: {medians['trainer'] / medians['keras']:.3f}x "
        "(the trainer's calls also restore and save a checkpoint)")
  print(f"trainer_vs_keras: {steady_rates['trainer'] / steady_rates['keras']:.3f}x")


if __name__ == "__main__":
  main()
