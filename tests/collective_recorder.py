"""A collective back end that records what it is asked to issue, for tests only.

`RecordingBackend(inner)` is a `CollectiveBackend`: each call is handed to `inner`,
and once `inner` has built its op, one `CollectiveRecord` says what was issued, by
which replica, over which group, on what payload. Tests pass it wherever a back end
is accepted (`make_torus_aggregator(..., backend=)`, `make_batch_norm_factory(...,
backend=)`), so the production back ends carry no recording code.

Records are taken at trace time, when the op is built: a traced function that is
never run is counted as well, and a function run many times is counted once per
trace. A recorder may wrap another recorder; both then record every call.
"""

import dataclasses
import threading
from typing import List, Optional, Tuple

import tensorflow as tf

from allreduce import collectives
from allreduce import topology

# What each back end issues per call, as (kind, raw op types). tests/
# cost_model_check_test.py checks the records against the traced graph, so a back end
# that changes its ops fails there, not silently here.
_PAIR_BROADCASTS = ("pair_broadcasts",
                    "CollectiveBcastSendV2+CollectiveBcastRecvV2")
_ISSUED_OPS = (
    (collectives.TpuBackend, {
        "all_reduce_sum": ("all_reduce", "CrossReplicaSum"),
        "reduce_scatter_sum": ("reduce_scatter", "XlaReduceScatter"),
        # The base class's: the chunks concatenated, then reduce_scatter_sum.
        "reduce_scatter_chunks": ("reduce_scatter", "XlaReduceScatter"),
        "all_gather": ("all_gather", "CollectivePermute"),
        # The base class's: all_gather, then a split.
        "all_gather_chunks": ("all_gather", "CollectivePermute"),
    }),
    (collectives.CollectiveOpsBackend, {
        "all_reduce_sum": ("all_reduce", "CollectiveReduceV2"),
        # No CPU reduce-scatter kernel: an all-to-all, then a local sum.
        "reduce_scatter_sum": ("all_to_all", "CollectiveAllToAllV2"),
        # Off NCCL: each chunk sent to its owner by a broadcast over the pair, one
        # send and one receive per peer, then a local sum.
        "reduce_scatter_chunks": _PAIR_BROADCASTS,
        "all_gather": ("all_gather", "CollectiveGatherV2"),
        # Off NCCL: the shard sent to each peer and each peer's received, by a
        # broadcast over the pair each way.
        "all_gather_chunks": ("all_gather", _PAIR_BROADCASTS[1]),
    }),
)
# Under NCCL the collective-ops back end keeps the base class's
# reduce_scatter_chunks (broadcasts are not ordered, NCCL needs one launch order):
# the concatenated chunks go through reduce_scatter_sum, an all-to-all.
_NCCL_ISSUED_OPS = {
    "reduce_scatter_chunks": ("all_to_all", "CollectiveAllToAllV2"),
    "all_gather_chunks": ("all_gather", "CollectiveGatherV2"),
}


