"""Times one optimizer step with and without weight-update sharding.

Both steps take the same per-replica gradients, shaped like ResNet-50 v1.5's
variables (161 tensors, 25,557,032 float32 values), under one MirroredStrategy over 8
logical CPUs, alternating round by round so that both see the same machine state:

* unsharded: the optimizer (tf_keras SGD or Model Garden LARS) with the torus
  aggregator as its `gradient_aggregator`: reduce-scatter x, all-reduce y,
  all-gather x of the gradients, then every replica updates every weight;
* sharded: the same optimizer's sharded twin: reduce-scatter x (and y with
  `--shards=xy`), update the shard, all-gather the weights.

Prints the median step time of each and the optimizer slot bytes one replica holds,
then, last, `sharded_update_speedup: <ratio>x`.

    .venv/bin/python benchmarks/sharded_update.py [--optimizer lars] [--shards x]
        [--grid 2x4] [--rounds 5]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from benchmarks.allreduce import median_times  # pylint: disable=g-import-not-at-top

NUM_REPLICAS = 8


def resnet50_variables(strategy):
  """Variables shaped and named like ResNet-50's (kernels decayed, vectors not)."""
  from benchmarks.allreduce import resnet50_variable_shapes  # pylint: disable=g-import-not-at-top
  with strategy.scope():
    return [tf.Variable(tf.fill(shape, 0.01),
                        name=f"layer{i}/{'kernel' if len(shape) > 1 else 'beta'}")
            for i, shape in enumerate(resnet50_variable_shapes())]


def make_step(strategy, optimizer, variables):
  """A tf.function applying fixed, replica-dependent gradients once."""
  with strategy.scope():
    optimizer._create_all_weights(variables)  # pylint: disable=protected-access

  @tf.function
  def step():
    def replica_step():
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      scale = 1e-3 * tf.cast(replica + 1, tf.float32)
      grads = [tf.fill(v.shape, scale) for v in variables]
      optimizer.apply_gradients(zip(grads, variables))
    strategy.run(replica_step)
  return step


def unsharded_slot_bytes(optimizer, variables):
  return sum(optimizer.get_slot(v, name).shape.num_elements() * 4
             for v in variables for name in optimizer.get_slot_names())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--optimizer", choices=("sgd", "lars"), default="lars")
  parser.add_argument("--shards", choices=("x", "xy"), default="x")
  parser.add_argument("--grid", default="2x4")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)

  from tests import logical_devices  # pylint: disable=g-import-not-at-top
  from allreduce import torus_aggregator  # pylint: disable=g-import-not-at-top
  from allreduce.topology import TorusTopology, parse_grid  # pylint: disable=g-import-not-at-top
  from training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from training import sharded_optimizer  # pylint: disable=g-import-not-at-top

  strategy = logical_devices.cpu_mirrored_strategy(NUM_REPLICAS)
  grid = TorusTopology(*parse_grid(args.grid))
  learning_rate = 0.1
  with strategy.scope():
    unsharded = optimizer_lib.build_optimizer(
        args.optimizer, learning_rate, weight_decay=1e-4,
        gradient_aggregator=torus_aggregator.make_torus_aggregator(grid))
    sharded = sharded_optimizer.build_sharded_optimizer(
        args.optimizer, learning_rate,
        sharded_optimizer.WeightUpdateSharding(grid, shards=args.shards),
        weight_decay=1e-4)
  unsharded_variables = resnet50_variables(strategy)
  sharded_variables = resnet50_variables(strategy)
  steps = {"unsharded": make_step(strategy, unsharded, unsharded_variables),
           "sharded": make_step(strategy, sharded, sharded_variables)}
  for name, step in steps.items():
    start = time.perf_counter()
    step()
    print(f"{name}: first step (trace + run) {time.perf_counter() - start:.1f} s",
          flush=True)

  medians, times = median_times(steps, args.rounds, warmups=0)
  num_values = sum(v.shape.num_elements() for v in unsharded_variables)
  print(f"{args.optimizer}, grid {grid}, shards={args.shards}, {num_values:,} "
        f"values, {NUM_REPLICAS} replicas, median of {args.rounds} rounds")
  for name in steps:
    print(f"  {name:9s} step {medians[name]:.3f} s  "
          f"({', '.join(f'{t:.3f}' for t in times[name])})")
  slots = sharded.slot_bytes_per_replica()
  print(f"  slot bytes per replica: unsharded "
        f"{unsharded_slot_bytes(unsharded, unsharded_variables):,}; sharded "
        f"{slots['shards']:,} working + {slots['checkpoint_views']:,} checkpoint "
        "views")
  print(f"sharded_update_speedup: {medians['unsharded'] / medians['sharded']:.2f}x")


if __name__ == "__main__":
  main()
