"""mixed_float16 with dynamic loss scaling, summed by the torus aggregator, on 8
logical CPUs: the same weights as the strategy's own all-reduce, and a step with
non-finite gradients on one replica is skipped on every replica."""

from tests import logical_devices

logical_devices.configure_logical_cpus()

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf
import tf_keras

import allreduce
from training import optimizer as optimizer_lib
from training import model as model_lib

_GLOBAL_BATCH = 16  # 2 examples per replica
_NUM_CLASSES = 3


def _features_and_labels(num_examples, seed=0):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(num_examples, 4)).astype(np.float32)
  labels = ((features[:, 0] > 0).astype(np.int32) + (features[:, 1] > 0)).astype(np.int32)
  return features, labels


def _batches(features, labels):
  return tf.data.Dataset.from_tensor_slices((features, labels)).batch(_GLOBAL_BATCH)


def _build(strategy, aggregator, seed=3):
  """A tiny float16 classifier with float32 weights, its optimizer loss-scaled."""
  tf_keras.utils.set_random_seed(seed)
  with strategy.scope():
    inputs = tf_keras.Input((4,))
    hidden = tf_keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    logits = tf_keras.layers.Dense(_NUM_CLASSES, name="logits")(hidden)
    model = model_lib.ImageClassifier(
        tf_keras.Model(inputs, logits), global_batch_size=_GLOBAL_BATCH,
        num_classes=_NUM_CLASSES)
    optimizer = tf_keras.mixed_precision.LossScaleOptimizer(
        optimizer_lib.build_optimizer("sgd", 0.1, momentum=0.9,
                                      gradient_aggregator=aggregator))
    model.compile(optimizer=optimizer)
    # Created now, as the Trainer does: a variable first made inside the traced step
    # makes tf.function trace it twice, behind a cond, and the collectives' keys and
    # tokens do not survive that.
    optimizer.iterations  # pylint: disable=pointless-statement
  return model, optimizer


def _weights(model):
  return [v.numpy() for v in model.backbone.trainable_variables]


class MixedPrecisionTorusTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    cls.strategy = logical_devices.cpu_mirrored_strategy(8)
    cls.torus_calls = []
    torus = allreduce.make_torus_aggregator((2, 4), backend=cls.strategy,
                                            timeout_seconds=120)

    def recording_torus(grads_and_vars):
      cls.torus_calls.append(len(grads_and_vars))
      return torus(grads_and_vars)

    cls.torus, cls.torus_optimizer = _build(cls.strategy, recording_torus)
    cls.builtin, cls.builtin_optimizer = _build(cls.strategy, None)
    cls.initial = _weights(cls.torus)

  @classmethod
  def tearDownClass(cls):
    tf_keras.mixed_precision.set_global_policy("float32")
    super().tearDownClass()

  def _fit(self, model, features, labels):
    model.fit(_batches(features, labels), epochs=1, verbose=0)

  def test_float16_compute_float32_weights(self):
    hidden = self.torus.backbone.get_layer("hidden")
    self.assertEqual(hidden.compute_dtype, "float16")
    self.assertEqual(hidden.kernel.dtype, tf.float32)

  def test_torus_matches_strategy_allreduce_then_skips_a_non_finite_step(self):
    # One test, in order: the two models share their history.
    features, labels = _features_and_labels(4 * _GLOBAL_BATCH)
    for model in (self.torus, self.builtin):
      self._fit(model, features, labels)
    self.assertNotEmpty(self.torus_calls)  # the loss-scaled step went through it
    for expected, actual in zip(_weights(self.builtin), _weights(self.torus)):
      self.assertAllClose(expected, actual, rtol=1e-5, atol=1e-6)
    moved = max(np.abs(a - b).max() for a, b in zip(self.initial, _weights(self.torus)))
    self.assertGreater(moved, 1e-3)  # not vacuous: 4 steps moved the weights
    scale_before = float(self.torus_optimizer.loss_scale)
    self.assertAllClose(scale_before, float(self.builtin_optimizer.loss_scale))

    # One example past float16's range (65504): inf on the replica holding it alone.
    # The sum carries it to every replica, so every replica skips the step and the
    # float32 weights stay exactly as they were; the loss scale halves.
    poisoned_features, poisoned_labels = _features_and_labels(_GLOBAL_BATCH, seed=1)
    poisoned_features[0, 0] = 1e6
    before = _weights(self.torus)
    for model in (self.torus, self.builtin):
      self._fit(model, poisoned_features, poisoned_labels)
    for expected, actual in zip(before, _weights(self.torus)):
      self.assertAllEqual(expected, actual)
    self.assertAllClose(float(self.torus_optimizer.loss_scale), scale_before / 2)
    self.assertAllClose(float(self.builtin_optimizer.loss_scale), scale_before / 2)

    # Training goes on, and the two all-reduces still agree.
    for model in (self.torus, self.builtin):
      self._fit(model, *_features_and_labels(2 * _GLOBAL_BATCH, seed=2))
    for expected, actual in zip(_weights(self.builtin), _weights(self.torus)):
      self.assertAllClose(expected, actual, rtol=1e-5, atol=1e-6)
    self.assertFalse(all(np.array_equal(a, b)
                         for a, b in zip(before, _weights(self.torus))))


if __name__ == "__main__":
  tf.test.main()
