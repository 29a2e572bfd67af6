"""Which weights are decayed, and the L2 term SGD adds to the loss for them.

Shared by the optimizers (LARS' exclusions, the sharded update's) and the model (SGD's
L2 loss), so one list decides for all of them.
"""

import re

import tensorflow as tf

# Batch-norm scales and offsets and biases are neither decayed nor (under LARS) given a
# layer-wise trust ratio: decaying them only hurts (Goyal et al., 2017; the reference
# LARS trainers exclude them too).
EXCLUDED_FROM_DECAY = (r"gamma", r"beta", r"bias")


def is_decayed(variable) -> bool:
  """Whether weight decay applies to `variable` (convolution and dense kernels)."""
  return not any(re.search(p, variable.name) for p in EXCLUDED_FROM_DECAY)


def l2_penalty(variables, weight_decay):
  """weight_decay/2 * sum of squares of the decayed variables (0 if none)."""
  decayed = [v for v in variables if is_decayed(v)]
  if not decayed or not weight_decay:
    return tf.constant(0.0)
  return weight_decay * tf.add_n([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in decayed])
