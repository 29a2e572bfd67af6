"""Tests for allreduce.collectives: the collective-ops back end on 8 logical CPUs, and
the TPU back end traced (it cannot run here) and checked on its graph."""

from tests import logical_devices

logical_devices.configure_logical_cpus()

# pylint: disable=g-import-not-at-top,g-bad-import-order
import collections
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from allreduce import collectives
from allreduce.topology import TopologyError, TorusTopology
from tests import tpu_emulation

# A bug must fail the test, not hang the suite.
TIMEOUT_SECONDS = 60


def run_per_replica(strategy, step):
  """Runs `step(replica_id)` on every replica in a tf.function; numpy per replica."""

  @tf.function(autograph=False)
  def run():
    def replica_fn():
      context = tf.distribute.get_replica_context()
      return step(int(tf.get_static_value(context.replica_id_in_sync_group)))
    return strategy.run(replica_fn)

  outputs = run()
  return tf.nest.map_structure(
      lambda o: [t.numpy() for t in strategy.experimental_local_results(o)], outputs)


def per_replica_values(shape, dtype, num_replicas, seed=0):
  """One integer-valued array per replica (exact sums in any order)."""
  rng = np.random.default_rng(seed)
  return rng.integers(-8, 9, size=(num_replicas,) + tuple(shape)).astype(dtype)


def grid_groups():
  """(name, group_assignment) for rows, columns and blocks of every 8-replica grid."""
  cases = []
  for x, y in ((1, 8), (2, 4), (4, 2), (8, 1)):
    topology = TorusTopology(x, y)
    cases.append((f"rows_{x}x{y}", topology.row_groups()))
    cases.append((f"columns_{x}x{y}", topology.column_groups()))
  # Groups listed out of ascending order, as a physical layout produces them.
  permuted = TorusTopology(4, 2, (7, 2, 5, 0, 3, 6, 1, 4))
  cases.append(("permuted_rows", permuted.row_groups()))
  cases.append(("permuted_columns", permuted.column_groups()))
  return cases


def reference_sum(values, group):
  return np.sum(values[list(group)].astype(np.float64), axis=0)


class CollectiveOpsBackendTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.strategy = logical_devices.cpu_mirrored_strategy(8)
    cls.backend = collectives.CollectiveOpsBackend(timeout_seconds=TIMEOUT_SECONDS)

  @parameterized.named_parameters(*grid_groups())
  def test_all_reduce_reduce_scatter_all_gather(self, groups):
    """All three collectives for one grouping, on every replica, in one step."""
    group_size = len(groups[0])
    matrix = per_replica_values([3, 5], np.float32, 8, seed=1)
    flat = per_replica_values([4 * group_size], np.float32, 8, seed=2)
    scalar = per_replica_values([], np.float32, 8, seed=3)
    pieces = per_replica_values([2, 3], np.int32, 8, seed=4)

    def step(r):
      return (self.backend.all_reduce_sum(tf.constant(matrix[r]), groups),
              self.backend.all_reduce_sum(tf.constant(scalar[r]), groups),
              self.backend.reduce_scatter_sum(tf.constant(flat[r]), groups),
              self.backend.all_gather(tf.constant(pieces[r]), groups),
              self.backend.reduce_scatter_chunks(
                  tf.split(tf.constant(flat[r]), group_size), groups))

    summed, summed_scalar, scattered, gathered, exchanged = run_per_replica(
        self.strategy, step)
    for r in range(8):
      group = collectives.group_of(groups, r)
      rank = group.index(r)
      self.assertAllEqual(summed[r], reference_sum(matrix, group))
      self.assertEqual(summed[r].dtype, np.float32)
      self.assertEqual(summed_scalar[r].shape, ())
      self.assertAllEqual(summed_scalar[r], reference_sum(scalar, group))
      shard = np.split(reference_sum(flat, group), group_size)[rank]
      self.assertAllEqual(scattered[r], shard)
      self.assertAllEqual(exchanged[r], shard)
      self.assertAllEqual(gathered[r], np.concatenate([pieces[m] for m in group]))
      self.assertEqual(gathered[r].dtype, np.int32)

  def test_bfloat16_and_random_values(self):
    groups = TorusTopology(2, 4).column_groups()
    rng = np.random.default_rng(5)
    values = rng.standard_normal((8, 64)).astype(np.float32)
    halves = per_replica_values([7], np.float32, 8, seed=6)

    def step(r):
      return (self.backend.all_reduce_sum(tf.constant(values[r]), groups),
              self.backend.all_reduce_sum(tf.constant(halves[r], tf.bfloat16), groups))

    summed, summed_half = run_per_replica(self.strategy, step)
    for r in range(8):
      group = collectives.group_of(groups, r)
      self.assertAllClose(summed[r], reference_sum(values, group), rtol=1e-6,
                          atol=1e-6)
      self.assertEqual(summed_half[r].dtype, tf.bfloat16.as_numpy_dtype)
      self.assertAllEqual(summed_half[r].astype(np.float32),
                          reference_sum(halves, group))

  def test_two_backends_and_two_groupings_in_one_step(self):
    """Instance keys are process-wide: separate back ends never collide."""
    other = collectives.backend_for_strategy(self.strategy,
                                          timeout_seconds=TIMEOUT_SECONDS)
    rows = TorusTopology(2, 4).row_groups()
    blocks = TorusTopology(2, 4).block_groups(4)
    values = per_replica_values([6], np.float32, 8, seed=7)

    def step(r):
      v = tf.constant(values[r])
      return (self.backend.all_reduce_sum(v, rows), other.all_reduce_sum(v, rows),
              other.all_reduce_sum(v, blocks), self.backend.all_reduce_sum(v, blocks))

    outputs = run_per_replica(self.strategy, step)
    for r in range(8):
      for out, groups in zip(outputs, (rows, rows, blocks, blocks)):
        self.assertAllEqual(out[r],
                            reference_sum(values, collectives.group_of(groups, r)))

  def test_strategies_of_other_sizes_in_the_same_process(self):
    """Per-process state survives strategies over different device sets."""
    values = per_replica_values([4], np.float32, 8, seed=8)
    for count in (4, 2, 8):
      strategy = logical_devices.cpu_mirrored_strategy(count)
      groups = TorusTopology.for_replicas(count, (2, count // 2)).column_groups()
      outputs = run_per_replica(
          strategy, lambda r, g=groups: self.backend.all_reduce_sum(
              tf.constant(values[r]), g))
      for r in range(count):
        self.assertAllEqual(outputs[r],
                            reference_sum(values, collectives.group_of(groups, r)))

  def test_the_same_function_runs_many_steps(self):
    groups = TorusTopology(4, 2).row_groups()
    with self.strategy.scope():
      counter = tf.Variable(0.0)

    @tf.function
    def step():
      def replica_fn():
        context = tf.distribute.get_replica_context()
        r = tf.cast(context.replica_id_in_sync_group, tf.float32)
        return self.backend.all_reduce_sum(r + counter, groups)
      result = self.strategy.run(replica_fn)
      counter.assign_add(1.0)
      return result

    for i in range(3):
      results = [t.numpy() for t in self.strategy.experimental_local_results(step())]
      self.assertEqual(results, [6.0 + 4 * i] * 4 + [22.0 + 4 * i] * 4)

  @parameterized.named_parameters(
      ("missing_replica", [[0, 1, 2, 3], [4, 5, 6]], "exactly once"),
      ("duplicate", [[0, 1, 2, 3], [3, 4, 5, 6, 7]], "exactly once"),
      ("unequal", [[0, 1, 2], [3, 4, 5, 6, 7]], "same size"),
      ("out_of_range", [[0, 1, 2, 3], [4, 5, 6, 8]], "exactly once"),
      ("empty", [], "non-empty"))
  def test_bad_group_assignment_fails_at_trace_time(self, groups, message):
    with self.assertRaisesRegex(TopologyError, message):
      run_per_replica(self.strategy,
                      lambda r: self.backend.all_reduce_sum(tf.constant(1.0), groups))

  def test_reduce_scatter_needs_divisible_1d_input(self):
    groups = TorusTopology(4, 2).row_groups()
    with self.assertRaisesRegex(ValueError, "divisible by the group size 4"):
      run_per_replica(self.strategy, lambda r: self.backend.reduce_scatter_sum(
          tf.zeros([6]), groups))
    with self.assertRaisesRegex(ValueError, "1-D"):
      run_per_replica(self.strategy, lambda r: self.backend.reduce_scatter_sum(
          tf.zeros([4, 2]), groups))
    # The failed traces allocated no instance keys: the group still works.
    outputs = run_per_replica(self.strategy, lambda r: self.backend.reduce_scatter_sum(
        tf.fill([8], float(r)), groups))
    self.assertAllEqual(outputs[5], [22.0, 22.0])

  def test_reduce_scatter_chunks_needs_one_nonempty_chunk_per_member(self):
    groups = TorusTopology(4, 2).row_groups()
    with self.assertRaisesRegex(ValueError, "one chunk per member of the group"):
      run_per_replica(self.strategy, lambda r: self.backend.reduce_scatter_chunks(
          [tf.zeros([2])] * 3, groups))
    with self.assertRaisesRegex(ValueError, "non-empty 1-D chunks"):
      run_per_replica(self.strategy, lambda r: self.backend.reduce_scatter_chunks(
          [tf.zeros([2])] * 3 + [tf.zeros([0])], groups))
    with self.assertRaisesRegex(ValueError, "one dtype"):
      run_per_replica(self.strategy, lambda r: self.backend.reduce_scatter_chunks(
          [tf.zeros([2])] * 3 + [tf.zeros([2], tf.float64)], groups))
    # The failed traces allocated no instance keys: the pairs still work.
    outputs = run_per_replica(self.strategy, lambda r: self.backend.reduce_scatter_chunks(
        [tf.fill([2], float(r + 10 * k)) for k in range(4)], groups))
    self.assertAllEqual(outputs[5], [22.0 + 40.0, 22.0 + 40.0])  # rank 1 of [4..7]

  @parameterized.named_parameters(*[case for case in grid_groups()
                                    if len(case[1][0]) > 1])
  def test_uneven_chunks_scatter_and_gather(self, groups):
    """Chunks of different lengths, each rank's its own: summed to their owner,
    and the owners' shards gathered back, against NumPy."""
    group_size = len(groups[0])
    lengths = [3 + 5 * k for k in range(group_size)]  # 3, 8, 13, ...
    flat = per_replica_values([sum(lengths)], np.float32, 8, seed=8)
    offsets = np.cumsum([0] + lengths)

    def step(r):
      chunks = tf.split(tf.constant(flat[r]), lengths)
      shard = self.backend.reduce_scatter_chunks(chunks, groups)
      return [shard] + self.backend.all_gather_chunks(shard, lengths, groups)

    outputs = run_per_replica(self.strategy, step)
    for r in range(8):
      group = collectives.group_of(groups, r)
      rank = group.index(r)
      total = reference_sum(flat, group)
      self.assertAllEqual(outputs[0][r], total[offsets[rank]:offsets[rank + 1]])
      for k in range(group_size):  # every rank's shard, in rank order
        self.assertAllEqual(outputs[1 + k][r], total[offsets[k]:offsets[k + 1]])

  def test_all_gather_chunks_ops_and_checks(self):
    """Off NCCL one broadcast over the group from each member: a send of this
    replica's shard, whose output is its own piece (the shard, not a copy), and a
    receive from each peer; no gather. Lengths are checked before any key is
    taken, and the equal-shard default refuses uneven ones."""
    groups = TorusTopology(4, 2).row_groups()

    @tf.function(autograph=False)
    def run():
      return self.strategy.run(lambda: self.backend.all_gather_chunks(
          tf.ones([4]), [4] * 4, groups))

    graph = run.get_concrete_function().graph
    on_replica_0 = collections.Counter(
        op.type for op in graph.get_operations()
        if op.type.startswith("Collective") and op.device.endswith("CPU:0"))
    self.assertEqual(on_replica_0,
                     {"CollectiveBcastSendV2": 1, "CollectiveBcastRecvV2": 3})
    own = graph.outputs[0].op  # replica 0 is rank 0 of [0, 1, 2, 3]
    while own.type == "Identity":
      own = own.inputs[0].op
    self.assertEqual(own.type, "CollectiveBcastSendV2")

    with self.assertRaisesRegex(ValueError, "one non-zero length per member"):
      run_per_replica(self.strategy, lambda r: self.backend.all_gather_chunks(
          tf.ones([2]), [2, 2, 2], groups))
    with self.assertRaisesRegex(ValueError, "static length 3"):
      run_per_replica(self.strategy, lambda r: self.backend.all_gather_chunks(
          tf.ones([2]), [3, 3, 3, 3], groups))
    nccl = collectives.CollectiveOpsBackend(communication_hint="nccl")
    with self.assertRaisesRegex(ValueError, "gathers equal shards only"):
      run_per_replica(self.strategy, lambda r: nccl.all_gather_chunks(
          tf.ones([2]), [2, 3, 2, 2], groups))
    # The failed traces took no instance keys: the group still works.
    outputs = run_per_replica(self.strategy, lambda r: self.backend.all_gather_chunks(
        tf.fill([2], float(r)), [2, 2, 2, 2], groups))
    self.assertAllEqual([o[5] for o in outputs], [[4.0] * 2, [5.0] * 2, [6.0] * 2,
                                                  [7.0] * 2])

  def test_reduce_scatter_chunks_ops_by_back_end(self):
    """Off NCCL, a pair broadcast per peer each way and no all-to-all; under NCCL
    (only traced) the all-to-all of the concatenated chunks, on the one chain."""
    groups = TorusTopology(2, 4).row_groups()

    def op_types(backend):
      @tf.function(autograph=False)
      def run():
        return self.strategy.run(lambda: backend.reduce_scatter_chunks(
            [tf.ones([4]), tf.ones([4])], groups))
      return collections.Counter(
          op.type for op in run.get_concrete_function().graph.get_operations()
          if op.type.startswith("Collective") and op.device.endswith("CPU:0"))

    self.assertEqual(op_types(self.backend),
                     {"CollectiveBcastSendV2": 1, "CollectiveBcastRecvV2": 1})
    self.assertEqual(
        op_types(collectives.CollectiveOpsBackend(communication_hint="nccl")),
        {"CollectiveAllToAllV2": 1})

  def test_all_gather_rejects_scalars(self):
    groups = TorusTopology(4, 2).row_groups()
    with self.assertRaisesRegex(ValueError, "rank >= 1"):
      run_per_replica(self.strategy,
                      lambda r: self.backend.all_gather(tf.constant(1.0), groups))

  def test_needs_replica_context(self):
    with self.assertRaisesRegex(RuntimeError, "replica context"):
      with self.strategy.scope():
        self.backend.all_reduce_sum(tf.constant(1.0), [[0]])


class BackendForStrategyTest(tf.test.TestCase):

  def test_mirrored_and_default_get_collective_ops(self):
    strategy = logical_devices.cpu_mirrored_strategy(8)
    self.assertIsInstance(collectives.backend_for_strategy(strategy),
                          collectives.CollectiveOpsBackend)
    self.assertIsInstance(collectives.backend_for_strategy(),
                          collectives.CollectiveOpsBackend)
    with strategy.scope():
      self.assertIsInstance(collectives.backend_for_strategy(),
                            collectives.CollectiveOpsBackend)

  def test_gpu_replicas_get_nccl(self):
    gpu_strategy = mock.Mock(spec=tf.distribute.MirroredStrategy)
    gpu_strategy.extended.worker_devices = (
        "/job:localhost/replica:0/task:0/device:GPU:0",
        "/job:localhost/replica:0/task:0/device:GPU:1")
    backend = collectives.backend_for_strategy(gpu_strategy)
    self.assertEqual(backend._communication_hint, "nccl")
    cpu_backend = collectives.backend_for_strategy(
        logical_devices.cpu_mirrored_strategy(8))
    self.assertEqual(cpu_backend._communication_hint, "auto")

  def test_tpu_strategy_gets_the_tpu_back_end(self):
    # No TPU here: an uninitialised instance is enough for the type dispatch.
    fake_tpu_strategy = tf.distribute.TPUStrategy.__new__(tf.distribute.TPUStrategy)
    self.assertIsInstance(collectives.backend_for_strategy(fake_tpu_strategy),
                          collectives.TpuBackend)


def traced_ops(strategy, step):
  """Traces `step` on every replica without running it; returns the graph's ops."""

  @tf.function(autograph=False)
  def run():
    return strategy.run(step)

  return run.get_concrete_function().graph.get_operations()


class TpuBackendTracingTest(tf.test.TestCase, parameterized.TestCase):
  """The TPU ops cannot execute on CPU, but their graphs can be built and checked."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.strategy = logical_devices.cpu_mirrored_strategy(8)
    cls.backend = collectives.TpuBackend()

  @parameterized.parameters((2, 4), (4, 2), (8, 1))
  def test_all_reduce_is_cross_replica_sum(self, x, y):
    groups = TorusTopology(x, y).row_groups()
    ops = traced_ops(self.strategy, lambda: self.backend.all_reduce_sum(
        tf.ones([3, 2], tf.bfloat16), groups))
    sums = [op for op in ops if op.type == "CrossReplicaSum"]
    self.assertLen(sums, 8)  # one per replica
    for op in sums:
      self.assertAllEqual(tf.get_static_value(op.inputs[1]), groups)
      self.assertEqual(op.outputs[0].dtype, tf.bfloat16)
      self.assertEqual(op.outputs[0].shape, [3, 2])
    self.assertFalse([op for op in ops if op.type.startswith("Collective")])

  def test_reduce_scatter_is_xla_reduce_scatter(self):
    groups = TorusTopology(4, 2).row_groups()
    ops = traced_ops(self.strategy,
                     lambda: self.backend.reduce_scatter_sum(tf.ones([12]), groups))
    scatters = [op for op in ops if op.type == "XlaReduceScatter"]
    self.assertLen(scatters, 8)
    for op in scatters:
      self.assertAllEqual(tf.get_static_value(op.inputs[1]), groups)
      self.assertEqual(tf.get_static_value(op.inputs[2]), 0)  # scatter dimension
      self.assertEqual(op.get_attr("reduce_op"), b"Add")
      self.assertEqual(op.inputs[0].shape, [12])
    self.assertFalse([op for op in ops if op.type == "AllToAll"])

  def test_all_gather_is_a_ring_of_collective_permutes(self):
    groups = TorusTopology(2, 4).column_groups()  # groups of 4
    ops = traced_ops(self.strategy,
                     lambda: self.backend.all_gather(tf.ones([5, 2]), groups))
    permutes = [op for op in ops if op.type == "CollectivePermute"]
    # Per replica: g - 1 steps forward and g - 1 backward, each a half piece.
    self.assertLen(permutes, 8 * 2 * 3)
    forward = collectives.ring_pairs(groups, +1)
    backward = collectives.ring_pairs(groups, -1)
    self.assertIn([groups[0][0], groups[0][1]], forward)
    self.assertIn([groups[0][1], groups[0][0]], backward)
    seen = collections.Counter()
    for op in permutes:
      pairs = tf.get_static_value(op.inputs[1]).tolist()
      self.assertIn(pairs, (forward, backward))
      seen["forward" if pairs == forward else "backward"] += 1
      self.assertEqual(op.inputs[0].shape, [5])  # half of the 10 values
    self.assertEqual(seen, {"forward": 24, "backward": 24})
    self.assertFalse([op for op in ops
                      if op.type in ("AllToAll", "CrossReplicaSum")])

  def test_groups_of_one_emit_no_collective(self):
    groups = TorusTopology(1, 8).row_groups()
    ops = traced_ops(self.strategy, lambda: (
        self.backend.all_reduce_sum(tf.ones([3]), groups),
        self.backend.reduce_scatter_sum(tf.ones([3]), groups),
        self.backend.all_gather(tf.ones([3]), groups)))
    self.assertFalse([op for op in ops if op.type in (
        "CrossReplicaSum", "AllToAll", "XlaReduceScatter", "CollectivePermute")])

  def test_bad_groups_fail_while_tracing(self):
    with self.assertRaisesRegex(TopologyError, "exactly once"):
      traced_ops(self.strategy, lambda: self.backend.all_reduce_sum(
          tf.ones([3]), [[0, 1, 2, 3]]))

  def test_rank_table_and_ring_pairs(self):
    groups = [[2, 0], [3, 1]]
    self.assertEqual(collectives.rank_table(groups), [1, 1, 0, 0])
    self.assertEqual(collectives.ring_pairs(groups, +1),
                     [[2, 0], [0, 2], [3, 1], [1, 3]])
    self.assertEqual(collectives.ring_pairs([[0, 1, 2]], -1),
                     [[0, 2], [1, 0], [2, 1]])


class TpuBackendEmulatedTest(tf.test.TestCase, parameterized.TestCase):
  """The TPU back end's results, with its ops emulated on the CPU."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.strategy = logical_devices.cpu_mirrored_strategy(8)
    cls.backend = collectives.TpuBackend()

  @parameterized.named_parameters(*grid_groups())
  def test_all_reduce_reduce_scatter_all_gather(self, groups):
    group_size = len(groups[0])
    matrix = per_replica_values([3, 5], np.float32, 8, seed=11)
    flat = per_replica_values([4 * group_size], np.float32, 8, seed=12)
    odd_pieces = per_replica_values([3, 1], np.float32, 8, seed=13)  # 3 values

    def step(r):
      return (self.backend.all_reduce_sum(tf.constant(matrix[r]), groups),
              self.backend.reduce_scatter_sum(tf.constant(flat[r]), groups),
              self.backend.all_gather(tf.constant(odd_pieces[r]), groups))

    with tpu_emulation.emulated_tpu_ops(TIMEOUT_SECONDS):
      summed, scattered, gathered = run_per_replica(self.strategy, step)
    for r in range(8):
      group = collectives.group_of(groups, r)
      rank = group.index(r)
      self.assertAllEqual(summed[r], reference_sum(matrix, group))
      shard = np.split(reference_sum(flat, group), group_size)[rank]
      self.assertAllEqual(scattered[r], shard)
      self.assertAllEqual(gathered[r],
                          np.concatenate([odd_pieces[m] for m in group]))


if __name__ == "__main__":
  tf.test.main()
