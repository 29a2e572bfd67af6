"""The one collective back end interface: grouped sum, reduce-scatter and all-gather.

Layers (grouped batch norm) and the gradient aggregator call a `CollectiveBackend`,
never raw collective ops, so the same model code runs on two back ends:

* `TpuBackend`: `CrossReplicaSum`, `XlaReduceScatter` and `CollectivePermute`
  with a `group_assignment` (or source-target) constant, the ops XLA turns into
  interconnect collectives on a TPU pod.
* `CollectiveOpsBackend`: TensorFlow's collective ops (`CollectiveReduceV2`,
  `CollectiveAllToAllV2`, `CollectiveGatherV2`, and off NCCL
  `CollectiveBcastSendV2`/`RecvV2` for the reduce-scatter and all-gather of
  separately built chunks) for CPU, GPU and multi-worker strategies, with one group
  key per group of replicas.

Whoever builds a layer or an aggregator may hand it any `CollectiveBackend`, so a
test can wrap one of these (tests/collective_recorder.py records what it is asked to
issue) without the back ends knowing.

Every method runs in *replica context* (inside `strategy.run`, a Keras `train_step`
or an optimizer's `apply_gradients`) and takes a `group_assignment`: a list of lists of
global replica ids that partitions all replicas, the TPU convention that
`allreduce.topology` produces. A replica's *rank* in its group is its position in its
group's list; reduce-scatter shards and all-gather pieces follow that order on both back
ends.
"""

import hashlib
import threading
from typing import Dict, List, Sequence, Tuple

import tensorflow as tf

from allreduce.topology import GroupAssignment, TopologyError, check_group_assignment

# Our group keys live far above the ones tf.distribute hands out (it counts up from 1
# per strategy), so grouped collectives never join a strategy's own all-reduce.
_GROUP_KEY_BASE = 1 << 24
_GROUP_KEY_SPAN = 1 << 28


def group_of(groups: Sequence[Sequence[int]], replica_id: int) -> Tuple[int, ...]:
  """The group that holds `replica_id`."""
  for group in groups:
    if replica_id in group:
      return tuple(group)
  raise TopologyError(f"replica {replica_id} is in no group of {groups}")


def split_for_group(value, group_size: int):
  """Views a 1-D `value` as `[group_size, length / group_size]` chunks."""
  if value.shape.rank != 1:
    raise ValueError(f"reduce_scatter_sum takes a 1-D tensor, got shape {value.shape}")
  length = value.shape[0]
  if length is not None and length % group_size:
    raise ValueError(
        f"reduce_scatter_sum needs a length divisible by the group size "
        f"{group_size}, got {length}")
  return tf.reshape(value, [group_size, -1])


def sum_received_chunks(received):
  """Sums the `[group_size, ...]` chunks an all-to-all delivered (reduce-scatter).

  `add_n` over the rows, not `reduce_sum(axis=0)`: it was the faster of the two on
  CPU (docs/RESULTS.md, "Summing received chunks"), and the rows are views of the
  received buffer, not copies.
  """
  return tf.add_n(tf.unstack(received, axis=0))


def _check_gatherable(value):
  if value.shape.rank is not None and value.shape.rank < 1:
    raise ValueError("all_gather concatenates along axis 0 and needs rank >= 1, "
                     f"got shape {value.shape}")


