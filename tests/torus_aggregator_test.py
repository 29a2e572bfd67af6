"""Tests for the 2-D torus gradient aggregator on 8 logical CPUs.

Every grid of 8 replicas, gradient lists of mixed shapes and dtypes, sums checked on
every replica against NumPy; the optimizers that take it as `gradient_aggregator=`
(tf_keras SGD with momentum, Model Garden LARS, `model.fit`) checked for a second,
doubled sum; the TPU back end traced and its graph checked phase by phase.
"""

from tests import logical_devices

logical_devices.configure_logical_cpus()

# pylint: disable=g-import-not-at-top,g-bad-import-order
from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import tf_keras

import allreduce
from allreduce import collectives
from allreduce import torus_aggregator
from allreduce.topology import TopologyError, TorusTopology
from tests import graph_walk
from tests import tpu_emulation

TIMEOUT_SECONDS = 60
GRIDS = ((1, 8), (2, 4), (4, 2), (8, 1))

# (shape, dtype): a conv kernel, a bfloat16 vector, a scalar, a tensor whose size (13)
# divides by no grid side, a None gradient, and a tensor too large to share a small
# pack.
GRADIENT_SPECS = (
    ((3, 3, 4, 5), tf.float32),
    ((7,), tf.bfloat16),
    ((), tf.float32),
    ((13,), tf.float32),
    (None, None),
    ((2, 3), tf.bfloat16),
    ((40, 10), tf.float32),
)


def make_values(integer_valued, seed=0):
  """values[i][r]: gradient i of replica r as a float64 array (None for None)."""
  rng = np.random.default_rng(seed)
  values = []
  for shape, dtype in GRADIENT_SPECS:
    if shape is None:
      values.append(None)
    elif integer_valued:
      values.append(rng.integers(-8, 9, size=(8,) + shape).astype(np.float64))
    else:
      per_replica = rng.standard_normal((8,) + shape)
      # What the replica really holds: its value rounded to its dtype.
      values.append(per_replica.astype(dtype.as_numpy_dtype).astype(np.float64))
  return values


def run_aggregation(strategy, aggregate, values):
  """Runs `aggregate(tensors)` on every replica; returns [gradient][replica] arrays."""

  @tf.function(autograph=False)
  def run():
    def replica_fn():
      context = tf.distribute.get_replica_context()
      r = int(tf.get_static_value(context.replica_id_in_sync_group))
      tensors = [None if v is None else tf.constant(v[r], dtype)
                 for v, (_, dtype) in zip(values, GRADIENT_SPECS)]
      return [tf.constant(0.0) if t is None else t for t in aggregate(tensors)]
    return strategy.run(replica_fn)

  outputs = run()
  return [[t.numpy() for t in strategy.experimental_local_results(o)]
          for o in outputs]


class TorusSumTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.strategy = logical_devices.cpu_mirrored_strategy(8)

  @parameterized.product(
      grid=GRIDS, integer_valued=(True, False),
      pack_size_bytes=(256, torus_aggregator.DEFAULT_PACK_SIZE_BYTES))
  def test_equals_the_plain_sum_on_every_replica(self, grid, integer_valued,
                                                 pack_size_bytes):
    aggregator = allreduce.make_torus_aggregator(
        grid, pack_size_bytes=pack_size_bytes, timeout_seconds=TIMEOUT_SECONDS)
    values = make_values(integer_valued, seed=grid[0])
    results = run_aggregation(self.strategy, aggregator.all_reduce, values)
    for v, (shape, dtype), per_replica in zip(values, GRADIENT_SPECS, results):
      if v is None:
        self.assertEqual(per_replica, [0.0] * 8)  # None passed through
        continue
      expected = v.sum(axis=0)
      bound = v.__abs__().sum(axis=0)  # float summation error scales with this
      for result in per_replica:
        self.assertEqual(result.shape, shape)
        self.assertEqual(result.dtype, dtype.as_numpy_dtype)
        result = result.astype(np.float64)
        if integer_valued:
          self.assertAllEqual(result, expected)
        elif dtype == tf.float32:
          # Any summation order is within (n-1) * 2^-24 * sum|x| < 1e-6 * sum|x|.
          self.assertAllLessEqual(np.abs(result - expected) - 1e-6 * bound, 0.0)
        else:
          # Summed in float32, then rounded once to bfloat16 (8 significant bits).
          self.assertAllLessEqual(
              np.abs(result - expected) - 2.0**-8 * np.abs(expected) - 1e-6 * bound,
              0.0)

  def test_all_replicas_agree_bit_for_bit(self):
    aggregator = allreduce.make_torus_aggregator((2, 4),
                                                 timeout_seconds=TIMEOUT_SECONDS)
    results = run_aggregation(self.strategy, aggregator.all_reduce,
                              make_values(integer_valued=False, seed=11))
    for per_replica in results:
      for result in per_replica[1:]:
        self.assertAllEqual(result, per_replica[0])

  def test_average_divides_by_the_replica_count(self):
    aggregator = allreduce.make_torus_aggregator("4x2", average=True,
                                                 timeout_seconds=TIMEOUT_SECONDS)
    values = make_values(integer_valued=True, seed=3)
    results = run_aggregation(self.strategy, aggregator.all_reduce, values)
    for v, per_replica in zip(values, results):
      if v is not None:
        self.assertAllEqual(per_replica[6].astype(np.float64), v.sum(axis=0) / 8)

  def test_grads_and_vars_and_indexed_slices(self):
    aggregator = allreduce.make_torus_aggregator((2, 4),
                                                 timeout_seconds=TIMEOUT_SECONDS)
    with self.strategy.scope():
      dense_var = tf.Variable(tf.zeros([3, 2]))
      table = tf.Variable(tf.zeros([5, 2]))
      unused = tf.Variable(1.0)

    @tf.function(autograph=False)
    def run():
      def replica_fn():
        r = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group,
                    tf.float32)
        sparse = tf.IndexedSlices(values=tf.fill([2, 2], r), indices=[1, 3],
                                  dense_shape=[5, 2])
        summed = aggregator([(tf.fill([3, 2], r), dense_var), (sparse, table),
                             (None, unused)])
        self.assertIs(summed[0][1], dense_var)
        self.assertIs(summed[1][1], table)
        self.assertEqual(summed[2], (None, unused))
        return summed[0][0], summed[1][0]
      return self.strategy.run(replica_fn)

    dense, sparse = [self.strategy.experimental_local_results(o) for o in run()]
    self.assertAllEqual(dense[4], np.full([3, 2], 28.0))
    self.assertAllEqual(sparse[4], [[0, 0], [28, 28], [0, 0], [28, 28], [0, 0]])

  def test_grid_that_does_not_match_the_replicas_is_an_error(self):
    for shape in ((2, 2), (3, 3), "1x4"):
      aggregator = allreduce.make_torus_aggregator(shape)
      with self.assertRaisesRegex(TopologyError, "but the strategy has 8"):
        run_aggregation(self.strategy, aggregator.all_reduce,
                        make_values(integer_valued=True))

  def test_bad_shapes_and_pack_sizes(self):
    with self.assertRaisesRegex(TopologyError, "XxY"):
      allreduce.make_torus_aggregator("2by4")
    with self.assertRaisesRegex(TopologyError, "positive"):
      allreduce.make_torus_aggregator((0, 8))
    with self.assertRaisesRegex(ValueError, "pack_size_bytes"):
      allreduce.make_torus_aggregator((2, 4), pack_size_bytes=0)

  def test_single_replica_grid(self):
    strategy = logical_devices.cpu_mirrored_strategy(1)
    aggregator = allreduce.make_torus_aggregator((1, 1))
    values = make_values(integer_valued=False, seed=4)

    @tf.function(autograph=False)
    def run():
      tensors = [None if v is None else tf.constant(v[0], dtype)
                 for v, (_, dtype) in zip(values, GRADIENT_SPECS)]
      return strategy.run(lambda: [t for t in aggregator.all_reduce(tensors)
                                   if t is not None])

    results = run()
    present = [(v, dtype) for v, (_, dtype) in zip(values, GRADIENT_SPECS)
               if v is not None]
    for (v, dtype), result in zip(present, results):
      self.assertAllEqual(result, v[0].astype(dtype.as_numpy_dtype))

  def test_takes_a_topology_from_physical_coordinates(self):
    # Replica r sits at a scrambled grid point: groups are out of id order.
    points = [(1, 0), (3, 1), (0, 0), (2, 1), (2, 0), (0, 1), (3, 0), (1, 1)]
    topology = TorusTopology.from_physical_coordinates(points)
    aggregator = allreduce.make_torus_aggregator(
        topology, pack_size_bytes=256, timeout_seconds=TIMEOUT_SECONDS)
    values = make_values(integer_valued=True, seed=5)
    results = run_aggregation(self.strategy, aggregator.all_reduce, values)
    for v, per_replica in zip(values, results):
      if v is not None:
        for result in per_replica:
          self.assertAllEqual(result.astype(np.float64), v.sum(axis=0))


