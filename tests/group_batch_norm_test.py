"""Tests for resnet.group_batch_norm against a NumPy reference, on 8 logical CPUs."""

from tests import logical_devices

logical_devices.configure_logical_cpus()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import tf_keras

from allreduce import collectives
from allreduce import topology as topology_lib
from resnet import group_batch_norm

NUM_REPLICAS = 8
CHANNELS = 3
HEIGHT, WIDTH = 2, 3
MOMENTUM = 0.9
EPSILON = 1e-3
EVEN_BATCHES = (2,) * NUM_REPLICAS
# Uneven on purpose, within groups of every size: a replica with one example next to
# one with four shows whether the moments are weighted by example counts.
UNEVEN_BATCHES = (1, 4, 2, 3, 3, 1, 4, 2)


def random_replica_values(batches, seed, offset=0.0):
  """Per-replica NHWC arrays; per-channel means away from zero, as activations have."""
  rng = np.random.default_rng(seed)
  channel_means = offset + rng.uniform(-2.0, 2.0, size=CHANNELS)
  return [(channel_means + rng.normal(size=(b, HEIGHT, WIDTH, CHANNELS)) *
           rng.uniform(0.5, 2.0, size=CHANNELS)).astype(np.float32) for b in batches]


def reference_group_batch_norm(inputs, upstreams, groups, gamma, beta,
                               moving_mean=0.0, moving_variance=1.0):
  """NumPy (float64) training step of batch norm over each group's concatenated batch.

  The loss is sum over replicas of sum(output * upstream). Returns per-replica lists
  of outputs, input gradients, gamma gradients, beta gradients, and the replica's moving
  mean and variance after the step.
  """
  results = {key: [None] * len(inputs) for key in
             ("outputs", "input_grads", "gamma_grads", "beta_grads", "moving_means",
              "moving_variances")}
  axes = (0, 1, 2)
  for group in groups:
    x = np.concatenate([inputs[r] for r in group]).astype(np.float64)
    g = np.concatenate([upstreams[r] for r in group]).astype(np.float64)
    mean, variance = x.mean(axis=axes), x.var(axis=axes)
    inv_std = 1.0 / np.sqrt(variance + EPSILON)
    normalized = (x - mean) * inv_std
    outputs = gamma * normalized + beta
    input_grads = gamma * inv_std * (
        g - g.mean(axis=axes) - normalized * (g * normalized).mean(axis=axes))
    start = 0
    for replica in group:
      rows = slice(start, start + len(inputs[replica]))
      start += len(inputs[replica])
      results["outputs"][replica] = outputs[rows]
      results["input_grads"][replica] = input_grads[rows]
      results["gamma_grads"][replica] = (g[rows] * normalized[rows]).sum(axis=axes)
      results["beta_grads"][replica] = g[rows].sum(axis=axes)
      results["moving_means"][replica] = (
          MOMENTUM * moving_mean + (1 - MOMENTUM) * mean)
      results["moving_variances"][replica] = (
          MOMENTUM * moving_variance + (1 - MOMENTUM) * variance)
  return results


def run_training_step(strategy, layer, inputs, upstreams):
  """One `training=True` call per replica with a tape; returns per-replica NumPy lists.

  Inputs may have a different batch size on every replica.
  """
  def per_replica(arrays):
    return strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(arrays[context.replica_id_in_sync_group]))

  @tf.function
  def step(x, upstream):
    def replica_step(x, upstream):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
      input_grad, gamma_grad, beta_grad = tape.gradient(
          loss, [x, layer.gamma, layer.beta])
      return y, input_grad, gamma_grad, beta_grad
    return strategy.run(replica_step, args=(x, upstream))

  outputs = step(per_replica(inputs), per_replica(upstreams))
  keys = ("outputs", "input_grads", "gamma_grads", "beta_grads")
  results = {key: [np.asarray(tf.cast(v, tf.float32))
                   for v in strategy.experimental_local_results(value)]
             for key, value in zip(keys, outputs)}
  # The moving statistics are sync-on-read: each replica keeps its own copy.
  results["moving_means"] = [
      v.numpy() for v in strategy.experimental_local_results(layer.moving_mean)]
  results["moving_variances"] = [
      v.numpy() for v in strategy.experimental_local_results(layer.moving_variance)]
  return results


