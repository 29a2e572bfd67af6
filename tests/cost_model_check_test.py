"""The cost model's counts against the implementation's, counted by instrumenting it.

The real torus aggregator sums ResNet-50's real gradient list (161 float32 tensors,
25,557,032 values) on 8 logical CPU replicas as 2x4, 4x2, 1x8 and 8x1 grids (and
through the NCCL-hinted collective-ops back end on 2x4 and the TPU back end on 2x4 and
4x2, only traced: neither can run on CPU), through a
`tests.collective_recorder.RecordingBackend` that logs every collective op the back
end builds: its kind, the issuing replica, its group and its payload. The step
function is only traced (`get_concrete_function`), never run: counting needs the ops,
not their data.

What is compared, for every replica and every pack of the aggregator's `plan` (it
packs the gradients, last first, into buffers of at most `pack_size_bytes`, each padded to a
multiple of x * 64 bytes, or cut at tensor boundaries), with
`cost_model.torus_allreduce_counts(x, y, pack bytes)`:

* per phase (the model of the back end traced): the collective ops and the group
  size, per replica; the bytes handed to each call (`payload_bytes`) and the bytes
  sent (`bytes_sent`), per replica where chunks are equal, and summed over all
  replicas where the back end cuts packs into uneven runs of whole tensors (the CPU
  back end: a replica then moves its own chunk's share). Bytes are taken from the
  recorded op and its payload (an all-to-all, or the pair broadcasts of the CPU
  reduce-scatter, send the g - 1 chunks that are not the replica's own, an
  all-gather its piece to g - 1 peers, an all-reduce the ring's 2(g - 1) chunks),
  not from the model;
* the phase of each record follows from the implementation alone: its kind and
  whether its group is a row or a column of the grid;
* ring steps: the textbook ring steps of the recorded op over the recorded group size
  ((g - 1) for a reduce-scatter or all-gather, 2(g - 1) for an all-reduce);
* the issue order: every pack's reduce-scatter, then every all-reduce, then every
  all-gather (breadth-first over packs, as the aggregator documents).

Summed over packs, the totals must equal the model summed over the same packs, and
differ from the model of one unpadded 102,228,128-byte buffer only by the padding.
The log itself is checked against the traced graph: every collective op in the graph
is one of a record's ops and every record's op one in the graph, with the same element
count (a broadcast's send and receive carry one chunk, of the length the record's
`chunk_lengths` give).
"""

from tests import logical_devices

logical_devices.configure_logical_cpus()

# pylint: disable=g-import-not-at-top,g-bad-import-order
import collections

from absl.testing import parameterized
import tensorflow as tf

import allreduce
from allreduce import collectives
from allreduce import cost_model
from allreduce import torus_aggregator
from allreduce.topology import TorusTopology
from resnet import resnet_model
from tests.collective_recorder import RecordingBackend

NUM_REPLICAS = 8
PHASE_OF_KIND = {"all_to_all": "reduce_scatter_x",
                 "pair_broadcasts": "reduce_scatter_x",
                 "reduce_scatter": "reduce_scatter_x", "all_reduce": "all_reduce_y",
                 "all_gather": "all_gather_x"}
GRAPH_OPS = {"CollectiveAllToAllV2", "CollectiveReduceV2", "CollectiveGatherV2",
             "CollectiveBcastSendV2", "CollectiveBcastRecvV2", "AllToAll",
             "CrossReplicaSum", "XlaReduceScatter", "CollectivePermute"}


def graph_elements(op):
  """Elements an op in the graph moves: its data input's, or for a broadcast receive
  (whose inputs are keys and the shape) its output's."""
  if op.type == "CollectiveBcastRecvV2":
    return op.outputs[0].shape.num_elements()
  return op.inputs[0].shape.num_elements()


