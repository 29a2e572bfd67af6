"""Tests for the sharded weight update on 8 logical CPUs.

The sharded SGD and LARS must end where the unsharded tf_keras SGD and Model Garden
LARS (summing with the strategy's all-reduce) end, weights and momentum slots alike,
on 2x4 and 4x2 grids, sharded over x and over x*y: with weight-decay exclusions, a
learning-rate schedule, layers split across shards, a step with non-finite gradients
(skipped, as under a loss-scale optimizer), `model.fit` under mixed_bfloat16, and
checkpoints restored across sharded and unsharded runs and across grids.
"""

from tests import logical_devices

logical_devices.configure_logical_cpus()

# pylint: disable=g-import-not-at-top,g-bad-import-order
import os

from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import tf_keras
from official.modeling.optimization import lars

from allreduce import torus_aggregator
from allreduce.topology import TorusTopology
from training import optimizer as optimizer_lib
from training import weight_decay
from training import sharded_optimizer

TIMEOUT_SECONDS = 60
NUM_REPLICAS = 8
NUM_STEPS = 4
# Small packs, so that a model of a few hundred weights still spans several packs and
# layers are cut across shards.
PACK_SIZE_BYTES = 1024

# (name, shape, initial scale): decayed kernels, excluded bias / gamma / beta, a
# tensor (13 x 5) whose size divides by no grid side, a kernel larger than a pack, and
# an all-zero kernel (LARS's trust ratio of 1 where ||w|| = 0).
VARIABLE_SPECS = (
    ("conv/kernel", (3, 3, 2, 4), 0.5),
    ("conv/bias", (4,), 0.1),
    ("bn/gamma", (4,), 1.0),
    ("bn/beta", (4,), 0.1),
    ("dense/kernel", (13, 5), 0.3),
    ("dense/bias", (5,), 0.1),
    ("head/kernel", (40, 10), 0.2),
    ("zero/kernel", (3, 7), 0.0),
)

_STRATEGY = None


def strategy():
  global _STRATEGY
  if _STRATEGY is None:
    _STRATEGY = logical_devices.cpu_mirrored_strategy(NUM_REPLICAS)
  return _STRATEGY


def initial_values():
  rng = np.random.default_rng(1)
  return [(rng.standard_normal(shape) * scale + (1.0 if "gamma" in name else 0.0)
           ).astype(np.float32) for name, shape, scale in VARIABLE_SPECS]


def gradient_values(num_steps, non_finite_step=None):
  """[variable] arrays `[step, replica, ...]`; one replica's gradient holds an inf at
  `non_finite_step`."""
  rng = np.random.default_rng(2)
  values = [rng.standard_normal((num_steps, NUM_REPLICAS) + shape).astype(np.float32)
            for _, shape, _ in VARIABLE_SPECS]
  if non_finite_step is not None:
    values[4][non_finite_step, 3, 2, 1] = np.inf
  return values


def make_variables():
  with strategy().scope():
    return [tf.Variable(value, name=name) for value, (name, _, _)
            in zip(initial_values(), VARIABLE_SPECS)]


def schedule():
  return optimizer_lib.warmup_then_decay(peak=0.4, warmup_steps=2, total_steps=8)


def make_optimizer(rule, sharding=None):
  """The unsharded optimizer of `rule` (sharding None) or its sharded twin."""
  nesterov = rule.endswith("_nesterov")
  if rule.startswith("sgd"):
    cls = tf_keras.optimizers.legacy.SGD if sharding is None else (
        sharded_optimizer.ShardedSGD)
    kwargs = dict(momentum=0.9, nesterov=nesterov)
  else:
    cls = lars.LARS if sharding is None else sharded_optimizer.ShardedLARS
    kwargs = dict(momentum=0.9, nesterov=nesterov, weight_decay_rate=0.05, eeta=0.1,
                  exclude_from_weight_decay=list(weight_decay.EXCLUDED_FROM_DECAY),
                  exclude_from_layer_adaptation=list(
                      weight_decay.EXCLUDED_FROM_DECAY))
  if sharding is not None:
    kwargs["sharding"] = sharding
  with strategy().scope():
    return cls(schedule(), **kwargs)


def make_sharding(grid, shards, skip_non_finite=False):
  return sharded_optimizer.WeightUpdateSharding(
      TorusTopology(*grid), shards=shards, pack_size_bytes=PACK_SIZE_BYTES,
      skip_non_finite=skip_non_finite, timeout_seconds=TIMEOUT_SECONDS)