class CollectiveBackend:
  """Grouped collectives in replica context. Subclasses implement a back end."""

  def all_reduce_sum(self, value, group_assignment: GroupAssignment):
    """The sum of `value` over this replica's group; same shape and dtype."""
    raise NotImplementedError

  def reduce_scatter_sum(self, value, group_assignment: GroupAssignment):
    """This replica's shard of the group sum of a 1-D `value`.

    `value` is split into `group_size` equal chunks; the replica of rank r receives
    the sum over its group of chunk r.
    """
    raise NotImplementedError

  def all_gather(self, value, group_assignment: GroupAssignment):
    """The group's `value`s concatenated along axis 0 in rank order."""
    raise NotImplementedError

  # Whether `reduce_scatter_chunks` and `all_gather_chunks` take chunks of
  # different lengths. Those that do let a buffer be cut at its tensors' boundaries,
  # so the gathered pieces are read out without concatenating a tensor from two.
  exchanges_uneven_chunks = False

  def reduce_scatter_chunks(self, chunks: Sequence[tf.Tensor],
                            group_assignment: GroupAssignment):
    """`reduce_scatter_sum` of the buffer `tf.concat(chunks)`, handed over as its
    `group_size` 1-D chunks (chunk r is the one rank r receives the sum of): of
    equal lengths, or of any non-zero lengths where `exchanges_uneven_chunks`.

    The default concatenates and calls `reduce_scatter_sum`; a back end that can send
    each chunk as it is, without first copying it into one buffer, overrides it.
    """
    chunks = list(chunks)
    return self.reduce_scatter_sum(
        chunks[0] if len(chunks) == 1 else tf.concat(chunks, axis=0), group_assignment)

  def all_gather_chunks(self, shard, lengths: Sequence[int],
                        group_assignment: GroupAssignment) -> List[tf.Tensor]:
    """The group's 1-D shards, one tensor per rank: rank r's has `lengths[r]`
    elements, this replica's is `shard` (the inverse of `reduce_scatter_chunks`).

    The default gathers into one buffer and splits it (equal lengths only); a back
    end that exchanges uneven chunks overrides it.
    """
    lengths = list(lengths)
    if len(set(lengths)) != 1:
      raise ValueError(f"{type(self).__name__} gathers equal shards only, got "
                       f"lengths {lengths}")
    return tf.split(self.all_gather(shard, group_assignment), len(lengths))


def _replica_context():
  context = tf.distribute.get_replica_context()
  if context is None:
    raise RuntimeError(
        "collectives run in replica context: call them inside strategy.run, a "
        "Keras train_step or an optimizer's apply_gradients")
  return context


def _xla_reduce_scatter(value, group_assignment, scatter_dimension, reduce_op):
  """`XlaReduceScatter`, which TF 2.20 does not list in `tf.raw_ops`.

  Its generated wrapper lives in `tensorflow.compiler.tf2xla.ops.gen_xla_ops`, a
  module path TensorFlow does not promise to keep; this is the one place that
  imports it (tests/collectives_test.py traces it, so a move fails loudly).
  """
  from tensorflow.compiler.tf2xla.ops import gen_xla_ops  # pylint: disable=g-import-not-at-top
  return gen_xla_ops.xla_reduce_scatter(
      input=value, group_assignment=group_assignment,
      scatter_dimension=scatter_dimension, reduce_op=reduce_op)


def ring_pairs(groups: Sequence[Sequence[int]], step: int) -> List[List[int]]:
  """`[source, target]` pairs sending to the member `step` places on in each group."""
  pairs = []
  for group in groups:
    g = len(group)
    pairs.extend([group[i], group[(i + step) % g]] for i in range(g))
  return pairs


def rank_table(groups: Sequence[Sequence[int]]) -> List[int]:
  """`table[replica_id]`: the replica's rank (position) in its group."""
  table = [0] * sum(len(group) for group in groups)
  for group in groups:
    for rank, replica in enumerate(group):
      table[replica] = rank
  return table