class PlanPacksTest(tf.test.TestCase):

  def test_fills_packs_in_order_up_to_the_cap(self):
    packs = torus_aggregator.plan_packs([10, 10, 10, 30, 5], [tf.float32] * 5,
                                        pack_size_bytes=80, num_shards=4)
    self.assertEqual([p.indices for p in packs], [(0, 1), (2,), (3,), (4,)])
    # float32 slots are rounded to 16 elements (64 bytes) so pieces are aligned
    # views; packs to 4 shards of 16 elements.
    self.assertEqual([p.slots for p in packs], [(16, 16), (16,), (32,), (16,)])
    self.assertEqual([p.length for p in packs], [64, 64, 64, 64])
    self.assertEqual([p.padding for p in packs], [32, 48, 32, 48])

  def test_separates_dtypes_and_keeps_every_tensor_once(self):
    dtypes = [tf.float32, tf.float64, tf.float32, tf.int32, tf.float64]
    sizes = [3, 40, 5, 6, 7]
    packs = torus_aggregator.plan_packs(sizes, dtypes, 1 << 20, num_shards=3)
    self.assertEqual(sorted(i for p in packs for i in p.indices), list(range(5)))
    for pack in packs:
      self.assertEqual({dtypes[i] for i in pack.indices}, {pack.dtype})
      self.assertEqual(pack.sizes, tuple(sizes[i] for i in pack.indices))
      align = 64 // pack.dtype.size
      self.assertTrue(all(s % align == 0 for s in pack.slots))
      self.assertTrue(all(s >= n for s, n in zip(pack.slots, pack.sizes)))
      self.assertEqual(pack.length % (3 * align), 0)  # aligned shards

  def test_half_precision_is_summed_in_float32(self):
    self.assertEqual(torus_aggregator.communication_dtype(tf.bfloat16), tf.float32)
    self.assertEqual(torus_aggregator.communication_dtype(tf.float16), tf.float32)
    self.assertEqual(torus_aggregator.communication_dtype(tf.float64), tf.float64)

  def test_resnet50_makes_a_few_large_packs(self):
    sizes = [25_557_032 // 161] * 161
    packs = torus_aggregator.plan_packs(
        sizes, [tf.float32] * 161, torus_aggregator.DEFAULT_PACK_SIZE_BYTES, 2)
    self.assertLessEqual(max(p.length for p in packs) * 4,
                         torus_aggregator.DEFAULT_PACK_SIZE_BYTES + 4096)
    self.assertBetween(len(packs), 2, 8)


class WholeTensorChunksTest(tf.test.TestCase, parameterized.TestCase):
  """Packs cut into runs of whole tensors (for a back end that exchanges uneven
  chunks), and reading a pack back out of its chunks."""

  def test_runs_end_at_the_slot_boundary_nearest_an_equal_share(self):
    # Slots 16, 144, 32, 16, 64 (272): halves end nearest 136, at 160.
    self.assertEqual(
        torus_aggregator.whole_tensor_chunk_lengths([16, 144, 32, 16, 64], 2),
        (160, 112))
    # Quarters of 272 (68, 136, 204): boundaries at offsets 16 (not 160: 68 is
    # nearer 16), 160 and 208 (not 192), every run keeping at least one slot.
    self.assertEqual(
        torus_aggregator.whole_tensor_chunk_lengths([16, 144, 32, 16, 64], 4),
        (16, 144, 48, 64))
    # One large tensor first: it takes a run of its own, the rest share one.
    self.assertEqual(
        torus_aggregator.whole_tensor_chunk_lengths([1024, 16, 16], 2), (1024, 32))
    # Fewer tensors than chunks: no such cut.
    self.assertIsNone(torus_aggregator.whole_tensor_chunk_lengths([16, 16], 4))

  def test_plan_cuts_at_tensors_and_falls_back_to_equal_chunks(self):
    sizes = [10, 140, 30, 5, 64, 300]
    packs = torus_aggregator.plan_packs(sizes, [tf.float32] * 6, 800, num_shards=2,
                                        whole_tensor_chunks=True)
    self.assertEqual([p.indices for p in packs], [(0, 1, 2, 3), (4,), (5,)])
    whole, single, large = packs
    self.assertEqual((whole.slots, whole.padding, whole.chunk_lengths),
                     ((16, 144, 32, 16), 0, (160, 48)))
    # A pack of one tensor cannot be cut between tensors: equal (padded) chunks.
    self.assertEqual((single.padding, single.chunk_lengths), (0, (32, 32)))
    self.assertEqual((large.length, large.chunk_lengths), (320, (160, 160)))
    # The equal layout everywhere without the option.
    for pack in torus_aggregator.plan_packs(sizes, [tf.float32] * 6, 800,
                                            num_shards=2):
      self.assertEqual(pack.chunk_lengths, (pack.length // 2,) * 2)

  @parameterized.named_parameters(("whole_tensors", True), ("equal", False))
  def test_chunks_read_back_into_the_members(self, whole_tensor_chunks):
    rng = np.random.default_rng(3)
    sizes = [10, 140, 30, 5, 64]
    values = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    pack, = torus_aggregator.plan_packs(sizes, [tf.float32] * 5, 1 << 20,
                                        num_shards=4,
                                        whole_tensor_chunks=whole_tensor_chunks)
    chunks = pack.to_chunks([tf.constant(v) for v in values])
    self.assertEqual([int(c.shape[0]) for c in chunks], list(pack.chunk_lengths))
    # The chunks are the buffer, cut.
    self.assertAllEqual(tf.concat(chunks, 0),
                        pack.to_buffer([tf.constant(v) for v in values]))
    for got, want in zip(pack.from_chunks(chunks), values):
      self.assertAllEqual(got, want)
    with self.assertRaisesRegex(ValueError, "a pack of 4 chunks, got 3"):
      pack.from_chunks(chunks[:3])


class OverlapOrderTest(tf.test.TestCase):
  """What lets summation overlap backprop: packs are filled from the last gradient
  (backprop's first), and collectives on different groups are not chained."""

  def test_plan_packs_fills_in_the_given_order(self):
    packs = torus_aggregator.plan_packs([10, 10, 10, 30, 5], [tf.float32] * 5,
                                        pack_size_bytes=80, num_shards=4,
                                        order=[4, 3, 2, 1, 0])
    self.assertEqual([p.indices for p in packs], [(4,), (3,), (2, 1), (0,)])
    self.assertEqual([p.sizes for p in packs], [(5,), (30,), (10, 10), (10,)])

  def test_first_collective_needs_only_the_last_gradients(self):
    strategy = logical_devices.cpu_mirrored_strategy(8)
    sizes = [64, 64, 64, 64, 64, 64]  # 256 bytes each: two per 512-byte pack
    aggregator = allreduce.make_torus_aggregator((2, 4), pack_size_bytes=512)

    @tf.function(autograph=False)
    def run():
      return strategy.run(lambda: aggregator.all_reduce(
          [tf.fill([n], tf.constant(float(i)), name=f"gradient_{i}")
           for i, n in enumerate(sizes)]))

    ops = run.get_concrete_function().graph.get_operations()
    on_replica_0 = [op for op in ops if op.device.endswith("CPU:0")
                    and op.type.startswith("Collective")]
    first = on_replica_0[0]

    def gradients_reached(op, through_control=True):
      return {int(node.name.split("gradient_")[1].split("/")[0].split("_")[0])
              for node in graph_walk.ancestors(op, through_control).values()
              if node.type == "Fill" and "gradient_" in node.name}

    # Nothing, data or control, holds the first collective back behind the first
    # layers' gradients: it needs some of pack 0's (the last two), no others. (Off
    # NCCL it is the send of the chunk replica 0 does not own, gradient 4 alone.)
    reached = gradients_reached(first)
    self.assertTrue(reached and reached <= {4, 5}, reached)
    # The last that sends data (the all-gather of the last pack filled) carries the
    # first, and only those (by data: the peer's part arrives through a receive,
    # no edge).
    last = [op for op in on_replica_0 if op.type != "CollectiveBcastRecvV2"][-1]
    reached = gradients_reached(last, through_control=False)
    self.assertTrue(reached and reached <= {0, 1}, reached)

  def _first_gather_waits_for_last_scatter(self, backend):
    """Whether replica 0's first all-gather (pack 0's) depends, by data or control,
    on the last pack's reduce-scatter ops."""
    strategy = logical_devices.cpu_mirrored_strategy(8)
    aggregator = allreduce.make_torus_aggregator((2, 4), backend=backend,
                                                 pack_size_bytes=512)

    @tf.function(autograph=False)
    def run():
      return strategy.run(lambda: aggregator.all_reduce(
          [tf.fill([64], float(i), name=f"gradient_{i}")
           for i in range(6)]))  # 3 packs of 2, the last of gradients 0 and 1

    ops = [op for op in run.get_concrete_function().graph.get_operations()
           if op.device.endswith("CPU:0")]
    reduces = [op for op in ops if op.type == "CollectiveReduceV2"]  # column sums
    self.assertLen(reduces, 3)
    # Pack 0's all-gather: what sends its column sum along the row.
    first_gather, = [op for op in reduces[0].outputs[0].consumers()
                     if op.type in ("CollectiveGatherV2", "CollectiveBcastSendV2")]
    # The last pack's reduce-scatter: the ops that send gradients 0 and 1 before
    # any column sum.
    last_scatter = []
    for op in ops:
      if op.type in ("CollectiveAllToAllV2", "CollectiveBcastSendV2"):
        sources = graph_walk.ancestors(op, through_control=False).values()
        if (not any(a.type == "CollectiveReduceV2" for a in sources)
            and {"gradient_0", "gradient_1"} & {a.name for a in sources}):
          last_scatter.append(op)
    self.assertNotEmpty(last_scatter)
    seen = graph_walk.ancestors(first_gather)
    return any(op.name in seen for op in last_scatter)

  def test_first_all_gather_does_not_wait_for_the_last_reduce_scatter(self):
    # All-gathers have a chain of their own: pack 0's can run while the last pack
    # (the first layers' gradients, backprop's last) is still being reduced.
    self.assertFalse(self._first_gather_waits_for_last_scatter(
        collectives.CollectiveOpsBackend()))
    # Under NCCL (only traced) every collective of a group is in one launch order,
    # so there it does wait: the check can tell the two apart.
    self.assertTrue(self._first_gather_waits_for_last_scatter(
        collectives.CollectiveOpsBackend(communication_hint="nccl")))

  def test_batch_norm_and_gradients_are_ordered_apart(self):
    strategy = logical_devices.cpu_mirrored_strategy(8)
    gradients = collectives.CollectiveOpsBackend()
    batch_norm = collectives.CollectiveOpsBackend(chain=collectives.BATCH_NORM_CHAIN)
    grid = TorusTopology(2, 4)

    @tf.function(autograph=False)
    def run():
      def replica_fn():
        # Batch norm first, as in a step, and on the rows' very groups (pairs on
        # 2x4, as with bn_group_size 2): the gradients must not wait behind it.
        norm = batch_norm.all_reduce_sum(tf.ones([4]), grid.block_groups(2))
        rows = gradients.all_reduce_sum(tf.ones([8]), grid.row_groups())
        columns = gradients.all_reduce_sum(tf.ones([8]), grid.column_groups())
        rows_again = gradients.all_reduce_sum(tf.ones([8]), grid.row_groups())
        return norm, rows, columns, rows_again
      return strategy.run(replica_fn)

    self.assertEqual(TorusTopology(2, 4).block_groups(2), grid.row_groups())
    ops = [op for op in run.get_concrete_function().graph.get_operations()
           if op.type == "CollectiveReduceV2" and op.device.endswith("CPU:0")]
    self.assertLen(ops, 4)
    norm, rows, columns, rows_again = ops

    def token(op):  # the captured handle: one placeholder per distinct token
      return op.inputs[-1].op.name

    self.assertLen({token(norm), token(rows), token(columns)}, 3)
    self.assertEqual(token(rows), token(rows_again))
    self.assertNotIn(norm, rows.control_inputs)
    self.assertIn(rows, rows_again.control_inputs)  # one chain: issue order

  def test_nccl_keeps_one_chain_per_group(self):
    # NCCL needs one launch order per communicator: no separate batch-norm chain.
    # Only traced (no NCCL here): the tokens are in the graph.
    strategy = logical_devices.cpu_mirrored_strategy(8)
    gradients = collectives.CollectiveOpsBackend(communication_hint="nccl")
    batch_norm = collectives.CollectiveOpsBackend(communication_hint="nccl",
                                                  chain=collectives.BATCH_NORM_CHAIN)
    rows = TorusTopology(2, 4).row_groups()

    @tf.function(autograph=False)
    def run():
      return strategy.run(lambda: (batch_norm.all_reduce_sum(tf.ones([4]), rows),
                                   gradients.all_reduce_sum(tf.ones([8]), rows)))

    norm, summed = [op for op in run.get_concrete_function().graph.get_operations()
                    if op.type == "CollectiveReduceV2" and op.device.endswith("CPU:0")]
    self.assertEqual(norm.inputs[-1].op.name, summed.inputs[-1].op.name)
    self.assertIn(norm, summed.control_inputs)


class OptimizerIntegrationTest(tf.test.TestCase):
  """The aggregator replaces the optimizer's cross-replica sum; nothing sums twice."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.strategy = logical_devices.cpu_mirrored_strategy(8)
    rng = np.random.default_rng(9)
    cls.initial = rng.integers(-4, 5, size=(4, 3)).astype(np.float32)
    cls.grads = rng.integers(-3, 4, size=(8, 4, 3)).astype(np.float32)

  def _apply_once(self, make_optimizer):
    """One `apply_gradients` with replica r's gradient `grads[r]`; returns the var."""
    with self.strategy.scope():
      var = tf.Variable(self.initial, name="kernel")
      optimizer = make_optimizer()

    @tf.function(autograph=False)
    def step():
      def replica_fn():
        r = int(tf.get_static_value(
            tf.distribute.get_replica_context().replica_id_in_sync_group))
        optimizer.apply_gradients([(tf.constant(self.grads[r]), var)])
      self.strategy.run(replica_fn)

    step()
    values = [v.numpy() for v in self.strategy.experimental_local_results(var)]
    for v in values[1:]:
      self.assertAllEqual(v, values[0])  # replicas stay in sync
    return values[0]

  def test_packed_strategy_aggregator_sums_and_keeps_none(self):
    # Here, on this class's strategy: TensorFlow numbers its own collectives per
    # strategy from the same start, so a second strategy over the same devices that
    # also used them would collide with this one's instances.
    aggregate = allreduce.make_packed_strategy_aggregator(pack_size_bytes=256)

    def summed(tensors):
      pairs = aggregate([(t, f"variable_{i}") for i, t in enumerate(tensors)])
      self.assertEqual([v for _, v in pairs],
                       [f"variable_{i}" for i in range(len(tensors))])
      return [g for g, _ in pairs]

    values = make_values(integer_valued=True, seed=3)
    results = run_aggregation(self.strategy, summed, values)
    for v, per_replica in zip(values, results):
      if v is None:
        self.assertEqual(per_replica, [0.0] * 8)
        continue
      for result in per_replica:
        self.assertAllEqual(result.astype(np.float64), v.sum(axis=0))
    with self.assertRaises(ValueError):
      allreduce.make_packed_strategy_aggregator(pack_size_bytes=0)

  def test_sgd_with_momentum_applies_the_sum_once(self):
    aggregator = allreduce.make_torus_aggregator((2, 4),
                                                 timeout_seconds=TIMEOUT_SECONDS)
    updated = self._apply_once(lambda: tf_keras.optimizers.legacy.SGD(
        learning_rate=0.5, momentum=0.9, gradient_aggregator=aggregator))
    total = self.grads.sum(axis=0)
    self.assertAllEqual(updated, self.initial - 0.5 * total)
    # The classic bug, for contrast: the strategy summing the sums again.
    self.assertNotAllClose(updated, self.initial - 0.5 * 8 * total)

  def test_sgd_matches_the_default_aggregator(self):
    default = self._apply_once(
        lambda: tf_keras.optimizers.legacy.SGD(learning_rate=0.5, momentum=0.9))
    torus = self._apply_once(lambda: tf_keras.optimizers.legacy.SGD(
        learning_rate=0.5, momentum=0.9,
        gradient_aggregator=allreduce.make_torus_aggregator(
            (4, 2), timeout_seconds=TIMEOUT_SECONDS)))
    self.assertAllEqual(torus, default)

  def test_lars_applies_the_sum_once(self):
    from official.modeling.optimization import lars  # slow import: only here

    def make(aggregator=None):
      return lars.LARS(learning_rate=0.5, momentum=0.9, weight_decay_rate=0.1,
                       eeta=0.01, gradient_aggregator=aggregator)

    torus = self._apply_once(lambda: make(allreduce.make_torus_aggregator(
        (2, 4), timeout_seconds=TIMEOUT_SECONDS)))
    default = self._apply_once(make)
    # LARS, classic momentum, first step: w -= lr * eeta |w| / |g'| * g'.
    w = self.initial.astype(np.float64)
    g = self.grads.sum(axis=0) + 0.1 * w
    expected = w - 0.5 * 0.01 * np.linalg.norm(w) / np.linalg.norm(g) * g
    self.assertAllClose(torus, expected, rtol=1e-5, atol=1e-6)
    self.assertAllClose(torus, default, rtol=1e-6, atol=1e-7)
    doubled = self.grads.sum(axis=0) * 8 + 0.1 * w
    self.assertNotAllClose(
        torus, w - 0.5 * 0.01 * np.linalg.norm(w) / np.linalg.norm(doubled) * doubled)

  def test_model_fit_matches_the_strategy_all_reduce(self):
    rng = np.random.default_rng(10)
    features = rng.standard_normal((64, 6)).astype(np.float32)
    labels = rng.integers(0, 3, size=64)

    def fit(aggregator):
      tf_keras.utils.set_random_seed(1)
      with self.strategy.scope():
        model = tf_keras.Sequential([
            tf_keras.layers.Dense(5, activation="relu", input_shape=(6,)),
            tf_keras.layers.Dense(3)])
        kwargs = {"gradient_aggregator": aggregator} if aggregator else {}
        model.compile(
            optimizer=tf_keras.optimizers.legacy.SGD(0.1, momentum=0.9, **kwargs),
            loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
      model.fit(features, labels, batch_size=32, epochs=2, shuffle=False, verbose=0)
      return model.get_weights()

    default = fit(None)
    torus = fit(allreduce.make_torus_aggregator((2, 4),
                                                timeout_seconds=TIMEOUT_SECONDS))
    for d, t in zip(default, torus):
      self.assertAllClose(t, d, rtol=1e-5, atol=1e-6)


class TpuTracingTest(tf.test.TestCase, parameterized.TestCase):
  """The aggregator on the TPU back end, traced on CPU: three phases per pack."""

  @parameterized.parameters((2, 4), (4, 2))
  def test_three_phases_with_the_grid_groups(self, x, y):
    strategy = logical_devices.cpu_mirrored_strategy(8)
    aggregator = allreduce.make_torus_aggregator(
        (x, y), backend=collectives.TpuBackend(), pack_size_bytes=256)
    specs = [(s, d) for s, d in GRADIENT_SPECS if s is not None]

    @tf.function(autograph=False)
    def run():
      return strategy.run(lambda: aggregator.all_reduce(
          [tf.zeros(s, d) for s, d in specs]))

    ops = run.get_concrete_function().graph.get_operations()
    num_packs = len(torus_aggregator.plan_packs(
        [tf.TensorShape(s).num_elements() for s, _ in specs],
        [torus_aggregator.communication_dtype(d) for _, d in specs], 256,
        num_shards=x))
    topology = TorusTopology(x, y)
    scatters = [op for op in ops if op.type == "XlaReduceScatter"]
    sums = [op for op in ops if op.type == "CrossReplicaSum"]
    permutes = [op for op in ops if op.type == "CollectivePermute"]
    self.assertLen(scatters, 8 * num_packs)  # phase 1, along x
    self.assertLen(sums, 8 * num_packs)  # phase 2, along y
    # Phase 3 along x: a ring of x - 1 steps each way round, per pack.
    self.assertLen(permutes, 8 * num_packs * 2 * (x - 1))
    for op in scatters:
      self.assertAllEqual(tf.get_static_value(op.inputs[1]), topology.row_groups())
      self.assertEqual(op.inputs[0].dtype, tf.float32)  # bfloat16 summed in float32
    for op in sums:
      self.assertAllEqual(tf.get_static_value(op.inputs[1]),
                          topology.column_groups())
      self.assertEqual(op.inputs[0].dtype, tf.float32)
    ring = [collectives.ring_pairs(topology.row_groups(), step) for step in (1, -1)]
    for op in permutes:
      self.assertIn(tf.get_static_value(op.inputs[1]).tolist(), ring)
    self.assertFalse([op for op in ops if op.type == "AllToAll" or (
        op.type.startswith("Collective") and op.type != "CollectivePermute")])

  def test_emulated_tpu_ops_sum_on_a_physical_grid(self):
    # The TPU back end end to end (its XLA ops emulated on the CPU), on a grid whose
    # rows and columns are out of replica-id order, as chip coordinates make them.
    strategy = logical_devices.cpu_mirrored_strategy(8)
    points = [(1, 0, 0, 1), (1, 1, 0, 0), (0, 0, 0, 0), (0, 1, 0, 1),
              (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 0, 1), (1, 1, 0, 1)]
    topology = TorusTopology.from_physical_coordinates(points)
    self.assertEqual(topology.shape, (4, 2))
    aggregator = allreduce.make_torus_aggregator(
        topology, backend=collectives.TpuBackend(), pack_size_bytes=256)
    values = make_values(integer_valued=True, seed=9)
    with tpu_emulation.emulated_tpu_ops(TIMEOUT_SECONDS):
      results = run_aggregation(strategy, aggregator.all_reduce, values)
    for v, per_replica in zip(values, results):
      if v is not None:
        for result in per_replica:
          self.assertAllEqual(result.astype(np.float64), v.sum(axis=0))


if __name__ == "__main__":
  tf.test.main()
