"""Times a ResNet-50 training step with batch-norm groups of 1, 2, 4 and 8 replicas.

One process, one MirroredStrategy over 8 logical CPUs (a 2x4 torus), one model per group
size, built by the same `make_batch_norm_factory` that `main.py` uses. The models take
turns, a few steps each, round after round, so that all of them see the same machine
state; each reports the median over rounds of its mean step time. A training step is
the whole thing a trainer runs: forward, backward (with the grouped moments' second
collective), gradient all-reduce and the SGD update.

Prints one line per group size with its time relative to group size 1, a reference
line for tf_keras' fused `BatchNormalization` (what the factory does *not* return for
group size 1, see `make_batch_norm_factory`) and, last,
`bn_group_overhead: <group 2 time / group 1 time>x`.

Grappler is off by default: rewriting the ~100k-op graph of 8 replicas of ResNet-50
takes about six minutes per model on two cores, and the comparison needs the same
settings for every model, not a particular set of graph rewrites. `--grappler` turns
it back on (expect a long wait).

Memory: each traced model (8 replicas' graphs, weights and optimizer slots) holds
about 5 GB here, so the default five models need about 25 GB; on a smaller or busy
machine run `--group_sizes 1,2 --no_fused_reference` (about 11 GB).

    .venv/bin/python benchmarks/batch_norm.py [--image_size 32] [--rounds 4]
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import tensorflow as tf
import tf_keras

from allreduce import topology as topology_lib
from resnet import group_batch_norm
from resnet import resnet_model
from training import strategy as strategy_lib

NUM_REPLICAS = 8
NUM_CLASSES = 10



def build_training_step(strategy, norm_layer, image_size, per_replica_batch):
  """A compiled training step of ResNet-50 with `norm_layer`, and its inputs."""
  with strategy.scope():
    model = resnet_model.build_resnet_for_depth(
        50, num_classes=NUM_CLASSES, image_size=image_size, norm_layer=norm_layer)
    optimizer = tf_keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
  global_batch = per_replica_batch * NUM_REPLICAS
  rng = np.random.default_rng(0)
  images = rng.normal(size=(global_batch, image_size, image_size, 3)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=global_batch).astype(np.int32)
  dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
  batch = next(iter(strategy.experimental_distribute_dataset(dataset)))

  @tf.function
  def step(batch):
    def replica_step(images, labels):
      with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_sum(tf_keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True)) / global_batch
      gradients = tape.gradient(loss, model.trainable_variables)
      optimizer.apply_gradients(zip(gradients, model.trainable_variables))
      return loss
    return strategy.reduce(
        tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=batch), axis=None)

  return lambda: step(batch)


def time_steps(step, num_steps):
  step().numpy()  # blocks until the step has run
  start = time.perf_counter()
  for _ in range(num_steps):
    loss = step()
  loss.numpy()
  return (time.perf_counter() - start) / num_steps


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--per_replica_batch", type=int, default=4)
  parser.add_argument("--group_sizes", default="1,2,4,8")
  parser.add_argument("--torus_shape", default="2x4")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps_per_round", type=int, default=2)
  parser.add_argument("--grappler", action="store_true",
                      help="keep grappler's graph rewrites (minutes per model)")
  parser.add_argument("--no_fused_reference", dest="fused_reference",
                      action="store_false",
                      help="skip the fused BatchNormalization reference line")
  args = parser.parse_args(argv)

  strategy_lib.split_cpu(NUM_REPLICAS)
  if not args.grappler:
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
  strategy = tf.distribute.MirroredStrategy(
      [f"/cpu:{i}" for i in range(NUM_REPLICAS)])
  grid = topology_lib.TorusTopology.for_replicas(
      NUM_REPLICAS, topology_lib.parse_grid(args.torus_shape))
  group_sizes = [int(size) for size in args.group_sizes.split(",")]
  if group_sizes[:2] != [1, 2]:
    raise SystemExit("--group_sizes must start with 1,2 (the reported ratio)")

  print(f"ResNet-50, {args.image_size}x{args.image_size} images, per-replica batch "
        f"{args.per_replica_batch}, {NUM_REPLICAS} logical CPUs as a {grid} torus; "
        f"{args.rounds} rounds of {args.steps_per_round} steps per group size")
  # label -> norm_layer factory; the fused reference goes last.
  norm_layers = {f"bn_group_size {size}":
                 group_batch_norm.make_batch_norm_factory(size, grid)
                 for size in group_sizes}
  if args.fused_reference:
    norm_layers["fused BatchNormalization"] = resnet_model.default_norm_layer
  steps = {}
  for label, norm_layer in norm_layers.items():
    started = time.perf_counter()
    steps[label] = build_training_step(
        strategy, norm_layer, args.image_size, args.per_replica_batch)
    steps[label]()  # trace and compile outside the timed rounds
    print(f"  {label}: built, traced and run once in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
  for size in group_sizes:
    print(f"  groups of {size}: {grid.block_groups(size)}")

  times = {label: [] for label in steps}
  for _ in range(args.rounds):
    for label, step in steps.items():
      times[label].append(time_steps(step, args.steps_per_round))

  medians = {label: statistics.median(values) for label, values in times.items()}
  baseline = medians["bn_group_size 1"]
  for label in steps:
    spread = max(times[label]) - min(times[label])
    print(f"{label:>25}: {medians[label] * 1e3:7.1f} ms/step "
          f"(spread {spread * 1e3:6.1f} ms)  {medians[label] / baseline:.3f}x group 1")
  print(f"bn_group_overhead: {medians['bn_group_size 2'] / baseline:.3f}x")


if __name__ == "__main__":
  main()
