"""The large-batch recipe: schedule, weight decay exclusions, label smoothing, LARS on
the torus, the weight average, and the paper presets."""

import math

from tests import logical_devices

logical_devices.configure_logical_cpus()

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf
import tf_keras
from absl.testing import parameterized

import allreduce
from training import config as config_lib
from training import optimizer as optimizer_lib
from training import weight_decay
from training import model as model_lib


def _tiny_classifier(**kwargs):
  inputs = tf_keras.Input((4,))
  hidden = tf_keras.layers.Dense(8, name="hidden")(inputs)
  hidden = tf_keras.layers.BatchNormalization(name="hidden_bn")(hidden)
  logits = tf_keras.layers.Dense(3, name="logits")(tf_keras.layers.ReLU()(hidden))
  return model_lib.ImageClassifier(tf_keras.Model(inputs, logits), **kwargs)


class ScheduleTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("polynomial", "cosine")
  def test_warmup_is_linear_to_the_peak(self, decay):
    schedule = optimizer_lib.warmup_then_decay(2.0, warmup_steps=10, total_steps=110,
                                             decay=decay)
    for step in (0, 1, 5, 9):
      self.assertAllClose(schedule(step), 2.0 * step / 10)
    self.assertAllClose(schedule(10), 2.0)
    self.assertAllClose(schedule(110), 0.0)
    self.assertAllClose(schedule(500), 0.0)  # Stays at zero past the end.

  def test_polynomial_decay_matches_the_formula(self):
    schedule = optimizer_lib.warmup_then_decay(34.0, warmup_steps=500, total_steps=3558,
                                             decay="polynomial", power=2.0)
    for step in (500, 1000, 2000, 3000, 3557):
      expected = 34.0 * (1 - (step - 500) / (3558 - 500)) ** 2
      self.assertAllClose(schedule(step), expected, rtol=1e-5)

  def test_cosine_decay_matches_the_formula(self):
    schedule = optimizer_lib.warmup_then_decay(1.0, warmup_steps=0, total_steps=100,
                                             decay="cosine")
    for step in (0, 25, 50, 75):
      self.assertAllClose(schedule(step), 0.5 * (1 + math.cos(math.pi * step / 100)),
                          atol=1e-6)


class WeightDecayTest(tf.test.TestCase):

  def test_only_kernels_are_decayed(self):
    model = _tiny_classifier(global_batch_size=2, num_classes=3)
    decayed = sorted(v.name for v in model.trainable_variables
                     if weight_decay.is_decayed(v))
    self.assertEqual(decayed, ["hidden/kernel:0", "logits/kernel:0"])
    penalty = weight_decay.l2_penalty(model.trainable_variables, 1e-2)
    kernels = [v.numpy() for v in model.trainable_variables if "kernel" in v.name]
    self.assertAllClose(penalty, 1e-2 * sum((k**2).sum() / 2 for k in kernels))

  def test_lars_decays_kernels_but_not_excluded_variables(self):
    model = _tiny_classifier(global_batch_size=2, num_classes=3)
    lars = optimizer_lib.build_optimizer("lars", 1.0, momentum=0.0, weight_decay=0.1)
    for variable in model.trainable_variables:
      variable.assign(tf.ones_like(variable))
    # Zero gradients: any change is weight decay alone.
    lars.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    for variable in model.trainable_variables:
      changed = not np.allclose(variable.numpy(), 1.0)
      self.assertEqual(changed, weight_decay.is_decayed(variable), variable.name)


class LabelSmoothingTest(tf.test.TestCase):

  def test_loss_matches_numpy(self):
    model = _tiny_classifier(global_batch_size=2, num_classes=3, label_smoothing=0.1)
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]], np.float32)
    labels = np.array([0, 1])
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = np.full((2, 3), 0.1 / 3)
    targets[np.arange(2), labels] += 0.9
    expected = -(targets * log_softmax).sum(-1)
    self.assertAllClose(model.per_example_loss(labels, logits), expected)
    plain = _tiny_classifier(global_batch_size=2, num_classes=3)
    self.assertAllClose(plain.per_example_loss(labels, logits),
                        -log_softmax[np.arange(2), labels])


class LarsOnTheTorusTest(tf.test.TestCase):

  def test_lars_with_the_torus_aggregator_trains(self):
    strategy = logical_devices.cpu_mirrored_strategy(8)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(256, 4)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int32) + (features[:, 1] > 0)
    with strategy.scope():
      model = _tiny_classifier(global_batch_size=64, num_classes=3,
                               ema_decay=0.9)
      model.compile(optimizer=optimizer_lib.build_optimizer(
          "lars", 2.0, momentum=0.9, weight_decay=1e-4,
          gradient_aggregator=allreduce.make_torus_aggregator(
              (2, 4), backend=strategy, timeout_seconds=120)))
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).repeat().batch(64)
    history = model.fit(dataset, epochs=4, steps_per_epoch=8, verbose=0)
    self.assertLess(history.history["loss"][-1], 0.75 * history.history["loss"][0])
    # The weight average moved off the initial weights and trails the live ones.
    average = model.weight_average
    self.assertEqual(int(average.num_updates.numpy()), 32)
    live = model.backbone.trainable_variables[0].numpy()
    averaged = average.averages[0].numpy()
    self.assertFalse(np.allclose(live, averaged))
    average.swap()
    self.assertAllClose(model.backbone.trainable_variables[0].numpy(), averaged)
    average.swap()
    self.assertAllClose(model.backbone.trainable_variables[0].numpy(), live)


class MixedPrecisionTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("mixed_float16", "mixed_bfloat16")
  def test_trains_with_float32_master_weights(self, policy):
    tf_keras.mixed_precision.set_global_policy(policy)
    try:
      model = _tiny_classifier(global_batch_size=32, num_classes=3)
      optimizer = optimizer_lib.build_optimizer("sgd", 0.1, momentum=0.9)
      if policy == "mixed_float16":  # float16 needs loss scaling; bfloat16 does not.
        optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
      model.compile(optimizer=optimizer)
      rng = np.random.default_rng(1)
      features = rng.normal(size=(256, 4)).astype(np.float32)
      labels = (features[:, 0] > 0).astype(np.int32) + (features[:, 1] > 0)
      history = model.fit(features, labels, batch_size=32, epochs=3, verbose=0)
    finally:
      tf_keras.mixed_precision.set_global_policy("float32")
    self.assertLess(history.history["loss"][-1], 0.75 * history.history["loss"][0])
    hidden = model.backbone.get_layer("hidden")
    self.assertEqual(hidden.compute_dtype, policy.split("_")[1])
    self.assertEqual(hidden.kernel.dtype, tf.float32)
    if policy == "mixed_float16":
      self.assertTrue(np.isfinite(float(optimizer.loss_scale)))


class PaperPresetTest(tf.test.TestCase):

  def test_paper_32k_matches_the_reference_recipe(self):
    config = config_lib.build_config("paper_32k", data_dir=self.get_temp_dir())
    self.assertEqual(config.loop.train_batch_size, 32768)
    self.assertEqual(config.loop.steps_for(1_281_167), 3558)
    self.assertAlmostEqual(config.learning_rate, 34.0)
    self.assertEqual((config.optimizer.optimizer, config.optimizer.label_smoothing,
                      config.model.precision),
                     ("lars", 0.1, "mixed_bfloat16"))
    # 2048 replicas (1024 TPU v3 chips) on the most square grid, groups of 2.
    config_lib.check_against_replicas(config, 2048)
    self.assertEqual(config.grid(2048).shape, (32, 64))

  def test_paper_64k(self):
    config = config_lib.build_config("paper_64k", data_dir=self.get_temp_dir())
    self.assertAlmostEqual(config.learning_rate, 41.0)
    self.assertEqual(config.loop.steps_for(1_281_167), math.ceil(90 * 1_281_167 / 65536))


class WeightAverageTest(tf.test.TestCase):
  """Why the trainer keeps its own weight average (training/model.py) instead of Model
  Garden's ExponentialMovingAverage optimizer: the library's average starts at zero,
  and its swap adds and subtracts the two sets of weights, which float32 cannot undo
  when their magnitudes differ."""

  def _dense(self, weights):
    model = tf_keras.Sequential([tf_keras.layers.Dense(1, use_bias=False,
                                                       input_shape=(len(weights),))])
    model.layers[0].kernel.assign(np.reshape(weights, (-1, 1)))
    return model

  def test_library_average_starts_at_zero_and_its_swap_is_not_exact(self):
    from official.modeling.optimization import ema_optimizer  # pylint: disable=g-import-not-at-top
    live, average = [1e8, 3.0], [2.0, 1e-8]
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():  # its swap needs one
      model = self._dense(live)
      library = ema_optimizer.ExponentialMovingAverage(
          tf_keras.optimizers.legacy.SGD(0.1))
      library.shadow_copy(model)
      shadow = library._average_weights[0]  # pylint: disable=protected-access
      self.assertAllEqual(shadow.numpy(), [[0.0], [0.0]])
      shadow.assign(np.reshape(average, (-1, 1)))
      library.swap_weights()
    self.assertNotAllClose(model.layers[0].kernel.numpy().ravel(), average, rtol=1e-3)

  def test_our_average_starts_at_the_weights_and_swaps_exactly(self):
    live, average = [1e8, 3.0], [2.0, 1e-8]
    model = self._dense(live)
    ours = model_lib.WeightAverage(model.trainable_variables, decay=0.99)
    self.assertAllEqual(ours.averages[0].numpy().ravel(), live)
    ours.averages[0].assign(np.reshape(average, (-1, 1)))
    ours.swap()
    self.assertAllEqual(model.layers[0].kernel.numpy().ravel(), np.float32(average))
    ours.swap()
    self.assertAllEqual(model.layers[0].kernel.numpy().ravel(), np.float32(live))


if __name__ == "__main__":
  tf.test.main()
