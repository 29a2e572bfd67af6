"""ResNet v1.5 in tf_keras, built from a stage table.

v1.5 (the variant the paper and MLPerf train) puts the stride-2 of each downsampling
bottleneck on the 3x3 convolution instead of the first 1x1, which costs a little speed
and gains about half a point of top-1.

The model knows nothing about distribution: the normalization layer is injected as a
factory `norm_layer(name=..., gamma_initializer=...) -> layer`, so grouped sync batch
norm, plain batch norm or anything else plugs in without the model importing a strategy.
"""

import dataclasses
from typing import Callable, Sequence

import tf_keras

NormLayerFactory = Callable[..., tf_keras.layers.Layer]


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  block: str  # "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1 with 4x expansion)
  stage_sizes: Sequence[int]


# Depth -> blocks per stage. 10 and 14 are test-sized members of the two families.
RESNET_SPECS = {
    10: ResNetSpec("basic", (1, 1, 1, 1)),
    14: ResNetSpec("bottleneck", (1, 1, 1, 1)),
    18: ResNetSpec("basic", (2, 2, 2, 2)),
    26: ResNetSpec("bottleneck", (2, 2, 2, 2)),
    34: ResNetSpec("basic", (3, 4, 6, 3)),
    50: ResNetSpec("bottleneck", (3, 4, 6, 3)),
    101: ResNetSpec("bottleneck", (3, 4, 23, 3)),
    152: ResNetSpec("bottleneck", (3, 8, 36, 3)),
    200: ResNetSpec("bottleneck", (3, 24, 36, 3)),
}

_BOTTLENECK_EXPANSION = 4


def default_norm_layer(**kwargs):
  """Plain per-replica batch norm with the reference momentum and epsilon."""
  return tf_keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, **kwargs)


def _conv(filters, kernel_size, strides, name):
  # He initialisation (fan-out) as in the reference trainers; no bias: batch norm follows.
  return tf_keras.layers.Conv2D(
      filters, kernel_size, strides=strides, padding="same", use_bias=False,
      kernel_initializer=tf_keras.initializers.VarianceScaling(
          scale=2.0, mode="fan_out", distribution="truncated_normal"),
      name=name)


def _residual_block(x, filters, strides, block, norm_layer, name):
  """One residual block; `filters` is the width of its inner convolutions."""
  out_filters = filters * _BOTTLENECK_EXPANSION if block == "bottleneck" else filters
  shortcut = x
  if strides != 1 or x.shape[-1] != out_filters:
    shortcut = _conv(out_filters, 1, strides, name + "_proj_conv")(x)
    shortcut = norm_layer(name=name + "_proj_bn")(shortcut)

  if block == "bottleneck":
    convs = [(filters, 1, 1), (filters, 3, strides), (out_filters, 1, 1)]
  else:
    convs = [(filters, 3, strides), (filters, 3, 1)]
  y = x
  for i, (conv_filters, kernel_size, conv_strides) in enumerate(convs):
    y = _conv(conv_filters, kernel_size, conv_strides, f"{name}_conv{i + 1}")(y)
    last = i == len(convs) - 1
    # The last norm of each block starts at zero so every block begins as the
    # identity: a known help for large-batch training (Goyal et al., 2017).
    y = norm_layer(name=f"{name}_bn{i + 1}",
                   gamma_initializer="zeros" if last else "ones")(y)
    if not last:
      y = tf_keras.layers.ReLU(name=f"{name}_relu{i + 1}")(y)
  y = tf_keras.layers.Add(name=name + "_add")([y, shortcut])
  return tf_keras.layers.ReLU(name=name + "_out")(y)


def build_resnet(spec: ResNetSpec, *, num_classes: int, image_size: int,
                 norm_layer: NormLayerFactory = default_norm_layer,
                 width: int = 64, name: str = "resnet") -> tf_keras.Model:
  """A ResNet v1.5 classifier taking NHWC images and returning float32 logits.

  Args:
    spec: block type and blocks per stage (see RESNET_SPECS).
    num_classes: size of the output layer.
    image_size: height and width of the (square) input.
    norm_layer: factory for every normalization layer.
    width: channels of the stem; stages use width, 2x, 4x, 8x (64 for the real model,
      smaller in tests).
  """
  if spec.block not in ("basic", "bottleneck"):
    raise ValueError(f"unknown block type {spec.block!r}")
  images = tf_keras.Input(shape=(image_size, image_size, 3), name="images")
  x = _conv(width, 7, 2, "stem_conv")(images)
  x = norm_layer(name="stem_bn")(x)
  x = tf_keras.layers.ReLU(name="stem_relu")(x)
  x = tf_keras.layers.MaxPool2D(3, strides=2, padding="same", name="stem_pool")(x)
  for stage, num_blocks in enumerate(spec.stage_sizes):
    for block_index in range(num_blocks):
      strides = 2 if stage > 0 and block_index == 0 else 1
      x = _residual_block(x, width * 2**stage, strides, spec.block, norm_layer,
                          name=f"stage{stage + 1}_block{block_index + 1}")
  x = tf_keras.layers.GlobalAveragePooling2D(name="pool")(x)
  # Logits stay float32 under a mixed-precision policy so the softmax is stable.
  logits = tf_keras.layers.Dense(
      num_classes, kernel_initializer=tf_keras.initializers.RandomNormal(stddev=0.01),
      dtype="float32", name="logits")(x)
  return tf_keras.Model(images, logits, name=name)


def build_resnet_for_depth(depth: int, **kwargs) -> tf_keras.Model:
  """`build_resnet` for one of the standard depths in RESNET_SPECS."""
  if depth not in RESNET_SPECS:
    raise ValueError(
        f"unsupported ResNet depth {depth}; choose one of {sorted(RESNET_SPECS)}")
  return build_resnet(RESNET_SPECS[depth], name=f"resnet{depth}", **kwargs)