@dataclasses.dataclass(frozen=True)
class CollectiveRecord:
  """One collective op as a back end issued it, seen from the replica that issued it.

  Attributes:
    kind: what the op does for the caller: "all_reduce", "all_to_all" (the exchange
      of a reduce-scatter built from an all-to-all), "pair_broadcasts" (the exchange
      of a reduce-scatter built from a broadcast to and from each peer, one pair
      group per peer), "reduce_scatter" (a native one) or "all_gather".
    op: the raw TensorFlow op type issued (e.g. "CollectiveAllToAllV2",
      "XlaReduceScatter"); "+"-joined where a call issues two types in equal numbers
      ("pair_broadcasts": "CollectiveBcastSendV2+CollectiveBcastRecvV2", see
      `op_types`).
    replica_id: the issuing replica, or None where it is unknown at trace time (TPU:
      one trace serves every replica).
    group: the replica ids of the issuing replica's group, in the caller's order
      (on TPU without a replica id: the first group; all have the same size).
    shape: static shape of the payload, the tensor the caller asked to reduce,
      exchange or gather (for "all_to_all", "pair_broadcasts" and "reduce_scatter"
      the whole buffer, all g chunks, before it is cut or however it was handed
      over); None for an unknown rank, None entries for unknown dimensions, and then
      the sizes below are None too.
    dtype: the payload's dtype name.
    element_bytes: bytes per payload element.
    num_ops: raw ops the call issued (the TPU all-gather is a chain of
      `CollectivePermute`s, 2 (g - 1) of them; "pair_broadcasts" are g - 1 sends
      and g - 1 receives, 2 (g - 1), each of one chunk; an all-gather from
      broadcasts is one send of the replica's shard and g - 1 receives, g;
      everything else is one op).
    chunk_lengths: for a call handed its buffer as chunks (`reduce_scatter_chunks`,
      `all_gather_chunks`), the chunks' element counts in rank order (they may
      differ: `CollectiveBackend.exchanges_uneven_chunks`); else None (g equal
      chunks of n / g).
  """
  kind: str
  op: str
  replica_id: Optional[int]
  group: Tuple[int, ...]
  shape: Optional[Tuple[Optional[int], ...]]
  dtype: str
  element_bytes: int
  num_ops: int = 1
  chunk_lengths: Optional[Tuple[int, ...]] = None

  @property
  def op_types(self) -> Tuple[str, ...]:
    """The raw op types of `op` (for broadcasts, how many of each: `num_ops`)."""
    return tuple(self.op.split("+"))

  @property
  def group_size(self) -> int:
    return len(self.group)

  @property
  def num_elements(self) -> Optional[int]:
    if self.shape is None or None in self.shape:
      return None
    count = 1
    for dim in self.shape:
      count *= dim
    return count

  @property
  def payload_bytes(self) -> Optional[int]:
    n = self.num_elements
    return None if n is None else n * self.element_bytes

  @property
  def bytes_sent(self) -> Optional[int]:
    """Bytes this replica must send for the op, whatever the schedule:

    * all_to_all, pair_broadcasts and reduce_scatter: g - 1 chunks of n / g (an
      all-to-all, or a send to each peer, sends the chunks that belong to the other
      members; a ring reduce-scatter forwards g - 1 partial sums of a chunk, one
      per step);
    * all_gather: its piece to each of the g - 1 others (a ring forwards g - 1 pieces);
    * all_reduce: 2 (g - 1) chunks of ceil(n / g), the ring algorithm's
      reduce-scatter and all-gather halves (TensorFlow's RING implementation and the
      TPU interconnect's schedule); the one figure that depends on the algorithm.

    Counted here from the op and its payload, independently of
    `allreduce/cost_model.py`, so that comparing the two checks the model.
    """
    g, n, b = self.group_size, self.num_elements, self.element_bytes
    if n is None:
      return None
    if self.kind in ("all_to_all", "pair_broadcasts", "reduce_scatter"):
      return (n - self.own_chunk_elements) * b
    if self.kind == "all_gather":
      return (g - 1) * n * b
    return 2 * (g - 1) * (-(-n // g)) * b

  @property
  def own_chunk_elements(self) -> Optional[int]:
    """Elements of the issuing replica's own chunk of a reduce-scatter's buffer."""
    if self.chunk_lengths is None or self.replica_id is None:
      return None if self.num_elements is None else self.num_elements // self.group_size
    return self.chunk_lengths[self.group.index(self.replica_id)]


class RecordingBackend(collectives.CollectiveBackend):
  """Hands every call to `inner` and records the op it issued in `records`.

  `records` holds every replica's ops in issue order, mixed; `for_replica` picks one
  replica's. MirroredStrategy traces each replica in a thread of its own, hence the
  lock.
  """

  def __init__(self, inner: collectives.CollectiveBackend):
    self.inner = inner
    self.records: List[CollectiveRecord] = []
    self._lock = threading.Lock()

  def for_replica(self, replica_id: Optional[int]) -> List[CollectiveRecord]:
    return [r for r in self.records if r.replica_id == replica_id]

  def all_reduce_sum(self, value, group_assignment):
    result = self.inner.all_reduce_sum(value, group_assignment)
    self._record("all_reduce_sum", value, group_assignment)
    return result

  def reduce_scatter_sum(self, value, group_assignment):
    result = self.inner.reduce_scatter_sum(value, group_assignment)
    self._record("reduce_scatter_sum", value, group_assignment)
    return result

  def all_gather(self, value, group_assignment):
    result = self.inner.all_gather(value, group_assignment)
    self._record("all_gather", value, group_assignment)
    return result

  @property
  def exchanges_uneven_chunks(self):
    return self.inner.exchanges_uneven_chunks

  def all_gather_chunks(self, shard, lengths, group_assignment):
    """Recorded with the shard as payload and the pieces' `chunk_lengths`."""
    result = self.inner.all_gather_chunks(shard, lengths, group_assignment)
    self._record("all_gather_chunks", shard, group_assignment,
                 chunk_lengths=tuple(int(n) for n in lengths))
    return result

  def reduce_scatter_chunks(self, chunks, group_assignment):
    """Forwarded whole, so the record is of what the issuing back end builds from
    the chunks (the base class's default would turn them into one
    `reduce_scatter_sum` here, and record an all-to-all the CPU path never issues).
    The payload recorded is the whole buffer, as for `reduce_scatter_sum`."""
    chunks = [tf.convert_to_tensor(c) for c in chunks]
    result = self.inner.reduce_scatter_chunks(chunks, group_assignment)
    lengths = [c.shape[0] if c.shape.rank == 1 else None for c in chunks]
    buffer = tf.TensorSpec(
        [None if None in lengths else sum(lengths)], chunks[0].dtype)
    self._record("reduce_scatter_chunks", buffer, group_assignment,
                 chunk_lengths=None if None in lengths else tuple(lengths))
    return result

  def _issuing_backend(self) -> collectives.CollectiveBackend:
    backend = self.inner
    while isinstance(backend, RecordingBackend):
      backend = backend.inner
    return backend

  def _record(self, method, value, group_assignment, chunk_lengths=None):
    """Records the op `inner` built for `method` on the payload `value` (a tensor,
    or the `tf.TensorSpec` of a buffer handed over as chunks of `chunk_lengths`);
    recorded after `inner` returned, so a call that raised leaves no record."""
    context = tf.distribute.get_replica_context()
    groups = topology.check_group_assignment(group_assignment,
                                             context.num_replicas_in_sync)
    group_size = len(groups[0])
    if group_size == 1:
      return  # a group of one issues no collective
    backend = self._issuing_backend()
    (kind, op), = [ops[method] for backend_type, ops in _ISSUED_OPS
                   if isinstance(backend, backend_type)]
    if (isinstance(backend, collectives.CollectiveOpsBackend)
        and backend._communication_hint == "nccl"):  # pylint: disable=protected-access
      kind, op = _NCCL_ISSUED_OPS.get(method, (kind, op))
    num_ops = 1
    if isinstance(backend, collectives.TpuBackend) and method == "all_gather":
      num_ops = 2 * (group_size - 1)  # the ring: g - 1 steps each way round
    if op == _PAIR_BROADCASTS[1]:
      # A reduce-scatter: a send to and a receive from each peer; an all-gather:
      # one send to the group and a receive from each peer.
      num_ops = group_size if kind == "all_gather" else 2 * (group_size - 1)
    replica_id = tf.get_static_value(context.replica_id_in_sync_group)
    if replica_id is None:
      group = groups[0]
    else:
      replica_id = int(replica_id)
      group = collectives.group_of(groups, replica_id)
    if not isinstance(value, tf.TensorSpec):
      value = tf.convert_to_tensor(value)
    record = CollectiveRecord(
        kind=kind, op=op, replica_id=replica_id, group=tuple(group),
        shape=None if value.shape.rank is None else tuple(value.shape.as_list()),
        dtype=value.dtype.name, element_bytes=value.dtype.size, num_ops=num_ops,
        chunk_lengths=chunk_lengths)
    with self._lock:
      self.records.append(record)
