"""Times the torus gradient aggregator against the strategy's own all-reduce.

All sum the same per-replica gradients, shaped like ResNet-50 v1.5's variables
(25,557,032 float32 values), under one MirroredStrategy over 8 logical CPUs, in one
process, alternating run by run so that all see the same machine state. The
strongest baseline is the strategy told to pack like the torus does
(`CommunicationOptions(bytes_per_pack=)` with the aggregator's pack size). Prints the
median of several runs of each, `torus_vs_strategy: <ratio>x` against the unpacked
strategy (Keras' default aggregator packs nothing) and, last,
`torus_vs_packed_strategy: <ratio>x`.

    .venv/bin/python benchmarks/allreduce.py [--grids 2x4,1x8] [--runs 7]

The first grid listed gives the ratio on the last line.
"""

import argparse
import functools
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Mapping, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # pylint: disable=g-import-not-at-top

NUM_REPLICAS = 8
RESNET50_NUM_VALUES = 25_557_032


def resnet50_variable_shapes():
  """ResNet-50 v1.5's trainable variables in model order (the gradient list).

  Convolutions have no bias (batch norm follows each); every batch norm has a gamma
  and a beta. 161 tensors, 25,557,032 values.
  """
  shapes = []

  def conv_bn(kernel, cin, cout):
    shapes.append((kernel, kernel, cin, cout))
    shapes.extend([(cout,)] * 2)  # gamma, beta

  conv_bn(7, 3, 64)
  cin = 64
  for blocks, width in ((3, 64), (4, 128), (6, 256), (3, 512)):
    for block in range(blocks):
      if block == 0:
        conv_bn(1, cin, 4 * width)  # projection shortcut
      conv_bn(1, cin, width)
      conv_bn(3, width, width)  # v1.5: the stride sits on the 3x3 conv
      conv_bn(1, width, 4 * width)
      cin = 4 * width
  shapes.extend([(2048, 1000), (1000,)])
  return shapes


def median_times(functions: Mapping[str, Callable[[], object]], runs: int,
                 warmups: int = 2) -> Tuple[Dict[str, float], Dict[str, List[float]]]:
  """The benchmarks' one timing loop: times each of `functions` `runs` times,
  alternating; returns (medians, times).

  Every function runs once per round, round after round, so that all of them see the
  same machine state (on a shared 2-core host the load moves within a minute). Each
  runs `warmups` times first (tracing, first-run allocations), untimed. A function
  must return only once its work is done (e.g. by reading a value of its result).
  Both dicts are keyed like `functions`; `times` holds every run's seconds in order.
  (Here rather than in a module of its own: every file under benchmarks/ is a
  binary, and the other benchmarks already import this one.)
  """
  if runs < 1:
    raise ValueError(f"runs must be at least 1, got {runs}")
  for function in functions.values():
    for _ in range(warmups):
      function()
  times = {name: [] for name in functions}
  for _ in range(runs):
    for name, function in functions.items():
      start = time.perf_counter()
      function()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}, times


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--grids", default="2x4",
                      help="comma-separated torus shapes; the first gives the ratio")
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--pack_sizes_mb", default="",
                      help="comma-separated pack size caps in MiB to compare "
                      "(default: the aggregator's default)")
  args = parser.parse_args(argv)

  from tests import logical_devices  # pylint: disable=g-import-not-at-top
  import allreduce  # pylint: disable=g-import-not-at-top

  logical_devices.configure_logical_cpus(NUM_REPLICAS)
  strategy = logical_devices.cpu_mirrored_strategy(NUM_REPLICAS)
  shapes = resnet50_variable_shapes()
  num_values = sum(int(tf.TensorShape(s).num_elements()) for s in shapes)
  assert num_values == RESNET50_NUM_VALUES, num_values
  print(f"gradients: {len(shapes)} tensors, {num_values:,} float32 values "
        f"({num_values * 4 / 2**20:.1f} MiB) per replica, {NUM_REPLICAS} replicas "
        f"on {os.cpu_count()} cores")

  def make_gradients(context):
    seed = context.replica_id_in_sync_group
    return tuple(tf.random.stateless_uniform(s, seed=[seed, i], minval=-1.0)
                 for i, s in enumerate(shapes))

  gradients = strategy.experimental_distribute_values_from_function(make_gradients)

  @tf.function
  def strategy_sum(grads):
    return strategy.run(
        lambda *g: tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, list(g)), args=grads)

  def torus_sum_for(grid, pack_size_bytes):
    aggregator = allreduce.make_torus_aggregator(grid,
                                                 pack_size_bytes=pack_size_bytes)

    @tf.function
    def torus_sum(grads):
      return strategy.run(lambda *g: aggregator.all_reduce(list(g)), args=grads)
    return torus_sum

  # The headline baseline: the strategy told to pack like the torus does. Keras'
  # default aggregator calls all_reduce without options (one pack).
  packed = allreduce.make_packed_strategy_aggregator(allreduce.DEFAULT_PACK_SIZE_BYTES)

  @tf.function
  def strategy_packed_sum(grads):
    return strategy.run(
        lambda *g: [s for s, _ in packed([(t, None) for t in g])], args=grads)

  contenders = {"strategy": strategy_sum}
  grids = args.grids.split(",")
  pack_sizes = ([int(float(mb) * 2**20) for mb in args.pack_sizes_mb.split(",")]
                if args.pack_sizes_mb else [allreduce.DEFAULT_PACK_SIZE_BYTES])
  for grid in grids:
    for pack_size in pack_sizes:
      contenders[f"torus {grid} {pack_size / 2**20:g}MiB"] = torus_sum_for(
          grid, pack_size)
  first_torus = list(contenders)[1]
  contenders[f"strategy {allreduce.DEFAULT_PACK_SIZE_BYTES / 2**20:g}MiB packs"] = (
      strategy_packed_sum)

  # Warm up (trace, and first-run allocations) and check the torus sums agree.
  reference = None
  for name, fn in contenders.items():
    out = fn(gradients)
    out = fn(gradients)
    first = strategy.experimental_local_results(out)[NUM_REPLICAS - 1][0].numpy()
    if reference is None:
      reference = first
    else:
      error = abs(first - reference).max()
      assert error < 1e-4, f"{name} disagrees with the strategy by {error}"
    del out

  def run(fn):
    # The function returns when its ops have run; touching one value makes sure.
    strategy.experimental_local_results(fn(gradients))[0][0].numpy()

  # Warmed up above.
  medians, times = median_times(
      {name: functools.partial(run, fn) for name, fn in contenders.items()},
      args.runs, warmups=0)
  for name, t in times.items():
    print(f"{name:>20}: median {medians[name]:.3f} s over {len(t)} runs "
          f"(min {min(t):.3f}, max {max(t):.3f})")
  print(f"ratios from {first_torus}")
  print(f"torus_vs_strategy: {medians[first_torus] / medians['strategy']:.2f}x")
  packed = medians[list(contenders)[-1]]
  print(f"torus_vs_packed_strategy: {medians[first_torus] / packed:.2f}x")


if __name__ == "__main__":
  main()
