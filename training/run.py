"""Wires a checked `TrainConfig` into a run: strategy, data, model, all-reduce, trainer."""

import math

import tensorflow as tf
import tf_keras
from absl import logging

import allreduce
from resnet import group_batch_norm
from resnet import resnet_model
from training import config as config_lib
from training import data_sources
from training import optimizer as optimizer_lib
from training import service_address
from training import sharded_optimizer
from training import strategy as strategy_lib
from training import specs
from training import trainer as trainer_lib


def log_config(config, num_replicas, grid):
  logging.info("Configuration (preset %s), %d replicas on a %s torus:", config.preset,
               num_replicas, grid)
  for name, value in config.flat().items():
    logging.info("  %-26s %s", name, value)


# The collectives of a step carry no per-op timeout: TensorFlow keeps a sleeping thread
# for each timed op for the whole timeout (see training/strategy.py); a lost worker
# is caught by the coordination service's heartbeats instead.


def build_norm_layer(model, grid, strategy):
  """The grouped batch-norm factory the backbone is built with."""
  return group_batch_norm.make_batch_norm_factory(
      model.bn_group_size, grid=grid, momentum=model.bn_momentum,
      backend=allreduce.backend_for_strategy(
          strategy, chain=allreduce.collectives.BATCH_NORM_CHAIN))


def build_aggregator(distribution, grid, strategy):
  """The optimizer's gradient_aggregator: the torus, or the strategy's own all-reduce
  packed the same way."""
  pack_size_bytes = int(distribution.allreduce_pack_mb * 2**20)
  if distribution.allreduce != "torus":
    return allreduce.make_packed_strategy_aggregator(pack_size_bytes)
  return allreduce.make_torus_aggregator(grid, backend=strategy,
                                         pack_size_bytes=pack_size_bytes)


def build_weight_update_sharding(distribution, grid):
  """Where each replica's shard of the update lies, or None for the unsharded update."""
  shards = distribution.weight_update_shards
  if shards == "off" or grid.num_replicas == 1:
    return None
  return sharded_optimizer.WeightUpdateSharding(
      grid, shards=shards,
      pack_size_bytes=int(distribution.allreduce_pack_mb * 2**20))


def build_recipe(config, data) -> specs.Recipe:
  """The optimizer settings with the learning-rate schedule for this data set."""
  opt, loop = config.optimizer, config.loop
  total_steps = loop.steps_for(data.num_train_examples)
  steps_per_epoch = data.num_train_examples / loop.train_batch_size
  learning_rate = optimizer_lib.warmup_then_decay(
      config.learning_rate, warmup_steps=math.ceil(opt.warmup_epochs * steps_per_epoch),
      total_steps=total_steps, decay=opt.lr_decay)
  return specs.Recipe(
      num_classes=config.data.num_classes, learning_rate=learning_rate,
      optimizer_name=opt.optimizer, momentum=opt.momentum,
      weight_decay=opt.weight_decay, label_smoothing=opt.label_smoothing,
      ema_decay=opt.ema_decay, precision=config.model.precision,
      jit_compile=config.distribution.jit_compile)


def build_cadence(loop, data) -> specs.Cadence:
  return specs.Cadence(
      total_steps=loop.steps_for(data.num_train_examples),
      global_batch_size=loop.train_batch_size, eval_batch_size=loop.eval_batch_size,
      steps_per_execution=loop.steps_per_execution,
      log_every_steps=loop.log_every_steps,
      checkpoint_every_steps=loop.checkpoint_every_steps,
      eval_every_steps=loop.eval_every_steps)


def input_dtype(precision):
  """Images in the dtype the model computes in, where the host can make it: bfloat16
  halves the bytes to the device; float16 inputs gain nothing over the model's cast."""
  return tf.bfloat16 if precision == "mixed_bfloat16" else tf.float32


def build_trainer(config, strategy, data=None) -> trainer_lib.Trainer:
  """Everything but the loop: checks the config against the replicas and builds."""
  num_replicas = strategy.num_replicas_in_sync
  config_lib.check_against_replicas(config, num_replicas)
  # On TPU the grid follows the chips' physical coordinates (see allreduce/topology).
  try:
    grid = strategy_lib.replica_grid(strategy, config.distribution.torus_shape)
  except allreduce.TopologyError as e:
    raise config_lib.ConfigError("torus_shape", str(e)) from None
  log_config(config, num_replicas, grid)
  model_dir = config.loop.model_dir
  data = data or data_sources.data_source_for(
      config.data, config.loop, strategy_lib.worker_scratch_dir(strategy, model_dir),
      input_dtype=input_dtype(config.model.precision))

  norm_layer = build_norm_layer(config.model, grid, strategy)

  def build_backbone():
    return resnet_model.build_resnet_for_depth(
        config.model.resnet_depth, num_classes=config.data.num_classes,
        image_size=config.data.image_size, norm_layer=norm_layer,
        width=config.model.resnet_width)

  tf_keras.utils.set_random_seed(config.loop.seed)
  return trainer_lib.Trainer(
      strategy=strategy, model_dir=model_dir, build_backbone=build_backbone,
      data=data, recipe=build_recipe(config, data),
      cadence=build_cadence(config.loop, data),
      gradient_aggregator=build_aggregator(config.distribution, grid, strategy),
      weight_update_sharding=build_weight_update_sharding(config.distribution, grid),
      checkpoint_settings=checkpoint_settings(config))


def checkpoint_settings(config):
  """{flag: value} for the settings that shape the checkpoint's variables.

  The weight average and loss scaling add variables; their exact decay or bfloat16
  against float32 do not, so those may change on resume.
  """
  model, opt = config.model, config.optimizer
  return dict(resnet_depth=model.resnet_depth, resnet_width=model.resnet_width,
              num_classes=config.data.num_classes, optimizer=opt.optimizer,
              ema_decay="on" if opt.ema_decay > 0 else "off (0)",
              precision=("mixed_float16" if model.precision == "mixed_float16"
                         else "float32 or mixed_bfloat16"))


def check_data_service(data):
  """A --data_service_address where no dispatcher answers fails now, in one line.

  Otherwise the first training step would wait on the service's own retries.
  """
  if data.data_service_address:
    try:
      service_address.probe(data.data_service_address)
    except service_address.AddressError as e:
      raise config_lib.ConfigError("data_service_address", str(e)) from None


def train_and_evaluate(config):
  """Runs `config.loop.mode`; returns the final evaluation results (or {} for train)."""
  distribution, mode = config.distribution, config.loop.mode
  if mode != "eval":
    check_data_service(config.data)
  strategy = strategy_lib.create_strategy(
      tpu=distribution.tpu, num_cpu_devices=distribution.num_cpu_devices,
      collective_timeout_seconds=distribution.collective_timeout_seconds)
  trainer = build_trainer(config, strategy)
  results, loops = {}, []
  if mode in ("train", "train_and_eval"):
    loops = trainer.train(with_eval=mode == "train_and_eval")
  if mode in ("eval", "train_and_eval"):
    if mode == "eval" and not trainer.restore():
      raise config_lib.ConfigError(
          "model_dir", f"no checkpoint in {config.loop.model_dir}/checkpoints to "
          "evaluate; train first or point --model_dir at a trained run")
    results = trainer.evaluate()
    print(f"Final evaluation at step {trainer.step}: top-1 accuracy "
          f"{results['top1']:.4f}, top-5 {results['top5']:.4f}")
  trainer.write_summary(results, loops, config.flat())
  return results
