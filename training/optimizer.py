"""Learning-rate schedule, weight decay and the optimizer the trainer steps with.

The optimizer is a tf_keras `OptimizerV2` (the legacy optimizers, which LARS from
tf-models-official subclasses) because its constructor takes `gradient_aggregator=`:
the hook through which the 2-D torus all-reduce replaces the strategy's own sum.
"""

import math
import re

import tensorflow as tf
import tf_keras
from official.modeling.optimization import lars

# Batch-norm scales and offsets and biases are neither decayed nor (under LARS) given a
# layer-wise trust ratio: decaying them only hurts (Goyal et al., 2017; the reference
# LARS trainers exclude them too).
EXCLUDED_FROM_DECAY = (r"gamma", r"beta", r"bias")


def is_decayed(variable) -> bool:
  """Whether weight decay applies to `variable` (convolution and dense kernels)."""
  return not any(re.search(p, variable.name) for p in EXCLUDED_FROM_DECAY)


class WarmupThenDecay(tf_keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then decay to 0 at
  `total_steps`: polynomial (the paper's, power 2) or cosine."""

  def __init__(self, peak, warmup_steps, total_steps, decay="polynomial", power=2.0):
    super().__init__()
    if decay not in ("polynomial", "cosine"):
      raise ValueError(f"unknown decay {decay!r}")
    self.peak = float(peak)
    self.warmup_steps = int(warmup_steps)
    self.total_steps = max(int(total_steps), self.warmup_steps + 1)
    self.decay = decay
    self.power = float(power)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warmup = self.peak * step / max(self.warmup_steps, 1)
    progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
    progress = tf.clip_by_value(progress, 0.0, 1.0)
    if self.decay == "polynomial":
      decayed = self.peak * (1.0 - progress) ** self.power
    else:
      decayed = self.peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
    return tf.where(step < self.warmup_steps, warmup, decayed)

  def get_config(self):
    return dict(peak=self.peak, warmup_steps=self.warmup_steps,
                total_steps=self.total_steps, decay=self.decay, power=self.power)


def build_optimizer(name, learning_rate, *, momentum=0.9, weight_decay=0.0,
                    gradient_aggregator=None):
  """SGD with momentum or LARS, summing gradients with `gradient_aggregator`.

  With SGD, weight decay is an L2 term the trainer adds to the loss (see
  `l2_penalty`); LARS applies it itself, inside its trust ratio, so the trainer must not
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


def l2_penalty(variables, weight_decay):
  """weight_decay/2 * sum of squares of the decayed variables (0 if none)."""
  decayed = [v for v in variables if is_decayed(v)]
  if not decayed or not weight_decay:
    return tf.constant(0.0)
  return weight_decay * tf.add_n([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in decayed])