def build_layer(strategy, layer_class, **kwargs):
  kwargs.setdefault("momentum", MOMENTUM)
  kwargs.setdefault("epsilon", EPSILON)
  # Not the defaults, so a mix-up of gamma and beta, or of replicas, shows.
  kwargs.setdefault("gamma_initializer", tf_keras.initializers.Constant(1.5))
  kwargs.setdefault("beta_initializer", tf_keras.initializers.Constant(-0.5))
  with strategy.scope():
    layer = layer_class(**kwargs)
    layer.build((None, HEIGHT, WIDTH, CHANNELS))
  return layer


def relative_error(actual, expected):
  """max |actual - expected| / max |expected|, over the whole array."""
  expected = np.asarray(expected, np.float64)
  scale = max(np.max(np.abs(expected)), 1e-12)
  return np.max(np.abs(np.asarray(actual, np.float64) - expected)) / scale


class GroupSyncBatchNormalizationTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.strategy = logical_devices.cpu_mirrored_strategy(NUM_REPLICAS)

  def assert_results_close(self, actual, expected, tolerance, keys=None):
    for key in keys or expected:
      for replica, (a, e) in enumerate(zip(actual[key], expected[key])):
        error = relative_error(a, e)
        self.assertLess(error, tolerance,
                        f"{key} of replica {replica}: relative error {error:.2e}")

  @parameterized.product(group_size=[1, 2, 4, 8], batches=["even", "uneven"])
  def test_matches_numpy_reference(self, group_size, batches):
    batches = EVEN_BATCHES if batches == "even" else UNEVEN_BATCHES
    inputs = random_replica_values(batches, seed=group_size)
    upstreams = random_replica_values(batches, seed=100 + group_size)
    groups = topology_lib.TorusTopology.for_replicas(NUM_REPLICAS).block_groups(
        group_size)
    layer = build_layer(self.strategy, group_batch_norm.GroupSyncBatchNormalization,
                        group_size=group_size, group_assignment=groups)

    actual = run_training_step(self.strategy, layer, inputs, upstreams)

    expected = reference_group_batch_norm(inputs, upstreams, groups, 1.5, -0.5)
    self.assert_results_close(actual, expected, 1e-5)

  def test_groups_without_assignment_are_the_most_square_torus_blocks(self):
    inputs = random_replica_values(UNEVEN_BATCHES, seed=7)
    upstreams = random_replica_values(UNEVEN_BATCHES, seed=8)
    layer = build_layer(self.strategy, group_batch_norm.GroupSyncBatchNormalization,
                        group_size=4)

    actual = run_training_step(self.strategy, layer, inputs, upstreams)

    # 8 replicas -> a 2x4 torus; a group of 4 is a 2x2 block.
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    self.assertEqual(layer.groups_for(NUM_REPLICAS), groups)
    expected = reference_group_batch_norm(inputs, upstreams, groups, 1.5, -0.5)
    self.assert_results_close(actual, expected, 1e-5)

  def test_group_of_all_replicas_matches_sync_batch_normalization(self):
    inputs = random_replica_values(UNEVEN_BATCHES, seed=11)
    upstreams = random_replica_values(UNEVEN_BATCHES, seed=12)
    grouped = build_layer(self.strategy, group_batch_norm.GroupSyncBatchNormalization,
                          group_size=NUM_REPLICAS)
    synced = build_layer(self.strategy,
                         tf_keras.layers.experimental.SyncBatchNormalization)

    actual = run_training_step(self.strategy, grouped, inputs, upstreams)
    expected = run_training_step(self.strategy, synced, inputs, upstreams)

    self.assert_results_close(actual, expected, 1e-5)

  def test_group_of_one_matches_batch_normalization_on_each_replica(self):
    inputs = random_replica_values(UNEVEN_BATCHES, seed=13)
    upstreams = random_replica_values(UNEVEN_BATCHES, seed=14)
    grouped = build_layer(self.strategy, group_batch_norm.GroupSyncBatchNormalization,
                          group_size=1)

    actual = run_training_step(self.strategy, grouped, inputs, upstreams)

    for replica, (x, upstream) in enumerate(zip(inputs, upstreams)):
      # Unfused: the fused kernel updates the moving variance with the unbiased
      # (n / (n - 1)) variance, the unfused and sync layers with the biased one.
      alone = build_layer(tf.distribute.get_strategy(),
                          tf_keras.layers.BatchNormalization, fused=False)
      x = tf.constant(x)
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = alone(x, training=True)
        loss = tf.reduce_sum(y * upstream)
      grads = tape.gradient(loss, [x, alone.gamma, alone.beta])
      expected = [y, *grads, alone.moving_mean, alone.moving_variance]
      for key, e in zip(("outputs", "input_grads", "gamma_grads", "beta_grads",
                         "moving_means", "moving_variances"), expected):
        error = relative_error(actual[key][replica], e)
        self.assertLess(error, 1e-5, f"{key} of replica {replica}: {error:.2e}")

  def test_bfloat16_activations_accumulate_moments_in_float32(self):
    inputs = random_replica_values(UNEVEN_BATCHES, seed=15)
    upstreams = random_replica_values(UNEVEN_BATCHES, seed=16)
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    layer = build_layer(self.strategy, group_batch_norm.GroupSyncBatchNormalization,
                        group_size=2, group_assignment=groups, dtype="mixed_bfloat16")
    self.assertEqual(layer.moving_mean.dtype, tf.float32)

    actual = run_training_step(self.strategy, layer, inputs, upstreams)

    # The layer sees bfloat16 activations; from there on its moments are float32, so
    # the moving statistics match a float64 reference on the rounded inputs to 1e-5.
    rounded = [np.asarray(tf.cast(tf.cast(x, tf.bfloat16), tf.float32))
               for x in inputs]
    expected = reference_group_batch_norm(rounded, upstreams, groups, 1.5, -0.5)
    self.assert_results_close(actual, expected, 1e-5,
                              keys=["moving_means", "moving_variances"])
    # Outputs are rounded to bfloat16 (8 bits of mantissa); gradients pass through it.
    self.assert_results_close(actual, expected, 2e-2,
                              keys=["outputs", "input_grads", "gamma_grads",
                                    "beta_grads"])

  def test_shift_by_moving_mean_avoids_cancellation(self):
    # Activations whose mean is a hundred times their spread: E[x^2] - E[x]^2 in
    # float32 then loses about four digits (a relative error near 3e-4 in the
    # variance here), unless the sums are taken about a shift near the mean. The
    # moving mean is that shift once it has tracked the data.
    inputs = random_replica_values(UNEVEN_BATCHES, seed=17, offset=100.0)
    upstreams = random_replica_values(UNEVEN_BATCHES, seed=18)
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    tracked_mean = np.float32(100.0)
    layer = build_layer(
        self.strategy, group_batch_norm.GroupSyncBatchNormalization, group_size=2,
        group_assignment=groups,
        moving_mean_initializer=tf_keras.initializers.Constant(tracked_mean))

    actual = run_training_step(self.strategy, layer, inputs, upstreams)

    expected = reference_group_batch_norm(inputs, upstreams, groups, 1.5, -0.5,
                                          moving_mean=tracked_mean)
    # Only the moments are in this layer's hands. The gradients are computed by
    # tf.nn.batch_normalization, whose x * a + b form (shared by every tf_keras
    # batch norm) has its own cancellation for such inputs.
    self.assert_results_close(actual, expected, 1e-5,
                              keys=["outputs", "moving_means", "moving_variances"])

  def trace_training_step(self, layer, with_gradient):
    """The graph of one training step on every replica (traced, not run)."""
    @tf.function
    def step(x):
      def replica_step(x):
        with tf.GradientTape() as tape:
          tape.watch(x)
          y = layer(x, training=True)
        return tape.gradient(y, x) if with_gradient else y
      return self.strategy.run(replica_step, args=(x,))
    spec = tf.TensorSpec((2, HEIGHT, WIDTH, CHANNELS), tf.float32)
    return step.get_concrete_function(spec).graph

  @parameterized.parameters(1, 2, 4, 8)
  def test_one_collective_per_layer_call_on_cpu(self, group_size):
    layer = build_layer(self.strategy, group_batch_norm.GroupSyncBatchNormalization,
                        group_size=group_size)
    for with_gradient, calls_per_replica in ((False, 1), (True, 2)):
      graph = self.trace_training_step(layer, with_gradient)
      reduces = [op for op in graph.get_operations()
                 if op.type == "CollectiveReduceV2"]
      expected = 0 if group_size == 1 else NUM_REPLICAS * calls_per_replica
      self.assertLen(reduces, expected)
      for op in reduces:
        # Sum and sum of squares of 3 channels and the count: 7 values.
        self.assertEqual(op.inputs[0].shape.as_list(), [2 * CHANNELS + 1])
        self.assertEqual(tf.get_static_value(op.inputs[1]), group_size)

  @parameterized.parameters(1, 2, 4, 8)
  def test_tpu_graph_has_one_cross_replica_sum_per_layer_call(self, group_size):
    # The TPU back end cannot run here, but its graph can be built: one
    # CrossReplicaSum per replica's layer call (and one more for its gradient), each
    # with the torus groups as its group_assignment constant.
    groups = topology_lib.TorusTopology.for_replicas(NUM_REPLICAS, (2, 4)).block_groups(
        group_size)
    layer = build_layer(self.strategy, group_batch_norm.GroupSyncBatchNormalization,
                        group_size=group_size, group_assignment=groups,
                        backend=collectives.TpuBackend())
    for with_gradient, calls_per_replica in ((False, 1), (True, 2)):
      graph = self.trace_training_step(layer, with_gradient)
      sums = [op for op in graph.get_operations() if op.type == "CrossReplicaSum"]
      expected = 0 if group_size == 1 else NUM_REPLICAS * calls_per_replica
      self.assertLen(sums, expected)
      for op in sums:
        self.assertEqual(op.inputs[0].shape.as_list(), [2 * CHANNELS + 1])
        self.assertEqual(tf.get_static_value(op.inputs[1]).tolist(), groups)

  def test_inference_uses_moving_statistics(self):
    layer = build_layer(self.strategy, group_batch_norm.GroupSyncBatchNormalization,
                        group_size=2,
                        moving_mean_initializer=tf_keras.initializers.Constant(0.25),
                        moving_variance_initializer=tf_keras.initializers.Constant(4.0))
    x = random_replica_values([3], seed=19)[0]

    y = self.strategy.run(tf.function(lambda: layer(tf.constant(x), training=False)))

    expected = 1.5 * (x - 0.25) / np.sqrt(4.0 + EPSILON) - 0.5
    for value in self.strategy.experimental_local_results(y):
      self.assertLess(relative_error(value, expected), 1e-6)

  def test_outside_a_strategy_is_plain_batch_norm(self):
    x = tf.constant(random_replica_values([5], seed=20)[0])
    default = tf.distribute.get_strategy()
    grouped = build_layer(default, group_batch_norm.GroupSyncBatchNormalization,
                          group_size=4, group_assignment=[[0, 1, 2, 3], [4, 5, 6, 7]])
    plain = build_layer(default, tf_keras.layers.BatchNormalization, fused=False)

    self.assertLess(relative_error(grouped(x, training=True),
                                   plain(x, training=True)), 1e-5)
    self.assertAllClose(grouped.moving_variance, plain.moving_variance, rtol=1e-5)

  def test_assignment_for_another_replica_count_is_an_error(self):
    layer = build_layer(self.strategy, group_batch_norm.GroupSyncBatchNormalization,
                        group_size=2, group_assignment=[[0, 1], [2, 3]])
    x = tf.constant(random_replica_values([2], seed=21)[0])
    with self.assertRaisesRegex(ValueError, "cover 4 replicas .* runs 8"):
      self.strategy.run(tf.function(lambda: layer(x, training=True)))

  def test_bad_group_assignments_are_rejected(self):
    with self.assertRaisesRegex(ValueError, "partition"):
      group_batch_norm.GroupSyncBatchNormalization(
          group_size=2, group_assignment=[[0, 1], [1, 2]])
    with self.assertRaisesRegex(ValueError, "group_size=2"):
      group_batch_norm.GroupSyncBatchNormalization(
          group_size=2, group_assignment=[[0, 1, 2], [3]])
    with self.assertRaisesRegex(ValueError, "virtual_batch_size"):
      group_batch_norm.GroupSyncBatchNormalization(group_size=2, virtual_batch_size=2)

  def test_config_round_trip(self):
    layer = group_batch_norm.GroupSyncBatchNormalization(
        group_size=2, group_assignment=[[0, 1], [2, 3]], momentum=0.9, name="bn")
    clone = group_batch_norm.GroupSyncBatchNormalization.from_config(
        layer.get_config())
    self.assertEqual(clone.group_size, 2)
    self.assertEqual(clone.group_assignment, [[0, 1], [2, 3]])
    self.assertEqual(clone.momentum, 0.9)


class BatchNormFactoryTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(
      (2, [[0, 1], [2, 3], [4, 5], [6, 7]]),  # a pair along x: one hop
      (4, [[0, 1, 2, 3], [4, 5, 6, 7]]),  # x is only 2 wide: a 2x2 block
      (8, [[0, 1, 2, 3, 4, 5, 6, 7]]),
  )
  def test_groups_are_torus_blocks(self, group_size, groups):
    topology = topology_lib.TorusTopology.for_replicas(8, (2, 4))
    factory = group_batch_norm.make_batch_norm_factory(group_size, topology)

    layer = factory(name="bn", gamma_initializer="zeros")

    self.assertIsInstance(layer, group_batch_norm.GroupSyncBatchNormalization)
    self.assertEqual(layer.group_assignment, groups)
    self.assertEqual((layer.momentum, layer.epsilon), (0.9, 1e-5))
    self.assertEqual(layer.name, "bn")

  def test_group_of_one(self):
    factory = group_batch_norm.make_batch_norm_factory(
        1, topology_lib.TorusTopology.for_replicas(8, (2, 4)))
    layer = factory(name="bn")
    # The grouped layer even alone: one code path and one moving-variance convention.
    self.assertIsInstance(layer, group_batch_norm.GroupSyncBatchNormalization)
    self.assertEqual(layer.group_assignment, [[r] for r in range(8)])
    self.assertEqual(layer.momentum, 0.9)
    self.assertEqual(layer.epsilon, 1e-5)

  @parameterized.parameters(3, 16)
  def test_group_size_that_does_not_fit_the_torus_is_an_error(self, group_size):
    topology = topology_lib.TorusTopology.for_replicas(8, (2, 4))
    with self.assertRaisesRegex(topology_lib.TopologyError, str(group_size)):
      group_batch_norm.make_batch_norm_factory(group_size, topology)

  def test_follows_the_mixed_precision_policy(self):
    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
      layer = group_batch_norm.make_batch_norm_factory(2)(name="bn")
    finally:
      tf_keras.mixed_precision.set_global_policy("float32")
    self.assertEqual(layer.compute_dtype, "bfloat16")
    self.assertEqual(layer.variable_dtype, "float32")


if __name__ == "__main__":
  tf.test.main()