class TpuBackend(CollectiveBackend):
  """TPU back end: XLA's grouped cross-replica ops, chosen for ring bandwidth.

  Ranks are positions in the `group_assignment` lists, as XLA defines them, so the
  groups' order must be the physical ring order (`TorusTopology` rows and columns
  are, when built from the chips' coordinates). Per replica, for a payload of n
  bytes over a group of g (the costs `allreduce/cost_model.py` prices):

  * all-reduce: `CrossReplicaSum`, the interconnect's ring all-reduce,
    2 (g - 1) n / g sent.
  * reduce-scatter: `XlaReduceScatter` (XLA ReduceScatter): (g - 1) n / g sent, the
    ring optimum. The `AllToAll` it replaces sends the same bytes, but straight to
    each destination: on a ring a chunk crosses up to g / 2 links, so the busiest
    link carries about g^2 / 8 chunks instead of (g - 1) / 2.
  * all-gather: TF 2.20 has no all-gather op for TPU (no `XlaAllGather`; the
    strategy's own `all_gather` sums a zero-padded buffer with `CrossReplicaSum`,
    which sends 2 (g - 1) n, twice the optimum). Here it is the ring itself: g - 1
    steps of `CollectivePermute`, each replica forwarding what it received last, half
    of every piece going each way round so both directions of every link carry
    data: (g - 1) n sent, every step one hop between ring neighbours.

  The all-gather places the pieces by the replica's rank, which on TPU is known only
  when the program runs (`replica_id_in_sync_group` is a tensor there): it is read
  from a constant table indexed by the replica id.
  """

  def _groups(self, group_assignment):
    return check_group_assignment(group_assignment,
                                  _replica_context().num_replicas_in_sync)

  def all_reduce_sum(self, value, group_assignment):
    groups = self._groups(group_assignment)
    if len(groups[0]) == 1:
      return tf.identity(value)
    return tf.raw_ops.CrossReplicaSum(
        input=value, group_assignment=tf.constant(groups, tf.int32))

  def reduce_scatter_sum(self, value, group_assignment):
    groups = self._groups(group_assignment)
    group_size = len(groups[0])
    value = tf.convert_to_tensor(value)
    split_for_group(value, group_size)  # checks rank and divisibility
    if group_size == 1:
      return tf.identity(value)
    shard = _xla_reduce_scatter(
        value, group_assignment=tf.constant(groups, tf.int32),
        scatter_dimension=tf.constant(0, tf.int32), reduce_op="Add")
    if value.shape[0] is not None:
      shard = tf.ensure_shape(shard, [value.shape[0] // group_size])
    return shard

  def all_gather(self, value, group_assignment):
    value = tf.convert_to_tensor(value)
    _check_gatherable(value)
    groups = self._groups(group_assignment)
    group_size = len(groups[0])
    if group_size == 1:
      return tf.identity(value)
    if not value.shape.is_fully_defined():
      raise ValueError("the TPU all_gather needs a static shape (XLA compiles every "
                       f"shape), got {value.shape}")
    num_elements = value.shape.num_elements()
    half = (num_elements + 1) // 2
    flat = tf.pad(tf.reshape(value, [-1]), [[0, 2 * half - num_elements]])
    # Half of every piece travels forward round the ring, half backward.
    forward = self._ring_pass(flat[:half], groups, +1)
    backward = self._ring_pass(flat[half:], groups, -1)
    rank = tf.gather(tf.constant(rank_table(groups), tf.int32),
                     _replica_context().replica_id_in_sync_group)
    offsets = tf.range(group_size, dtype=tf.int32)
    # forward[s] came from rank (rank - s), backward[s] from rank (rank + s).
    forward = tf.gather(forward, tf.math.floormod(rank - offsets, group_size))
    backward = tf.gather(backward, tf.math.floormod(offsets - rank, group_size))
    pieces = tf.concat([forward, backward], axis=1)[:, :num_elements]
    return tf.reshape(pieces,
                      [group_size * value.shape[0]] + value.shape.as_list()[1:])

  @staticmethod
  def _ring_pass(piece, groups, direction):
    """`[g, len]`: row s is the piece of the member s places before this one along
    `direction` (+1: forward round each group's list, -1: backward)."""
    pairs = tf.constant(ring_pairs(groups, direction), tf.int32)
    received = [piece]
    for _ in range(len(groups[0]) - 1):
      received.append(tf.raw_ops.CollectivePermute(
          input=received[-1], source_target_pairs=pairs))
    return tf.stack(received)


# The chain batch norm's collectives are ordered in, apart from the gradients'.
BATCH_NORM_CHAIN = "batch_norm"


class _CollectiveKeys:
  """Process-wide group keys, instance keys and ordering tokens.

  Shared by every `CollectiveOpsBackend` in the process: two back ends used in one
  step (say batch norm's and the gradient aggregator's) must never reuse an instance
  key of a group, and the same group must get the same key in every process of a
  multi-worker job.

  * Group key: a hash of what identifies the group (its member devices when every
    replica is local, else its member replica ids and the replica count), so every
    process derives it alone.
  * Instance key: a counter per (group key, replica). Each member of a group issues
    the same sequence of collectives on that group, so the members' counters agree
    whatever other groups, back ends or strategies used the process before.
  * Ordering token: a resource handle per (replica's device, group, chain).
    Collectives that take it are ordered among themselves, in issue order, and
    nowhere else; without it automatic control dependencies chain all replicas'
    collectives in one sequence, and every replica waits on a peer that cannot
    start. One token per group, as TensorFlow's own `CollectiveReplicaLauncher`
    keeps one per device and group (tensorflow/python/distribute/
    cross_device_utils.py), and per chain (a back end's `chain`, e.g. batch norm's
    apart from the gradients'): with a single token per device, a gradient pack
    could not start before the last batch-norm collective of the backward pass had
    been issued, so summation could not overlap backprop. Collectives are matched
    by instance key, so two chains on one group meet whatever order they run in.
    Broadcasts (`CollectiveBcastSendV2`/`RecvV2`) take no token: they run when
    their inputs are ready, matched by instance key alone.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._instance_counters: Dict[Tuple[int, int], int] = {}
    self._tokens: Dict[Tuple[str, int, str], tf.Tensor] = {}

  def group_key(self, identity: str) -> int:
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return _GROUP_KEY_BASE + int.from_bytes(digest[:8], "little") % _GROUP_KEY_SPAN

  def next_instance_key(self, group_key: int, replica_id: int) -> int:
    with self._lock:
      key = self._instance_counters.get((group_key, replica_id), 0) + 1
      self._instance_counters[(group_key, replica_id)] = key
      return key

  def ordering_token(self, device: str, group_key: int, chain: str):
    with self._lock:
      token = self._tokens.get((device, group_key, chain))
      if token is None:
        # A handle is all the op needs: the token orders, it is never read.
        with tf.init_scope(), tf.device(device):
          token = tf.raw_ops.VarHandleOp(
              dtype=tf.float32, shape=[],
              shared_name=f"torus_allreduce_token_{device}_{group_key}_{chain}")
        self._tokens[(device, group_key, chain)] = token
      return token


_KEYS = _CollectiveKeys()


class CollectiveOpsBackend(CollectiveBackend):
  """CPU / GPU / multi-worker back end on TensorFlow's collective ops.

  Works under `MirroredStrategy` and `MultiWorkerMirroredStrategy`, where a replica's
  id is a Python constant while tracing. TensorFlow ranks a group's members by device
  name; with the strategies' usual device lists that is ascending replica id. Groups
  listed in another order are served by permuting chunks locally so that ranks stay
  positions in the caller's lists.

  Reduce-scatter is `CollectiveAllToAllV2` plus a local sum (TensorFlow has no CPU
  implementation of `CollectiveReduceScatterV2`). Off NCCL, `reduce_scatter_chunks`
  and `all_gather_chunks` are built from broadcasts instead, sent straight from the
  chunk: each chunk goes to its owner by a broadcast over the pair, and each summed
  shard to its whole group by one broadcast. The all-to-all copies its whole input,
  the replica's own chunk too, into a new buffer, and the gather copies the
  replica's own piece; on one host those copies were the torus's cost over the ring
  (docs/RESULTS.md, "2-D torus all-reduce"). Chunks may then differ in length, so
  a buffer can be cut at its tensors' boundaries (`exchanges_uneven_chunks`).
  `timeout_seconds` bounds every wait, so a missing peer fails the step instead of
  hanging it; 0 waits forever.

  `chain` names the sequence this back end's collectives are ordered in (see
  `_CollectiveKeys`): batch norm's run apart from the gradients', so a gradient
  pack is not held behind a later layer's batch-norm backward collective.
  All-gathers have a chain of their own on each group (`<chain>_all_gathers`):
  the torus aggregator's first pack's all-gather can then start as soon as that
  pack's column all-reduce is done, not behind the last pack's reduce-scatter on
  the same row. NCCL needs one launch order per communicator, across processes
  too, so with NCCL every back end and every kind of collective shares one chain
  per group, and reduce-scatters stay all-to-alls (an ordered op).
  """

  def __init__(self, timeout_seconds: float = 0.0, communication_hint: str = "auto",
               chain: str = "gradients"):
    self._timeout_seconds = float(timeout_seconds)
    self._communication_hint = communication_hint
    self._nccl = communication_hint == "nccl"
    self._chain = "nccl" if self._nccl else chain
    self._gather_chain = self._chain if self._nccl else f"{chain}_all_gathers"

  @property
  def exchanges_uneven_chunks(self):
    return not self._nccl

  def _group(self, group_assignment):
    """This replica's id and group, validated (nothing allocated yet)."""
    context = _replica_context()
    replica_id = tf.get_static_value(context.replica_id_in_sync_group)
    if replica_id is None:
      raise RuntimeError(
          "CollectiveOpsBackend needs the replica id at trace time (MirroredStrategy, "
          "MultiWorkerMirroredStrategy); use TpuBackend on TPU")
    groups = check_group_assignment(group_assignment, context.num_replicas_in_sync)
    return int(replica_id), group_of(groups, int(replica_id))

  def _launch_params(self, replica_id, group, chain=None):
    """Keys and token for one collective of this replica on `group`, ordered in
    `chain` (default: the back end's).

    Allocates an instance key, so it is called only once every check has passed:
    a replica that raised after allocating would leave its group's counters out of
    step, and the group's next collective would wait forever.
    """
    params = self._broadcast_params(replica_id, group)
    params["ordering_token"] = [_KEYS.ordering_token(
        _replica_device(_replica_context()), params["group_key"],
        chain or self._chain)]
    return params

  def _broadcast_params(self, replica_id, group):
    """Keys for one collective of this replica on `group`, without a token
    (broadcasts take none). Allocates an instance key, as `_launch_params`."""
    context = _replica_context()
    group_key = _KEYS.group_key(
        self._group_identity(context, group, context.num_replicas_in_sync))
    return dict(
        group_size=len(group),
        group_key=group_key,
        instance_key=_KEYS.next_instance_key(group_key, replica_id),
        communication_hint=self._communication_hint,
        timeout_seconds=self._timeout_seconds)

  @staticmethod
  def _group_identity(context, group, num_replicas):
    devices = context.strategy.extended.worker_devices
    if len(devices) == num_replicas:
      # Single process: name the devices, so two strategies over different devices
      # never share a key.
      return "devices:" + ",".join(sorted(devices[r] for r in group))
    return f"replicas:{num_replicas}:" + ",".join(str(r) for r in sorted(group))

  def all_reduce_sum(self, value, group_assignment):
    value = tf.convert_to_tensor(value)
    replica_id, group = self._group(group_assignment)
    if len(group) == 1:
      return tf.identity(value)
    return tf.raw_ops.CollectiveReduceV2(
        input=value, merge_op="Add", final_op="Id",
        **self._launch_params(replica_id, group))

  def reduce_scatter_sum(self, value, group_assignment):
    value = tf.convert_to_tensor(value)
    replica_id, group = self._group(group_assignment)
    chunks = split_for_group(value, len(group))
    if len(group) == 1:
      return value
    # Row j of the op's [group_size, ...] input goes to TensorFlow's rank j, the j-th
    # smallest member, which wants the shard of its position in `group`.
    order = [group.index(member) for member in sorted(group)]
    if order != sorted(order):
      chunks = tf.gather(chunks, order)
    received = tf.raw_ops.CollectiveAllToAllV2(
        input=chunks, **self._launch_params(replica_id, group))
    return sum_received_chunks(received)

  def all_gather(self, value, group_assignment):
    value = tf.convert_to_tensor(value)
    _check_gatherable(value)
    replica_id, group = self._group(group_assignment)
    if len(group) == 1:
      return tf.identity(value)
    gathered = tf.raw_ops.CollectiveGatherV2(
        input=value, **self._launch_params(replica_id, group, self._gather_chain))
    # Pieces arrive in TensorFlow's rank order (ascending replica id).
    ranked = sorted(group)
    order = [ranked.index(member) for member in group]
    if order != sorted(order):
      pieces = tf.reshape(gathered, tf.concat([[len(group)], tf.shape(value)], 0))
      gathered = tf.reshape(tf.gather(pieces, order), tf.shape(gathered))
    return gathered

  def reduce_scatter_chunks(self, chunks, group_assignment):
    chunks = [tf.convert_to_tensor(c) for c in chunks]
    replica_id, group = self._group(group_assignment)
    if self._nccl or len(group) == 1:
      return super().reduce_scatter_chunks(chunks, group_assignment)
    _check_chunks("reduce_scatter_chunks", chunks, len(group))
    rank = group.index(replica_id)
    received, sent = [], []
    for peer_rank, peer in enumerate(group):
      if peer == replica_id:
        continue
      # Chunk k goes to member k alone, straight from the chunk; this replica's own
      # chunk comes from each peer, so it is what every receive expects.
      send, receive = self._pair_params(replica_id, peer)
      sent.append(tf.raw_ops.CollectiveBcastSendV2(input=chunks[peer_rank], **send))
      received.append(tf.raw_ops.CollectiveBcastRecvV2(
          shape=chunks[rank].shape, T=chunks[rank].dtype, **receive))
    # Broadcasts are not chained by automatic control dependencies, and a send's
    # output is not used: without this edge the sends would be pruned.
    with tf.control_dependencies(sent):
      return tf.add_n([chunks[rank]] + received)

  def all_gather_chunks(self, shard, lengths, group_assignment):
    shard = tf.convert_to_tensor(shard)
    replica_id, group = self._group(group_assignment)
    if self._nccl or len(group) == 1:
      return super().all_gather_chunks(shard, lengths, group_assignment)
    lengths = [int(n) for n in lengths]
    rank = group.index(replica_id)
    if len(lengths) != len(group) or min(lengths) < 1:
      raise ValueError(f"all_gather_chunks takes one non-zero length per member of "
                       f"the group ({len(group)}), got {lengths}")
    _check_chunks("all_gather_chunks", [shard], 1, length=lengths[rank])
    # One broadcast over the group from each member in turn, every member taking
    # the group's instance keys in rank order. A send hands its input on as its
    # output when nothing else holds it (it copies it first otherwise), so this
    # replica's piece is read from its send, and the shard is never copied here:
    # one send per peer, or a gather, would each copy it.
    pieces = []
    for member_rank, member in enumerate(group):
      params = self._broadcast_params(replica_id, group)
      if member == replica_id:
        pieces.append(tf.raw_ops.CollectiveBcastSendV2(input=shard, **params))
      else:
        pieces.append(tf.raw_ops.CollectiveBcastRecvV2(
            shape=[lengths[member_rank]], T=shard.dtype, **params))
    # A piece the caller leaves unread (all padding) must still be exchanged, or
    # its peers wait for it: every piece handed back depends on every broadcast.
    with tf.control_dependencies(pieces):
      return [tf.identity(piece) for piece in pieces]

  def _pair_params(self, replica_id, peer):
    """(send, receive) keys for one exchange each way between this replica and
    `peer`, over the pair's own group. Both members take the pair's two instance
    keys in the same order, the smaller replica id's send first."""
    pair = tuple(sorted((replica_id, peer)))
    first = self._broadcast_params(replica_id, pair)
    second = self._broadcast_params(replica_id, pair)
    return (first, second) if replica_id == pair[0] else (second, first)


def _check_chunks(method, chunks, count, length=None):
  """Raises unless `chunks` are `count` non-empty 1-D tensors of static length
  (`length`, where given) and one dtype."""
  if len(chunks) != count:
    raise ValueError(f"{method} takes one chunk per member of the group ({count}), "
                     f"got {len(chunks)}")
  if any(c.shape.rank != 1 or not c.shape.is_fully_defined() or c.shape[0] < 1
         or c.dtype != chunks[0].dtype
         or (length is not None and c.shape[0] != length) for c in chunks):
    raise ValueError(
        f"{method} takes non-empty 1-D chunks of static length"
        + ("" if length is None else f" {length}") + " and one dtype, got "
        + ", ".join(f"{c.shape} {c.dtype.name}" for c in chunks))


def _replica_device(context) -> str:
  """The device this replica runs on, as the strategy names it."""
  strategy = context.strategy
  devices = strategy.extended.worker_devices
  replica_id = int(tf.get_static_value(context.replica_id_in_sync_group))
  local_id = replica_id % len(devices)
  return devices[local_id]


def _on_gpus(strategy) -> bool:
  """Whether every replica of `strategy` runs on a GPU."""
  try:
    devices = strategy.extended.worker_devices
  except (RuntimeError, NotImplementedError):
    return False  # The default strategy: one replica, no collectives to tune.
  return bool(devices) and all(
      tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices)


def backend_for_strategy(strategy=None, *, timeout_seconds: float = 0.0,
                         chain: str = "gradients") -> CollectiveBackend:
  """The collective back end for `strategy` (default: the current one).

  `TPUStrategy` gets the TPU back end (XLA schedules its collectives); everything
  else the collective-ops back end, with NCCL when every replica is a GPU, ordering
  its collectives in `chain` (see `CollectiveOpsBackend`).
  Constructing a back end is cheap: all state (keys, tokens) is shared process-wide.
  """
  strategy = strategy or tf.distribute.get_strategy()
  if isinstance(strategy, (tf.distribute.TPUStrategy,
                           tf.distribute.experimental.TPUStrategy)):
    return TpuBackend()
  # GPU replicas: NCCL moves the bytes GPU to GPU; "auto" may pick the ring over the
  # host.
  return CollectiveOpsBackend(timeout_seconds=timeout_seconds,
                              communication_hint="nccl" if _on_gpus(strategy) else "auto",
                              chain=chain)