def run_steps(optimizer, variables, gradients, steps):
  """Applies `gradients[i][step, replica]` to `variables` for each step of `steps`."""
  with strategy().scope():
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    inner._create_all_weights(variables)  # pylint: disable=protected-access
  tables = [tf.constant(g) for g in gradients]

  @tf.function
  def step(index):
    def replica_step():
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      grads = [tf.gather(tf.gather(t, index), replica) for t in tables]
      optimizer.apply_gradients(zip(grads, variables))
    strategy().run(replica_step)

  for index in steps:
    step(tf.constant(index))


def replica_values(variable):
  """Every replica's copy of `variable`."""
  return [v.numpy() for v in strategy().experimental_local_results(variable)]


def slot_values(optimizer, variables):
  if isinstance(optimizer, sharded_optimizer.ShardedUpdate):
    optimizer.gather_slots_for_checkpoint()
  return [replica_values(optimizer.get_slot(v, "momentum")) for v in variables]


class ShardLayoutTest(tf.test.TestCase, parameterized.TestCase):
  """The pure layout pieces, eagerly: no strategy."""

  def test_static_and_dynamic_shards_agree_with_the_buffer(self):
    sizes = [5, 17, 3, 40]
    packs = torus_aggregator.plan_packs(sizes, [tf.float32] * 4, 1 << 20,
                                        num_shards=4)
    self.assertLen(packs, 1)
    pack = packs[0]
    tensors = [tf.range(1, n + 1, dtype=tf.float32) * (i + 1)
               for i, n in enumerate(sizes)]
    buffer = pack.to_buffer(tensors).numpy()
    length = pack.length // 4
    expected_ids = np.searchsorted(np.cumsum(pack.slots), np.arange(pack.length),
                                   side="right")
    for index in range(4):
      static = sharded_optimizer.PackShard(pack, index * length, length)
      dynamic = sharded_optimizer.PackShard(pack, tf.constant(index * length), length)
      window = slice(index * length, (index + 1) * length)
      self.assertAllEqual(static.cut(tensors), buffer[window])
      self.assertAllEqual(dynamic.cut(tensors), buffer[window])
      self.assertAllEqual(static.member_ids, expected_ids[window])
      self.assertAllEqual(dynamic.member_ids, expected_ids[window])
    for got, want in zip(pack.from_buffer(tf.constant(buffer)), tensors):
      self.assertAllEqual(got, want)

  def test_member_sums_and_scale_agree_static_and_dynamic(self):
    sizes = [5, 17, 3, 40]
    # Three shards of 48: the first spans three members, the second one member and
    # padding, the third padding only.
    pack, = torus_aggregator.plan_packs(sizes, [tf.float32] * 4, 1 << 20,
                                        num_shards=3)
    tensors = [tf.range(1, n + 1, dtype=tf.float32) * (i + 1)
               for i, n in enumerate(sizes)]
    buffer = pack.to_buffer(tensors).numpy()
    ids = np.searchsorted(np.cumsum(pack.slots), np.arange(pack.length), side="right")
    per_member = tf.constant([2.0, 3.0, 5.0, 7.0, 11.0])
    length = pack.length // 3
    self.assertEqual(length, 48)
    for index in range(3):
      window = slice(index * length, (index + 1) * length)
      want_sums = np.bincount(ids[window], weights=buffer[window] ** 2, minlength=5)
      want_scaled = buffer[window] * per_member.numpy()[ids[window]]
      for start in (index * length, tf.constant(index * length)):
        shard = sharded_optimizer.PackShard(pack, start, length)
        values = tf.constant(buffer[window])
        self.assertAllClose(shard.member_sums(values * values), want_sums)
        self.assertAllClose(shard.scale(values, per_member), want_scaled)

  @parameterized.parameters(((2, 4), "x"), ((2, 4), "xy"), ((4, 2), "xy"))
  def test_shard_indices_tile_the_pack(self, grid, shards):
    sharding = make_sharding(grid, shards)
    indices = [sharding.shard_index(r) for r in range(NUM_REPLICAS)]
    copies = NUM_REPLICAS // sharding.num_shards
    self.assertCountEqual(indices, list(range(sharding.num_shards)) * copies)
    for group in sharding.norm_groups():
      self.assertCountEqual([indices[r] for r in group],
                            range(sharding.num_shards))


