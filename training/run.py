"""Wires a checked `TrainConfig` into a run: strategy, data, model, all-reduce, trainer."""

import dataclasses
import math

import tf_keras
from absl import logging

import allreduce
from resnet import group_batch_norm
from resnet import resnet_model
from training import config as config_lib
from training import data_sources
from training import optimizer as optimizer_lib
from training import strategy as strategy_lib
from training import trainer as trainer_lib


def log_config(config, num_replicas, grid):
  logging.info("Configuration (preset %s), %d replicas on a %s torus:", config.preset,
               num_replicas, grid)
  for field in dataclasses.fields(config):
    logging.info("  %-24s %s", field.name, getattr(config, field.name))


def build_trainer(config, strategy, data=None) -> trainer_lib.Trainer:
  """Everything but the loop: checks the config against the replicas and builds."""
  num_replicas = strategy.num_replicas_in_sync
  config_lib.check_against_replicas(config, num_replicas)
  grid = config.topology(num_replicas)
  log_config(config, num_replicas, grid)
  data = data or data_sources.data_source_for(config)

  total_steps = config.steps_for(data.num_train_examples)
  steps_per_epoch = data.num_train_examples / config.train_batch_size
  learning_rate = optimizer_lib.WarmupThenDecay(
      config.learning_rate, warmup_steps=math.ceil(config.warmup_epochs * steps_per_epoch),
      total_steps=total_steps, decay=config.lr_decay)

  norm_layer = group_batch_norm.make_batch_norm_factory(
      config.bn_group_size, topology=grid, momentum=config.bn_momentum)

  def build_backbone():
    return resnet_model.build_resnet_for_depth(
        config.resnet_depth, num_classes=config.num_classes,
        image_size=config.image_size, norm_layer=norm_layer, width=config.resnet_width)

  aggregator = None
  if config.allreduce == "torus":
    aggregator = allreduce.make_torus_aggregator(
        grid, seam=strategy, pack_size_bytes=int(config.allreduce_pack_mb * 2**20))

  tf_keras.utils.set_random_seed(config.seed)
  return trainer_lib.Trainer(
      strategy=strategy, model_dir=config.model_dir, build_backbone=build_backbone,
      data=data, total_steps=total_steps, global_batch_size=config.train_batch_size,
      eval_batch_size=config.eval_batch_size, num_classes=config.num_classes,
      learning_rate=learning_rate, optimizer_name=config.optimizer,
      momentum=config.momentum, weight_decay=config.weight_decay,
      label_smoothing=config.label_smoothing, ema_decay=config.ema_decay,
      gradient_aggregator=aggregator,
      precision=config.precision, steps_per_execution=config.steps_per_execution,
      log_every_steps=config.log_every_steps,
      checkpoint_every_steps=config.checkpoint_every_steps,
      eval_every_steps=config.eval_every_steps)


def train_and_evaluate(config):
  """Runs `config.mode`; returns the final evaluation results (or {} for train)."""
  strategy = strategy_lib.create_strategy(tpu=config.tpu,
                                          num_cpu_devices=config.num_cpu_devices)
  trainer = build_trainer(config, strategy)
  results, loops = {}, []
  if config.mode in ("train", "train_and_eval"):
    loops = trainer.train(with_eval=config.mode == "train_and_eval")
  if config.mode in ("eval", "train_and_eval"):
    if config.mode == "eval" and not trainer.restore():
      raise config_lib.ConfigError(
          "model_dir", f"no checkpoint in {config.model_dir}/checkpoints to evaluate; "
          "train first or point --model_dir at a trained run")
    results = trainer.evaluate()
    print(f"Final evaluation at step {trainer.step}: top-1 accuracy "
          f"{results['top1']:.4f}, top-5 {results['top5']:.4f}")
  trainer.write_summary(results, loops, dataclasses.asdict(config))
  return results
