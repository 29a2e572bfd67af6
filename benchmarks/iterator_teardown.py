"""How long deleting a distributed dataset iterator takes, with and without autotuning
in the per-device copy buffers (input_pipeline/device_buffers.py).

A MirroredStrategy over 8 logical CPUs reads a trivial pipeline (a parallel map and an
autotuned prefetch, the shape of the project's) for `--seconds`, then the iterator is
deleted, as Keras deletes its iterators at the end of every `fit` and `evaluate`. Each
arm runs in a process of its own, since the wrapper is installed process-wide. Prints
the seconds (wall and CPU) each deletion took, and `teardown_untuned_vs_tensorflow`.

    .venv/bin/python benchmarks/iterator_teardown.py [--seconds 15]
"""

import argparse
import gc
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

NUM_REPLICAS = 8


def _cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure(untuned: bool, seconds: float):
  """One arm, in this process: prints `<steps> <wall s> <cpu s>` of the deletion."""
  from tests import logical_devices  # pylint: disable=g-import-not-at-top
  logical_devices.configure_logical_cpus(NUM_REPLICAS)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from input_pipeline import device_buffers  # pylint: disable=g-import-not-at-top
  if untuned:
    device_buffers.untune_cpu_device_buffers()
  strategy = logical_devices.cpu_mirrored_strategy(NUM_REPLICAS)

  def dataset_fn(unused_context):
    return (tf.data.Dataset.range(1 << 40)
            .map(lambda x: tf.cast(x, tf.float32) * 2.0,
                 num_parallel_calls=tf.data.AUTOTUNE)
            .batch(4).prefetch(tf.data.AUTOTUNE))

  distributed = strategy.distribute_datasets_from_function(
      dataset_fn, tf.distribute.InputOptions(experimental_fetch_to_device=True))
  iterator = iter(distributed)

  @tf.function
  def step(iterator):
    return strategy.run(lambda batch: tf.reduce_sum(batch), args=(next(iterator),))  # pylint: disable=unnecessary-lambda

  start, steps = time.monotonic(), 0
  while time.monotonic() - start < seconds:
    step(iterator)
    steps += 1
  wall, cpu = time.monotonic(), _cpu_seconds()
  del iterator
  gc.collect()
  print(steps, time.monotonic() - wall, _cpu_seconds() - cpu)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=15.0,
                      help="how long each arm reads before its iterator is deleted")
  parser.add_argument("--arm", choices=("tensorflow", "untuned"),
                      help=argparse.SUPPRESS)  # one arm, in a child process
  args = parser.parse_args(argv)
  if args.arm:
    measure(args.arm == "untuned", args.seconds)
    return
  walls = {}
  for arm in ("tensorflow", "untuned"):
    out = subprocess.run([sys.executable, __file__, f"--arm={arm}",
                          f"--seconds={args.seconds}"], check=True,
                         capture_output=True, text=True).stdout.split()
    steps, wall, cpu = int(out[-3]), float(out[-2]), float(out[-1])
    walls[arm] = wall
    print(f"{arm:>10}: {steps} steps in {args.seconds:g} s, then deleting the "
          f"iterator took {wall:.1f} s ({cpu:.1f} s CPU)", flush=True)
  print(f"teardown_untuned_vs_tensorflow: {walls['untuned'] / walls['tensorflow']:.3f}x")


if __name__ == "__main__":
  main()