class ShardedUpdateTest(tf.test.TestCase, parameterized.TestCase):

  _reference_cache = {}

  def reference(self, rule, gradients_key="finite"):
    """Weights and slots of the unsharded optimizer after NUM_STEPS steps."""
    key = (rule, gradients_key)
    if key not in self._reference_cache:
      variables = make_variables()
      optimizer = make_optimizer(rule)
      run_steps(optimizer, variables, gradient_values(NUM_STEPS), range(NUM_STEPS))
      self._reference_cache[key] = ([v.numpy() for v in variables],
                                    slot_values(optimizer, variables))
    return self._reference_cache[key]

  def assert_matches(self, variables, optimizer, want_weights, want_slots):
    for variable, want in zip(variables, want_weights):
      for copy in replica_values(variable):
        self.assertAllClose(copy, want, rtol=2e-5, atol=2e-6, msg=variable.name)
    for variable, slots, want in zip(variables, slot_values(optimizer, variables),
                                     want_slots):
      for copy, want_copy in zip(slots, want):
        self.assertAllClose(copy, want_copy, rtol=2e-5, atol=2e-6,
                            msg=f"momentum of {variable.name}")

  @parameterized.parameters(
      ("sgd", (2, 4), "x"), ("sgd", (2, 4), "xy"),
      ("sgd", (4, 2), "x"), ("sgd", (4, 2), "xy"),
      ("lars", (2, 4), "x"), ("lars", (2, 4), "xy"),
      ("lars", (4, 2), "x"), ("lars", (4, 2), "xy"))
  def test_matches_the_unsharded_optimizer(self, rule, grid, shards):
    want_weights, want_slots = self.reference(rule)
    variables = make_variables()
    optimizer = make_optimizer(rule, make_sharding(grid, shards))
    run_steps(optimizer, variables, gradient_values(NUM_STEPS), range(NUM_STEPS))
    self.assertEqual(int(optimizer.iterations.numpy()), NUM_STEPS)
    self.assert_matches(variables, optimizer, want_weights, want_slots)

  def test_slots_per_replica_shrink_by_the_shard_count(self):
    variables = make_variables()
    total = sum(np.prod(shape) for _, shape, _ in VARIABLE_SPECS) * 4
    for shards, count in (("x", 2), ("xy", 8)):
      optimizer = make_optimizer("lars", make_sharding((2, 4), shards))
      with strategy().scope():
        optimizer._create_all_weights(variables)  # pylint: disable=protected-access
      sizes = optimizer.slot_bytes_per_replica()
      self.assertEqual(sizes["checkpoint_views"], total)
      # Padding to aligned, evenly divisible packs adds at most a little.
      self.assertBetween(sizes["shards"], total / count, total / count * 1.6)

  # Nesterov momentum is checked here, where the reference is built anyway.
  @parameterized.parameters(("sgd_nesterov", "xy"), ("lars_nesterov", "x"))
  def test_a_step_with_non_finite_gradients_is_skipped(self, rule, shards):
    gradients = gradient_values(NUM_STEPS, non_finite_step=1)
    variables = make_variables()
    reference = make_optimizer(rule)
    with strategy().scope():
      # Dynamic scaling skips non-finite steps; the gradients fed in are unscaled
      # already, so the scale's value plays no part.
      reference = tf_keras.mixed_precision.LossScaleOptimizer(
          reference, initial_scale=1.0, dynamic_growth_steps=1000)
    run_steps(reference, variables, gradients, range(NUM_STEPS))
    want_weights = [v.numpy() for v in variables]
    want_slots = slot_values(reference.inner_optimizer, variables)
    self.assertTrue(all(np.isfinite(w).all() for w in want_weights))

    variables = make_variables()
    optimizer = make_optimizer(
        rule, make_sharding((2, 4), shards, skip_non_finite=True))
    run_steps(optimizer, variables, gradients, range(NUM_STEPS))
    self.assertEqual(int(optimizer.iterations.numpy()), NUM_STEPS)
    self.assert_matches(variables, optimizer, want_weights, want_slots)

  @parameterized.parameters(("sgd", (2, 4), "xy"), ("lars", (4, 2), "x"))
  def test_dynamic_loss_scaling_matches_the_unsharded_optimizer(self, rule, grid,
                                                                shards):
    # Steps 1 and 2 overflow on one replica only (another each time): both are
    # skipped on every replica and the scale halves twice; two finite steps in a row
    # double it.
    gradients = gradient_values(NUM_STEPS + 2, non_finite_step=1)
    gradients[4][2, 6, 0, 0] = np.nan
    scales = dict(initial_scale=2.0**6, dynamic_growth_steps=2)
    variables = make_variables()
    with strategy().scope():
      reference = tf_keras.mixed_precision.LossScaleOptimizer(make_optimizer(rule),
                                                             **scales)
    run_steps(reference, variables, gradients, range(NUM_STEPS + 2))
    want_weights = [v.numpy() for v in variables]
    want_slots = slot_values(reference.inner_optimizer, variables)

    variables = make_variables()
    with strategy().scope():
      optimizer = sharded_optimizer.ShardedLossScaleOptimizer(
          make_optimizer(rule, make_sharding(grid, shards)), **scales)
    run_steps(optimizer, variables, gradients, range(NUM_STEPS + 2))
    self.assertEqual(int(optimizer.iterations.numpy()), NUM_STEPS + 2)
    # 64, halved by each overflow to 16, doubled after steps 3 and 4: 32.
    self.assertEqual(float(reference.loss_scale), 32.0)
    self.assertEqual(float(optimizer.loss_scale), float(reference.loss_scale))
    self.assert_matches(variables, optimizer.inner_optimizer, want_weights, want_slots)

  @parameterized.parameters(
      ("unsharded", "sharded 2x4 x"),
      ("sharded 4x2 xy", "unsharded"),
      ("sharded 2x4 x", "sharded 4x2 xy"))
  def test_resumes_from_a_checkpoint_of_the_other_mode(self, writer, reader):
    rule = "lars"
    want_weights, want_slots = self.reference(rule)
    gradients = gradient_values(NUM_STEPS)
    half = NUM_STEPS // 2

    def build(mode):
      if mode == "unsharded":
        return make_optimizer(rule)
      _, shape, shards = mode.split()
      return make_optimizer(rule, make_sharding(tuple(
          int(side) for side in shape.split("x")), shards))

    variables = make_variables()
    optimizer = build(writer)
    run_steps(optimizer, variables, gradients, range(half))
    if writer != "unsharded":
      optimizer.gather_slots_for_checkpoint()
    path = tf.train.Checkpoint(weights=variables, optimizer=optimizer).save(
        os.path.join(self.get_temp_dir(), writer.replace(" ", "_"), "ckpt"))

    variables = make_variables()
    optimizer = build(reader)
    with strategy().scope():
      optimizer._create_all_weights(variables)  # pylint: disable=protected-access
      # Every value in the checkpoint has its place, and every variable a value: the
      # two layouts are the same.
      tf.train.Checkpoint(weights=variables, optimizer=optimizer).restore(
          path).assert_consumed()
    if reader != "unsharded":
      optimizer.shard_slots_after_restore()
    self.assertEqual(int(optimizer.iterations.numpy()), half)
    run_steps(optimizer, variables, gradients, range(half, NUM_STEPS))
    self.assert_matches(variables, optimizer, want_weights, want_slots)

  def test_fit_under_mixed_bfloat16(self):
    """Through `model.compile` / `fit`, as the trainer drives it."""
    rng = np.random.default_rng(3)
    images = rng.standard_normal((NUM_REPLICAS * 4 * 2, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 5, size=len(images))

    def train(sharding):
      tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
      try:
        with strategy().scope():
          tf_keras.utils.set_random_seed(4)
          model = tf_keras.Sequential([
              tf_keras.Input((8, 8, 3)),
              tf_keras.layers.Conv2D(4, 3, name="conv"),
              tf_keras.layers.BatchNormalization(name="bn"),
              tf_keras.layers.ReLU(),
              tf_keras.layers.GlobalAveragePooling2D(),
              tf_keras.layers.Dense(5, name="dense"),
          ])
          if sharding is None:
            optimizer = lars.LARS(
                schedule(), momentum=0.9, weight_decay_rate=0.05, eeta=0.1,
                exclude_from_weight_decay=list(weight_decay.EXCLUDED_FROM_DECAY),
                gradient_aggregator=torus_aggregator.make_torus_aggregator(
                    (2, 4), timeout_seconds=TIMEOUT_SECONDS))
          else:
            optimizer = sharded_optimizer.build_sharded_optimizer(
                "lars", schedule(), sharding, weight_decay=0.05)
            optimizer.eeta = 0.1
          model.compile(optimizer=optimizer, loss=tf_keras.losses.
                        SparseCategoricalCrossentropy(from_logits=True))
          optimizer._create_all_weights(model.trainable_variables)  # pylint: disable=protected-access
        model.fit(images, labels, batch_size=NUM_REPLICAS * 4, epochs=2, verbose=0,
                  shuffle=False)
        self.assertEqual(model.layers[0].compute_dtype, "bfloat16")
        self.assertEqual(model.trainable_variables[0].dtype, tf.float32)
        return model, optimizer
      finally:
        tf_keras.mixed_precision.set_global_policy("float32")

    reference, _ = train(None)
    model, optimizer = train(make_sharding((4, 2), "xy"))
    self.assertEqual(int(optimizer.iterations.numpy()), 4)
    for got, want in zip(model.trainable_variables, reference.trainable_variables):
      for copy in replica_values(got):
        self.assertAllClose(copy, want.numpy(), rtol=1e-4, atol=1e-5, msg=got.name)


if __name__ == "__main__":
  tf.test.main()
