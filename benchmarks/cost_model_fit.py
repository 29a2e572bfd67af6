"""Fits the cost model's alpha and beta to measured CPU all-reduces, then predicts a
grid it was not fitted on.

Times the torus aggregator on 8 logical CPUs for every grid in `--fit_grids` and
`--held_out_grid`, each at two payloads (ResNet-50 v1.5's 161 gradient tensors, and the
same list at 1/`--small_divisor` of the size), alternating run by run. The model's
counts are those of the packs the aggregator really plans (`plan`), priced per pack
with `cost_model.torus_allreduce_counts(backend="collective_ops")`, which counts each
pack's reduce-scatter as the 2 (x - 1) pair broadcasts the CPU back end issues.
alpha (seconds per collective op), beta (seconds per byte sent) and a cost per tensor
(packing and unpacking, the same on every grid) are fitted on the fit grids only
(`cost_model.fit_alpha_beta`); the held-out grid is then predicted.

Also prints, from the same model at pod scale, the step time that sharding ResNet-50's
LARS update saves on a 32x32 TPU v3 pod (`cost_model.sharded_update_saving_s`).

Last line: `held_out_prediction_error: <percent>%` (target: within 25%).

    .venv/bin/python benchmarks/cost_model_fit.py [--runs 5]
"""

import argparse
import functools
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from benchmarks.allreduce import median_times  # pylint: disable=g-import-not-at-top

NUM_REPLICAS = 8


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fit_grids", default="1x8,8x1,2x4")
  parser.add_argument("--held_out_grid", default="4x2")
  parser.add_argument("--small_divisor", type=int, default=32)
  parser.add_argument("--runs", type=int, default=5)
  args = parser.parse_args(argv)

  # pylint: disable=g-import-not-at-top
  from tests import logical_devices
  import allreduce
  from allreduce import cost_model
  from allreduce import collectives
  from allreduce.topology import parse_grid
  from benchmarks.allreduce import resnet50_variable_shapes
  # pylint: enable=g-import-not-at-top

  strategy = logical_devices.cpu_mirrored_strategy(NUM_REPLICAS)
  full = [tf.TensorShape(s).num_elements() for s in resnet50_variable_shapes()]
  payloads = {"resnet50": full,
              f"resnet50/{args.small_divisor}": [max(1, n // args.small_divisor)
                                                 for n in full]}
  grids = args.fit_grids.split(",") + [args.held_out_grid]

  def make_gradients(sizes):
    def per_replica(context):
      seed = context.replica_id_in_sync_group
      return tuple(tf.random.stateless_uniform([n], seed=[seed, i])
                   for i, n in enumerate(sizes))
    return strategy.experimental_distribute_values_from_function(per_replica)

  contenders = {}  # (grid, payload) -> (function, gradients, per-pack counts)
  # The packs as the back end that runs them has them cut (whole-tensor chunks off
  # NCCL): the model is priced on the same buffers.
  uneven_chunks = collectives.backend_for_strategy(strategy).exchanges_uneven_chunks
  for grid in grids:
    x, y = parse_grid(grid)
    aggregator = allreduce.make_torus_aggregator((x, y))
    for payload, sizes in payloads.items():
      packs = aggregator.plan([([n], tf.float32) for n in sizes],
                              uneven_chunks=uneven_chunks)
      counts = [cost_model.torus_allreduce_counts(x, y, pack.length * 4,
                                                  backend="collective_ops")
                for pack in packs]

      @tf.function
      def aggregate(grads, aggregator=aggregator):
        return strategy.run(lambda *g: aggregator.all_reduce(list(g)), args=grads)
      contenders[(grid, payload)] = (aggregate, make_gradients(sizes), counts)

  def run(function, gradients):
    strategy.experimental_local_results(function(gradients))[0][0].numpy()

  medians, _ = median_times(
      {key: functools.partial(run, function, gradients)
       for key, (function, gradients, _) in contenders.items()}, args.runs)

  num_tensors = {payload: len(sizes) for payload, sizes in payloads.items()}
  fit = cost_model.fit_alpha_beta(
      [(contenders[key][2], num_tensors[key[1]], medians[key]) for key in contenders
       if key[0] != args.held_out_grid], per_tensor=True)
  print(f"torus aggregator on {NUM_REPLICAS} logical CPUs ({os.cpu_count()} cores), "
        f"median of {args.runs} runs; fitted on {args.fit_grids}:")
  print(f"  alpha {fit.seconds_per_call * 1e3:.3f} ms per collective op, "
        f"beta {fit.seconds_per_byte * 1e9:.3f} ns per byte sent "
        f"({1 / fit.seconds_per_byte / 1e9 if fit.seconds_per_byte > 0 else 0:.2f} "
        "GB/s), "
        f"{fit.seconds_per_tensor * 1e3:.3f} ms per tensor")
  held_out_errors = []
  for (grid, payload), (_, _, counts) in contenders.items():
    predicted = fit.predict(counts, num_tensors[payload])
    error = predicted / medians[(grid, payload)] - 1
    role = "held out" if grid == args.held_out_grid else "fitted"
    if grid == args.held_out_grid:
      held_out_errors.append(abs(error))
    print(f"  {grid:>4} {payload:>12} ({len(counts)} packs, "
          f"{sum(c.collective_calls for c in counts)} ops, "
          f"{sum(c.bytes_sent for c in counts) / 2**20:7.1f} MiB sent): measured "
          f"{medians[(grid, payload)] * 1e3:8.1f} ms, predicted {predicted * 1e3:8.1f} "
          f"ms ({error:+.0%}, {role})")
  saving = cost_model.sharded_update_saving_s(cost_model.RESNET50_NUM_PARAMETERS,
                                              cost_model.TPU_V3_POD_GRID[0])
  print(f"TPU v3 pod, 32x32: sharding ResNet-50's LARS update over x saves "
        f"{saving * 1e3:.2f} ms per step (memory-bound update at "
        f"{cost_model.TPU_V3_HBM_BYTES_PER_S / 1e9:.0f} GB/s HBM)")
  print(f"held_out_prediction_error: {max(held_out_errors):.0%}")


if __name__ == "__main__":
  main()
