"""ResNet builder: golden parameter counts, shapes, v1.5 stride placement, injection."""

from tests import logical_devices

logical_devices.configure_logical_cpus()

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf
import tf_keras
from absl.testing import parameterized

from resnet import resnet_model


def _trainable_count(model):
  return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


class ResNetModelTest(tf.test.TestCase, parameterized.TestCase):

  def test_resnet50_has_the_published_parameter_count(self):
    model = resnet_model.build_resnet_for_depth(50, num_classes=1000, image_size=224)
    # torchvision / MLPerf ResNet-50 v1.5: 25,557,032 trainable parameters.
    self.assertEqual(_trainable_count(model), 25_557_032)
    # Batch-norm moving statistics: two per channel of each of the 53 norm layers.
    bn_channels = sum(int(l.moving_mean.shape[0]) for l in model.layers
                      if isinstance(l, tf_keras.layers.BatchNormalization))
    self.assertEqual(len(model.non_trainable_variables), 2 * 53)
    self.assertEqual(_trainable_count(model) + 2 * bn_channels,
                     model.count_params())

  @parameterized.parameters((18, 11_689_512), (34, 21_797_672), (101, 44_549_160))
  def test_other_depths_match_published_counts(self, depth, expected):
    model = resnet_model.build_resnet_for_depth(depth, num_classes=1000, image_size=64)
    self.assertEqual(_trainable_count(model), expected)

  def test_stride_is_on_the_3x3_convolution(self):
    model = resnet_model.build_resnet_for_depth(50, num_classes=10, image_size=64)
    first_of_stage2 = {l.name: l for l in model.layers
                       if l.name.startswith("stage2_block1_conv")}
    self.assertEqual(first_of_stage2["stage2_block1_conv1"].strides, (1, 1))
    self.assertEqual(first_of_stage2["stage2_block1_conv2"].strides, (2, 2))
    self.assertEqual(first_of_stage2["stage2_block1_conv2"].kernel_size, (3, 3))

  def test_feature_map_sizes_and_logits(self):
    model = resnet_model.build_resnet_for_depth(14, num_classes=7, image_size=64,
                                                width=8)
    logits = model(tf.zeros([2, 64, 64, 3]), training=False)
    self.assertEqual(logits.shape, (2, 7))
    self.assertEqual(logits.dtype, tf.float32)
    # 64 -> stem 32 -> pool 16 -> stages 16, 8, 4, 2.
    last_block = model.get_layer("stage4_block1_out")
    self.assertEqual(last_block.output.shape[1:], (2, 2, 8 * 8 * 4))

  def test_injected_norm_layer_is_used_everywhere(self):
    made = []

    def norm_layer(**kwargs):
      layer = tf_keras.layers.LayerNormalization(name=kwargs["name"])
      made.append(layer)
      return layer

    model = resnet_model.build_resnet_for_depth(
        10, num_classes=3, image_size=32, width=4, norm_layer=norm_layer)
    norms = [l for l in model.layers
             if isinstance(l, (tf_keras.layers.LayerNormalization,
                               tf_keras.layers.BatchNormalization))]
    self.assertLen(made, len(norms))
    self.assertTrue(all(isinstance(l, tf_keras.layers.LayerNormalization)
                        for l in norms))

  def test_last_norm_of_each_block_starts_at_zero(self):
    # So each residual block starts as the identity: the output equals the shortcut.
    model = resnet_model.build_resnet_for_depth(10, num_classes=3, image_size=32,
                                                width=4)
    gammas = {l.name: l.gamma.numpy() for l in model.layers
              if isinstance(l, tf_keras.layers.BatchNormalization)}
    self.assertAllEqual(gammas["stage1_block1_bn2"], np.zeros(4))
    self.assertAllEqual(gammas["stage1_block1_bn1"], np.ones(4))

  def test_unknown_depth_is_a_clear_error(self):
    with self.assertRaisesRegex(ValueError, "unsupported ResNet depth 42"):
      resnet_model.build_resnet_for_depth(42, num_classes=10, image_size=32)


if __name__ == "__main__":
  tf.test.main()
