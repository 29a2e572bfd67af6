"""A process of `multiworker_trainer_test`: one worker, or the one-process reference.

    python -m tests.multiworker_trainer_worker --task=0 --ports=P0,P1 \
        --model_dir=/tmp/run --output=/tmp/worker_0
    python -m tests.multiworker_trainer_worker --reference \
        --model_dir=/tmp/single --output=/tmp/reference

A worker sets its `TF_CONFIG`, builds the strategy with `training.strategy`
(MultiWorkerMirroredStrategy, one replica per CPU worker) and trains the tiny ResNet
twice in the shared `--model_dir`, as a job that is interrupted and restarted would: to
step `FIRST_STEPS`, then (new model, other initial weights, and the sharded weight
update) to `TOTAL_STEPS`, which must resume from the chief's checkpoint.

The reference (`--reference`, no `TF_CONFIG`) gets MirroredStrategy over 2 logical
CPUs from the same `training.strategy`, so the same replica count, and trains straight
through: one trainer to `FIRST_STEPS`, then on to `TOTAL_STEPS`. It runs in a process
of its own because a test process is shared with other strategies, and tf.distribute
numbers each strategy's collective groups from 1: a 2-replica strategy's own
all-reduce there would join an 8-replica group of an earlier test and abort.

Finally every process evaluates on `NUM_EVAL_EXAMPLES` other images. No host's share
fills its last step, so each worker pads its half and the reference the whole set, and
all must score every image once.

Each process writes the backbone weights at both points (`weights.npz`) and what it
saw (`report.json`, with the evaluation's steps and results) under `--output`.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from tests import toy_images

IMAGE_SIZE = 16
NUM_CLASSES = 4
NUM_EXAMPLES = 64
# Split 31 + 30 over two workers, 4 steps of 8 per worker: both pad their last step.
NUM_EVAL_EXAMPLES = 61
GLOBAL_BATCH = 16
FIRST_STEPS = 4
TOTAL_STEPS = 6
CHECKPOINT_EVERY_STEPS = 2
# 2x1: the reduce-scatter (all-to-all) and the all-gather of the torus aggregator
# cross the process boundary; bn_group_size 2 pairs the two replicas, so every
# batch-norm layer's moment sum crosses it too.
TORUS_SHAPE = (2, 1)
BN_GROUP_SIZE = 2
REFERENCE_REPLICAS = 2


def toy_examples():
  return toy_images.quadrant_images(NUM_EXAMPLES, IMAGE_SIZE, NUM_CLASSES)


def toy_eval_examples():
  return toy_images.quadrant_images(NUM_EVAL_EXAMPLES, IMAGE_SIZE, NUM_CLASSES, seed=1)


def replica_slice_data_source():
  """A `DataSource` whose per-replica batches depend only on (global replica, step).

  Global batch `s` is examples `[s * G, (s + 1) * G)` (mod the data set), and global
  replica `r` gets the `r`-th slice of it. A pipeline reads only the slices of its own
  replicas: pipeline `p` of `P` serves replicas `p * L .. p * L + L - 1` (L = R / P),
  and emits their slices step by step, local replica by local replica. That is the
  order in which tf.distribute hands a pipeline's elements to its local replicas (round
  robin), and the replica-id order of both MirroredStrategy (one pipeline, replicas
  0..R-1) and MultiWorkerMirroredStrategy (worker p's replicas follow worker p-1's).
  So one process with R replicas and R workers with one replica each feed every replica
  the same examples at every step, each worker reading only its own shard.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  from training import specs  # pylint: disable=g-import-not-at-top
  images, labels = toy_examples()
  eval_images, eval_labels = toy_eval_examples()

  def make_train_dataset(input_context, start_step):
    num_replicas = input_context.num_replicas_in_sync
    local = num_replicas // input_context.num_input_pipelines
    per_replica = input_context.get_per_replica_batch_size(GLOBAL_BATCH)
    first_replica = input_context.input_pipeline_id * local

    def batch_for(index):
      step, local_id = index // local, index % local
      start = (step * num_replicas + first_replica + local_id) * per_replica
      positions = (start + tf.range(per_replica, dtype=tf.int64)) % NUM_EXAMPLES
      return tf.gather(images, positions), tf.gather(labels, positions)

    return tf.data.Dataset.range(start_step * local, 2**40).map(batch_for)

  def eval_steps(input_context):
    hosts = input_context.num_input_pipelines
    return pipeline.padded_eval_steps(
        [len(range(host, NUM_EVAL_EXAMPLES, hosts)) for host in range(hosts)],
        GLOBAL_BATCH)

  def make_eval_dataset(input_context):
    hosts = input_context.num_input_pipelines
    return pipeline.batch_with_padding(
        tf.data.Dataset.from_tensor_slices((eval_images, eval_labels)).shard(
            hosts, input_context.input_pipeline_id),
        batch_size=input_context.get_per_replica_batch_size(GLOBAL_BATCH),
        num_batches=(eval_steps(input_context)
                     * input_context.num_replicas_in_sync // hosts))

  return specs.DataSource(
      make_train_dataset, make_eval_dataset, num_train_examples=NUM_EXAMPLES,
      num_eval_examples=NUM_EVAL_EXAMPLES, eval_steps=eval_steps)


def build_trainer(strategy, model_dir, *, total_steps, timeout_seconds, shards=None):
  """The trainer of the run: depth-10, width-8 ResNet, torus sum, grouped batch norm;
  `shards` ("x", "xy"): the sharded weight update."""
  import allreduce  # pylint: disable=g-import-not-at-top
  from resnet import group_batch_norm  # pylint: disable=g-import-not-at-top
  from resnet import resnet_model  # pylint: disable=g-import-not-at-top
  from training import sharded_optimizer  # pylint: disable=g-import-not-at-top
  from training import specs  # pylint: disable=g-import-not-at-top
  from training import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  grid = allreduce.TorusTopology(*TORUS_SHAPE)
  # Bounded waits everywhere: a missing peer fails the step instead of hanging it.
  backend = allreduce.CollectiveOpsBackend(timeout_seconds=timeout_seconds)
  norm_layer = group_batch_norm.make_batch_norm_factory(BN_GROUP_SIZE, grid=grid,
                                                        backend=backend)
  aggregator = allreduce.make_torus_aggregator(grid, backend=backend)
  sharding = shards and sharded_optimizer.WeightUpdateSharding(
      grid, shards=shards, timeout_seconds=timeout_seconds)

  def build_backbone():
    return resnet_model.build_resnet_for_depth(
        10, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, width=8,
        norm_layer=norm_layer)

  return trainer_lib.Trainer(
      strategy=strategy, model_dir=model_dir, build_backbone=build_backbone,
      data=replica_slice_data_source(),
      recipe=specs.Recipe(num_classes=NUM_CLASSES, learning_rate=0.05,
                                momentum=0.9, weight_decay=1e-4),
      cadence=specs.Cadence(total_steps=total_steps,
                                  global_batch_size=GLOBAL_BATCH,
                                  eval_batch_size=GLOBAL_BATCH,
                                  log_every_steps=CHECKPOINT_EVERY_STEPS,
                                  checkpoint_every_steps=CHECKPOINT_EVERY_STEPS),
      gradient_aggregator=aggregator, weight_update_sharding=sharding)


def set_initial_weights(trainer, seed):
  """Overwrites every kernel with values drawn from `seed` (He-scaled normals).

  Random initializers depend on how many random ops the process made before, which
  differs between a worker and a test process; these values do not. The other
  trainable variables (gamma, beta, biases) start from constants anyway.
  """
  rng = np.random.default_rng(seed)
  for variable in trainer.model.backbone.trainable_variables:
    shape = variable.shape.as_list()
    if len(shape) >= 2:
      fan_in = int(np.prod(shape[:-1]))
      variable.assign(
          rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32))


def backbone_weights(trainer):
  """Every backbone weight (moving statistics too), by position."""
  return [np.asarray(v.numpy()) for v in trainer.model.backbone.weights]


def train_interrupted_and_resumed(strategy, model_dir, *, timeout_seconds):
  """Trains to FIRST_STEPS, then a new trainer (other initial weights) to TOTAL_STEPS.

  Returns the two trainers and the backbone weights after each.
  """
  first = build_trainer(strategy, model_dir, total_steps=FIRST_STEPS,
                        timeout_seconds=timeout_seconds)
  set_initial_weights(first, seed=1)
  first.train()
  first_weights = backbone_weights(first)
  # The restarted job updates by shards (each worker half of the weights): its sum,
  # update and weight all-gather cross the process boundary, from the unsharded run's
  # checkpoint, and must still end where the unsharded reference ends.
  second = build_trainer(strategy, model_dir, total_steps=TOTAL_STEPS,
                         timeout_seconds=timeout_seconds, shards="x")
  # Only a restore from the checkpoint can bring these back to the first run's state.
  set_initial_weights(second, seed=99)
  second.train()
  return first, second, first_weights, backbone_weights(second)


def train_straight_through(strategy, model_dir, *, timeout_seconds):
  """One trainer to FIRST_STEPS and on to TOTAL_STEPS, with no restart in between.

  Returns the trainer, the step it first stopped at and the backbone weights then and
  at the end.
  """
  trainer = build_trainer(strategy, model_dir, total_steps=FIRST_STEPS,
                          timeout_seconds=timeout_seconds)
  set_initial_weights(trainer, seed=1)
  trainer.train()
  first_step, first_weights = trainer.step, backbone_weights(trainer)
  trainer.cadence = dataclasses.replace(trainer.cadence, total_steps=TOTAL_STEPS)
  trainer.train()  # Restores the checkpoint it just wrote: the same state.
  return trainer, first_step, first_weights, backbone_weights(trainer)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reference", action="store_true",
                      help="the one-process run: MirroredStrategy over 2 logical CPUs")
  parser.add_argument("--task", type=int, default=0)
  parser.add_argument("--ports", default="")
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--timeout_seconds", type=float, default=60.0)
  args = parser.parse_args()
  start = time.monotonic()

  if args.reference:
    os.environ.pop("TF_CONFIG", None)
  else:
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"localhost:{p}" for p in args.ports.split(",")]},
        "task": {"type": "worker", "index": args.task}})
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from training import strategy as strategy_lib  # pylint: disable=g-import-not-at-top

  strategy = strategy_lib.create_strategy(
      num_cpu_devices=REFERENCE_REPLICAS,
      collective_timeout_seconds=args.timeout_seconds)
  print(f"strategy ready after {time.monotonic() - start:.1f} s", flush=True)
  if args.reference:
    first, first_step, first_weights, final_weights = train_straight_through(
        strategy, args.model_dir, timeout_seconds=args.timeout_seconds)
    second = first
  else:
    first, second, first_weights, final_weights = train_interrupted_and_resumed(
        strategy, args.model_dir, timeout_seconds=args.timeout_seconds)
    first_step = first.step
  # After the weights are taken: evaluating averages the batch-norm statistics.
  evaluation = second.evaluate()

  os.makedirs(args.output, exist_ok=True)
  np.savez(os.path.join(args.output, "weights.npz"),
           **{f"first_{i}": w for i, w in enumerate(first_weights)},
           **{f"final_{i}": w for i, w in enumerate(final_weights)})
  report = {
      "task": args.task,
      "pid": os.getpid(),
      "multi_worker": isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy),
      "strategy": type(strategy).__name__,
      "num_replicas": strategy.num_replicas_in_sync,
      "is_chief": first.is_chief,
      "checkpoint_dirs": [first.checkpoints.manager.directory,
                          second.checkpoints.manager.directory],
      "steps": [first_step, second.step],
      "num_weights": len(final_weights),
      "input_pipelines": strategy_lib.input_context(strategy).num_input_pipelines,
      "eval_steps": second.eval_steps,
      "evaluation": evaluation,
      "seconds": time.monotonic() - start,
  }
  with open(os.path.join(args.output, "report.json"), "w") as f:
    json.dump(report, f)
  sys.stdout.flush()
  sys.stderr.flush()
  # Skip interpreter teardown: the gRPC server of a strategy cannot be stopped and
  # can block exit while its peer shuts down.
  os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