def graph_ops_of(record):
  """(op type, elements) of each raw op the record's call put in the graph."""
  if record.op == "CollectivePermute":  # the TPU all-gather: half a piece per step
    return [(record.op, -(-record.num_elements // 2))] * record.num_ops
  send, receive = "CollectiveBcastSendV2", "CollectiveBcastRecvV2"
  if record.op_types != (send, receive):
    return [(record.op, record.num_elements)] * record.num_ops
  g = record.group_size
  rank = record.group.index(record.replica_id)
  if record.kind == "pair_broadcasts":
    # A reduce-scatter: each peer's chunk sent to it, this replica's own chunk
    # received from each peer.
    lengths = record.chunk_lengths or (record.num_elements // g,) * g
    return ([(send, n) for k, n in enumerate(lengths) if k != rank]
            + [(receive, lengths[rank])] * (g - 1))
  # An all-gather: this replica's shard sent once to the row, each peer's received.
  lengths = record.chunk_lengths or (record.num_elements,) * g
  return ([(send, record.num_elements)]
          + [(receive, n) for k, n in enumerate(lengths) if k != rank])


def resnet50_gradient_shapes():
  """The shapes of ResNet-50's trainable variables, in the model's order."""
  model = resnet_model.build_resnet_for_depth(50, num_classes=1000, image_size=224)
  shapes = [tuple(v.shape.as_list()) for v in model.trainable_variables]
  return shapes


def ring_steps(record):
  """Latency steps of the textbook ring schedule of the recorded op."""
  g = record.group_size
  return 2 * (g - 1) if record.kind == "all_reduce" else g - 1


class CostModelMatchesImplementationTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.shapes = resnet50_gradient_shapes()
    cls.strategy = logical_devices.cpu_mirrored_strategy(NUM_REPLICAS)

  def test_resnet50_gradient_list(self):
    self.assertLen(self.shapes, 161)
    self.assertEqual(sum(tf.TensorShape(s).num_elements() for s in self.shapes),
                     cost_model.RESNET50_NUM_PARAMETERS)

  def _trace(self, x, y, backend, pack_size_bytes):
    """Traces one aggregation of the gradient list; returns (log, graph ops)."""
    log = RecordingBackend(backend)
    aggregator = allreduce.make_torus_aggregator(
        (x, y), backend=log, pack_size_bytes=pack_size_bytes)
    shapes = self.shapes

    @tf.function(autograph=False)
    def step():
      return self.strategy.run(
          lambda: aggregator.all_reduce([tf.zeros(s, tf.float32) for s in shapes]))

    graph = step.get_concrete_function().graph
    return log, [op for op in graph.get_operations() if op.type in GRAPH_OPS]

  # No 8x1 off NCCL: its 14 broadcasts per pack and replica took a minute to trace
  # on 2 cores, and 4x2 already has more than one peer per row.
  @parameterized.named_parameters(
      ("2x4", 2, 4, "collective_ops", torus_aggregator.DEFAULT_PACK_SIZE_BYTES),
      ("4x2", 4, 2, "collective_ops", torus_aggregator.DEFAULT_PACK_SIZE_BYTES),
      ("1x8", 1, 8, "collective_ops", torus_aggregator.DEFAULT_PACK_SIZE_BYTES),
      ("2x4_nccl", 2, 4, "nccl", torus_aggregator.DEFAULT_PACK_SIZE_BYTES),
      ("2x4_tpu", 2, 4, "tpu", torus_aggregator.DEFAULT_PACK_SIZE_BYTES),
      ("4x2_tpu", 4, 2, "tpu", torus_aggregator.DEFAULT_PACK_SIZE_BYTES),
  )
  def test_counts_per_pack_and_in_total(self, x, y, backend, pack_size_bytes):
    issuing = {
        "collective_ops": collectives.CollectiveOpsBackend,
        "nccl": lambda: collectives.CollectiveOpsBackend(communication_hint="nccl"),
        "tpu": collectives.TpuBackend,
    }[backend]()
    log, graph_ops = self._trace(x, y, issuing, pack_size_bytes)
    grid = TorusTopology(x, y)
    packs = allreduce.make_torus_aggregator(
        grid, pack_size_bytes=pack_size_bytes).plan(
            [(s, tf.float32) for s in self.shapes],
            uneven_chunks=issuing.exchanges_uneven_chunks)
    models = [cost_model.torus_allreduce_counts(x, y, pack.length * 4,
                                                backend=backend)
              for pack in packs]
    self.assertBetween(len(packs), 4, 16)

    # The log holds exactly the collective ops of the graph.
    self.assertEqual(
        collections.Counter((op.type, graph_elements(op)) for op in graph_ops),
        collections.Counter(op for r in log.records for op in graph_ops_of(r)))

    rows = {tuple(g) for g in grid.row_groups()}
    columns = {tuple(g) for g in grid.column_groups()}
    # Bytes summed over all replicas, per pack and phase: with uneven chunks a
    # replica moves its own chunk's share, and only the sum over a row is the
    # model's x equal shares.
    bytes_by_pack = collections.Counter()
    for replica in range(NUM_REPLICAS):
      records = log.for_replica(replica)
      # Issue order: phase by phase, each over every pack.
      expected_kinds = [models[0].phase(name).collective for name in
                        ("reduce_scatter_x", "all_reduce_y", "all_gather_x")
                        if models[0].phase(name).collective_calls
                        for _ in packs]
      self.assertEqual([r.kind for r in records], expected_kinds)
      by_phase = collections.defaultdict(list)
      for record in records:
        self.assertIn(replica, record.group)
        self.assertEqual(record.dtype, "float32")
        self.assertIn(record.group, columns if record.kind == "all_reduce" else rows)
        by_phase[PHASE_OF_KIND[record.kind]].append(record)

      calls = 0
      for pack_index, model in enumerate(models):
        for phase in model.phases:
          issued = by_phase[phase.name][pack_index:pack_index + 1]
          measured = dict(
              collective_calls=sum(r.num_ops for r in issued),
              group_size=issued[0].group_size if issued else 1,
              ring_steps=sum(ring_steps(r) for r in issued))
          modelled = {k: getattr(phase, k) for k in measured}
          self.assertEqual(measured, modelled, (replica, pack_index, phase.name))
          if issued:
            self.assertEqual(issued[0].kind, phase.collective)
          for key in ("payload_bytes", "bytes_sent"):
            mine = sum(getattr(r, key) for r in issued)
            bytes_by_pack[pack_index, phase.name, key] += mine
            if not issuing.exchanges_uneven_chunks:
              self.assertEqual(mine, getattr(phase, key),
                               (replica, pack_index, phase.name, key))
          calls += measured["collective_calls"]
      # Every phase's records were matched to a pack: none left over.
      self.assertEqual(sum(r.num_ops for v in by_phase.values() for r in v), calls)
      self.assertEqual(calls, sum(m.collective_calls for m in models))

    for pack_index, model in enumerate(models):
      for phase in model.phases:
        for key in ("payload_bytes", "bytes_sent"):
          # Exact, but for the column ring's chunks of a shard that does not divide
          # by y: ceil() adds under one element per chunk sent, 2 (y - 1) of them.
          slack = (2 * (y - 1) * 4 * NUM_REPLICAS
                   if (phase.name, key) == ("all_reduce_y", "bytes_sent") else 0)
          self.assertAllClose(bytes_by_pack[pack_index, phase.name, key],
                              NUM_REPLICAS * getattr(phase, key), rtol=0, atol=slack,
                              msg=f"pack {pack_index} {phase.name} {key}")

    # Against one unpacked buffer: the same bytes but for the packs' padding, and
    # the latency steps once per pack.
    whole = cost_model.torus_allreduce_counts(x, y, cost_model.RESNET50_GRADIENT_BYTES)
    padding_bytes = (sum(p.length for p in packs) * 4
                     - cost_model.RESNET50_GRADIENT_BYTES)
    self.assertBetween(padding_bytes, 0, (len(self.shapes) + len(packs) * x) * 64)
    self.assertAllClose(sum(m.bytes_sent for m in models), whole.bytes_sent,
                        rtol=1e-4)
    self.assertEqual(sum(m.ring_steps for m in models),
                     len(packs) * whole.ring_steps)


class RecordingBackendTest(tf.test.TestCase):
  """The recorder itself: it records the calls that pass through it only, and a
  recorder wrapping another records into both."""

  def test_records_what_passes_through_it_only(self):
    strategy = logical_devices.cpu_mirrored_strategy(NUM_REPLICAS)
    outer = RecordingBackend(collectives.backend_for_strategy(strategy))
    inner = RecordingBackend(outer)

    def trace(backend):
      aggregator = allreduce.make_torus_aggregator((2, 4), backend=backend)

      @tf.function(autograph=False)
      def step():
        return strategy.run(lambda: aggregator.all_reduce([tf.zeros([10, 3])]))
      return step.get_concrete_function()

    trace(inner)
    self.assertEqual(outer.records, inner.records)
    trace(outer)
    self.assertLen(inner.records, NUM_REPLICAS * 3)  # one pack, three phases
    self.assertLen(outer.records, 2 * NUM_REPLICAS * 3)
    trace(outer.inner)  # the production back end alone records nothing
    self.assertLen(outer.records, 2 * NUM_REPLICAS * 3)
    record = inner.for_replica(5)[0]
    self.assertEqual((record.kind, record.op, record.group, record.dtype),
                     ("pair_broadcasts", "CollectiveBcastSendV2+CollectiveBcastRecvV2",
                      (4, 5), "float32"))
    # 30 values in a 64-byte-aligned slot, padded to 2 shards of 16 values: one
    # shard sent to the peer, one received from it.
    self.assertEqual((record.num_elements, record.payload_bytes, record.bytes_sent,
                      record.num_ops), (32, 128, 64, 2))


if __name__ == "__main__":
  tf.test.main()
