"""Learning-rate schedule and the optimizer the trainer steps with.

The optimizer is a tf_keras `OptimizerV2` (the legacy optimizers, which LARS from
tf-models-official subclasses) because its constructor takes `gradient_aggregator=`:
the hook through which the 2-D torus all-reduce replaces the strategy's own sum.
"""

import tf_keras
from official.modeling.optimization import lars
from official.modeling.optimization import lr_schedule

from training import sharded_optimizer
from training.specs import Recipe
from training.weight_decay import EXCLUDED_FROM_DECAY


def warmup_then_decay(peak, warmup_steps, total_steps, decay="polynomial", power=2.0):
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then decay to 0 at
  `total_steps`: polynomial (the paper's, power 2) or cosine. Model Garden's schedules,
  composed: its offset decays start counting where the warm-up ends."""
  if decay not in ("polynomial", "cosine"):
    raise ValueError(f"unknown decay {decay!r}")
  warmup_steps = int(warmup_steps)
  decay_steps = max(int(total_steps), warmup_steps + 1) - warmup_steps
  if decay == "polynomial":
    after_warmup = lr_schedule.PolynomialDecayWithOffset(
        initial_learning_rate=float(peak), decay_steps=decay_steps,
        end_learning_rate=0.0, power=float(power), offset=warmup_steps)
  else:
    after_warmup = lr_schedule.CosineDecayWithOffset(
        initial_learning_rate=float(peak), decay_steps=decay_steps, alpha=0.0,
        offset=warmup_steps)
  if not warmup_steps:
    return after_warmup
  return lr_schedule.LinearWarmup(after_warmup, warmup_steps=warmup_steps,
                                  warmup_learning_rate=0.0)


def build_optimizer(name, learning_rate, *, momentum=0.9, weight_decay=0.0,
                    gradient_aggregator=None):
  """SGD with momentum or LARS, summing gradients with `gradient_aggregator`.

  With SGD, weight decay is an L2 term the trainer adds to the loss (see
  `weight_decay.l2_penalty`); LARS applies it itself, inside its trust ratio, so the trainer must not
  add it again.
  """
  kwargs = {}
  if gradient_aggregator is not None:
    kwargs["gradient_aggregator"] = gradient_aggregator
  if name == "sgd":
    return tf_keras.optimizers.legacy.SGD(learning_rate, momentum=momentum, **kwargs)
  if name == "lars":
    return lars.LARS(learning_rate, momentum=momentum, weight_decay_rate=weight_decay,
                     exclude_from_weight_decay=list(EXCLUDED_FROM_DECAY),
                     exclude_from_layer_adaptation=list(EXCLUDED_FROM_DECAY), **kwargs)
  raise ValueError(f"unknown optimizer {name!r}")


def for_recipe(recipe: Recipe, gradient_aggregator=None, weight_update_sharding=None):
  """The recipe's optimizer, summing with the aggregator or updating by shards.

  `weight_update_sharding` (a `sharded_optimizer.WeightUpdateSharding`) makes each
  replica update its shard of the weights, the torus summing inside the sharded
  optimizer (`gradient_aggregator` is then unused); None: every replica updates every
  weight. mixed_float16 wraps either in its loss-scale optimizer.
  """
  if weight_update_sharding is not None:
    optimizer = sharded_optimizer.build_sharded_optimizer(
        recipe.optimizer_name, recipe.learning_rate, weight_update_sharding,
        momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.precision == "mixed_float16":
      optimizer = sharded_optimizer.ShardedLossScaleOptimizer(optimizer)
    return optimizer
  optimizer = build_optimizer(
      recipe.optimizer_name, recipe.learning_rate, momentum=recipe.momentum,
      weight_decay=recipe.weight_decay, gradient_aggregator=gradient_aggregator)
  if recipe.precision == "mixed_float16":
    optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
  return optimizer
