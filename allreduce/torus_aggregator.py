"""The paper's 2-D torus gradient summation, as a tf_keras `gradient_aggregator`.

Ying et al. (2018), section 3.3: gradients are packed into a few large buffers, and
each buffer is summed in three phases on an X x Y grid of replicas:

1. reduce-scatter along x: each replica of a row ends up owning 1/X of the row's sum;
2. all-reduce of that shard along y: the shard now holds the sum over all replicas;
3. all-gather along x: every replica gets the whole summed buffer back.

Each phase moves at most 1/X of the buffer per link step, and the latency is about
2(X-1) + 2(Y-1) steps instead of a ring's 2(XY-1). Packing matters as much as the
phases: ResNet-50 has 161 gradient tensors, and one collective per tensor (times
three phases) would be dominated by per-op latency.

Precision: half-precision gradients (bfloat16, float16) are summed in float32, as the
paper keeps gradient sums in float32, and cast back to their own dtype at the end.
Other dtypes are summed in their own dtype, one set of packs per dtype.
"""

import bisect
import dataclasses
import itertools
from typing import Callable, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from allreduce import collectives
from allreduce.topology import TopologyError, TorusTopology, parse_grid

# A few packs, not one: a single pack of the whole gradient makes each collective
# allocate and walk buffers far beyond the cache, with nothing overlapping, and was
# several times slower than packs of a few MiB (docs/RESULTS.md, "Gradient pack
# size"). Packs of 16 MiB keep ResNet-50 to 7 packs (on 2x4, 28 collective ops per
# replica off NCCL, 21 under it), too few for per-op cost to show. The config's
# --allreduce_pack_mb default is this value.
DEFAULT_PACK_SIZE_BYTES = 16 * 1024 * 1024

_SUMMED_IN_FLOAT32 = (tf.bfloat16, tf.float16)


# Every tensor starts on a 64-byte boundary of its pack: TensorFlow's CPU kernels
# (Split, Unpack, Slice) then hand out views of the summed buffer instead of copies.
_ALIGN_BYTES = 64


@dataclasses.dataclass(frozen=True)
class Pack:
  """Which tensors share one flat buffer, and how it is laid out.

  Tensor `indices[i]` has `sizes[i]` elements and occupies a slot of `slots[i]`
  elements (its size rounded up to the alignment); the buffer is the slots in order
  followed by `padding` zeros. It is cut into one chunk per rank of a row, of
  `chunk_lengths` elements in rank order: equal chunks (the padding makes the length
  divide evenly), or chunks that end at slot boundaries, so that no tensor spans
  two (for a back end that exchanges uneven chunks).
  """
  dtype: tf.DType
  indices: Tuple[int, ...]
  sizes: Tuple[int, ...]
  slots: Tuple[int, ...]
  padding: int
  chunk_lengths: Tuple[int, ...]

  @property
  def length(self) -> int:
    return sum(self.slots) + self.padding

  def to_buffer(self, members) -> tf.Tensor:
    """The flat buffer holding `members` (the tensors of `indices`, in order)."""
    parts = []
    for tensor, size, slot in zip(members, self.sizes, self.slots):
      parts.append(tf.reshape(tf.cast(tensor, self.dtype), [-1]))
      if slot > size:
        parts.append(tf.zeros([slot - size], self.dtype))
    if self.padding:
      parts.append(tf.zeros([self.padding], self.dtype))
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)

  def window(self, members, start: int, length: int) -> tf.Tensor:
    """Elements `[start, start + length)` of `to_buffer(members)`, built from the
    members' own pieces (and zeros for the padding), not cut out of the whole buffer.
    """
    flat = [tf.reshape(tf.cast(tensor, self.dtype), [-1]) for tensor in members]
    stop = start + length
    parts, position, offset = [], start, 0
    for tensor, size, slot in zip(flat, self.sizes, self.slots):
      begin, end = max(start, offset), min(stop, offset + size)
      if begin < end:
        if begin > position:
          parts.append(tf.zeros([begin - position], self.dtype))
        parts.append(tensor if end - begin == size
                     else tensor[begin - offset:end - offset])
        position = end
      offset += slot
    if stop > position:
      parts.append(tf.zeros([stop - position], self.dtype))
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)

  def to_chunks(self, members) -> List[tf.Tensor]:
    """The flat buffer of `to_buffer` as its chunks (`chunk_lengths`), each built on
    its own (a back end can then send each one without cutting it out of a copy)."""
    if len(self.chunk_lengths) == 1:
      return [self.to_buffer(members)]
    starts = itertools.accumulate(self.chunk_lengths[:-1], initial=0)
    return [self.window(members, start, length)
            for start, length in zip(starts, self.chunk_lengths)]

  def from_chunks(self, chunks: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    """The members read back out of the buffer handed over as its `chunks`, flat,
    in the buffer's dtype: views of the chunks, but for a member that spans two
    (equal chunks only), which is concatenated from its parts."""
    if len(chunks) != len(self.chunk_lengths):
      raise ValueError(f"a pack of {len(self.chunk_lengths)} chunks, got "
                       f"{len(chunks)}")
    slot_starts = list(itertools.accumulate(self.slots, initial=0))
    parts = [[] for _ in self.indices]  # the padding after the last slot is dropped
    chunk_start = 0
    for chunk, length in zip(chunks, self.chunk_lengths):
      chunk_stop = chunk_start + length
      cuts = ([chunk_start]
              + [b for b in slot_starts if chunk_start < b < chunk_stop]
              + [chunk_stop])
      pieces = (tf.split(chunk, [b - a for a, b in zip(cuts, cuts[1:])])
                if len(cuts) > 2 else [chunk])
      for start, piece in zip(cuts, pieces):
        member = bisect.bisect_right(slot_starts, start) - 1
        if member < len(parts):
          parts[member].append(piece)
      chunk_start = chunk_stop
    members = []
    for member_parts, size in zip(parts, self.sizes):
      flat = (member_parts[0] if len(member_parts) == 1
              else tf.concat(member_parts, axis=0))
      members.append(flat if flat.shape[0] == size else flat[:size])
    return members

  def from_buffer(self, buffer: tf.Tensor) -> List[tf.Tensor]:
    """The members read back out of a flat `buffer`, flat, in the buffer's dtype."""
    slots = list(self.slots)
    slots[-1] += self.padding
    pieces = tf.split(buffer, slots) if len(slots) > 1 else [buffer]
    return [piece if slot == size else piece[:size]
            for piece, slot, size in zip(pieces, slots, self.sizes)]


def communication_dtype(dtype: tf.DType) -> tf.DType:
  """The dtype a gradient of `dtype` is summed in."""
  return tf.float32 if dtype in _SUMMED_IN_FLOAT32 else dtype


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def whole_tensor_chunk_lengths(slots: Sequence[int],
                               num_chunks: int) -> Optional[Tuple[int, ...]]:
  """`num_chunks` non-empty runs of whole slots, each ending at the slot boundary
  nearest its equal share of the buffer; None for fewer slots than chunks.

  The runs may differ in length (lumpy tensors: ResNet-50 has 9 MiB kernels in
  16 MiB packs). On one host that costs nothing, the work of every phase being
  proportional to the bytes whoever does it; across hosts the longest run sets the
  pace of its row.
  """
  if len(slots) < num_chunks:
    return None
  offsets = list(itertools.accumulate(slots, initial=0))
  bounds = [0]
  for k in range(1, num_chunks):
    target = k * offsets[-1] / num_chunks
    # Leave at least one slot for each run still to come.
    candidates = range(bounds[-1] + 1, len(slots) - (num_chunks - k) + 1)
    bounds.append(min(candidates, key=lambda i: abs(offsets[i] - target)))
  bounds.append(len(slots))
  return tuple(offsets[b] - offsets[a] for a, b in zip(bounds, bounds[1:]))


def plan_packs(sizes: Sequence[int], dtypes: Sequence[tf.DType],
               pack_size_bytes: int, num_shards: int,
               order: Optional[Sequence[int]] = None,
               whole_tensor_chunks: bool = False) -> List[Pack]:
  """Greedily fills packs of at most `pack_size_bytes`, in `order`, per dtype.

  `order` lists the tensor indices in the order they fill packs (default: list
  order); the packs come out in the order they were filled.

  A tensor larger than the cap gets a pack of its own (tensors are never split: the
  buffer would then need a second copy). Each pack is cut into `num_shards` chunks
  (the row size of the reduce-scatter): with `whole_tensor_chunks`, runs of whole
  tensors (`whole_tensor_chunk_lengths`), where the pack has a tensor per chunk;
  otherwise equal chunks, the pack's length padded to a multiple of `num_shards`
  times the alignment, so that every chunk is aligned too.
  """
  if pack_size_bytes < 1:
    raise ValueError(f"pack_size_bytes must be positive, got {pack_size_bytes}")
  packs = []
  open_packs = {}  # dtype -> (indices, sizes, bytes)

  def close(dtype):
    indices, pack_sizes, _ = open_packs.pop(dtype)
    align = max(1, _ALIGN_BYTES // dtype.size)
    slots = tuple(_round_up(max(size, 1), align) for size in pack_sizes)
    chunk_lengths = (whole_tensor_chunk_lengths(slots, num_shards)
                     if whole_tensor_chunks else None)
    padding = 0
    if chunk_lengths is None:
      padding = _round_up(sum(slots), align * num_shards) - sum(slots)
      chunk_lengths = ((sum(slots) + padding) // num_shards,) * num_shards
    packs.append(Pack(dtype, tuple(indices), tuple(pack_sizes), slots, padding,
                      chunk_lengths))

  for index in (range(len(sizes)) if order is None else order):
    size, dtype = sizes[index], dtypes[index]
    nbytes = size * dtype.size
    if dtype in open_packs and open_packs[dtype][2] + nbytes > pack_size_bytes:
      close(dtype)
    indices, pack_sizes, used = open_packs.setdefault(dtype, ([], [], 0))
    open_packs[dtype] = (indices + [index], pack_sizes + [size], used + nbytes)
  for dtype in list(open_packs):
    close(dtype)
  return packs


def backprop_order(count: int) -> range:
  """Indices of `count` gradients (in variable order) in the order backprop makes
  them: the last layer's first. Packs filled in this order can be summed while
  earlier layers still back-propagate (TensorFlow's CollectiveAllReduce reverses
  its list for the same reason)."""
  return range(count - 1, -1, -1)


def _as_grid(grid) -> TorusTopology:
  if isinstance(grid, TorusTopology):
    return grid
  if isinstance(grid, str):
    return TorusTopology(*parse_grid(grid))
  x_size, y_size = grid
  return TorusTopology(int(x_size), int(y_size))


class TorusGradientAggregator:
  """Sums gradients over all replicas with the three-phase torus all-reduce.

  Call it in replica context with a list of `(gradient, variable)` pairs; it returns
  the list with every gradient replaced by its sum over replicas (or mean, with
  `average=True`). `None` gradients pass through. `IndexedSlices` are densified
  first (ResNet has none; a sparse path would not pay for itself here).

  The collective back end (`backend`) is either given, or a `tf.distribute.Strategy`
  to derive it from, or None: then it is taken from the strategy current at call time
  (`backend_for_strategy(tf.distribute.get_strategy())`), which is what an optimizer
  built inside `strategy.scope()` wants.
  """

  def __init__(self, grid: TorusTopology,
               backend: Union[None, collectives.CollectiveBackend,
                              tf.distribute.Strategy] = None,
               pack_size_bytes: int = DEFAULT_PACK_SIZE_BYTES,
               average: bool = False,
               timeout_seconds: float = 0.0):
    if pack_size_bytes < 1:
      raise ValueError(f"pack_size_bytes must be positive, got {pack_size_bytes}")
    self.grid = grid
    self.pack_size_bytes = int(pack_size_bytes)
    self.average = average
    self._backend = backend
    self._timeout_seconds = timeout_seconds

  def _resolve_backend(self) -> collectives.CollectiveBackend:
    if isinstance(self._backend, collectives.CollectiveBackend):
      return self._backend
    return collectives.backend_for_strategy(self._backend,
                                            timeout_seconds=self._timeout_seconds)

  def _check_replicas(self):
    context = tf.distribute.get_replica_context()
    if context is None:
      raise RuntimeError("the torus aggregator runs in replica context (inside "
                         "strategy.run or an optimizer's apply_gradients)")
    if context.num_replicas_in_sync != self.grid.num_replicas:
      raise TopologyError(
          f"torus shape {self.grid} holds {self.grid.num_replicas} replicas "
          f"but the strategy has {context.num_replicas_in_sync}; pass a torus_shape "
          f"whose product is {context.num_replicas_in_sync}")

  def __call__(self, grads_and_vars):
    grads_and_vars = list(grads_and_vars)
    summed = self.all_reduce([g for g, _ in grads_and_vars])
    return [(g, v) for g, (_, v) in zip(summed, grads_and_vars)]

  def plan(self, shapes_and_dtypes, uneven_chunks: bool = False) -> List[Pack]:
    """The packs, in issue order, for tensors of these (shape, dtype)s, cut into
    runs of whole tensors where `uneven_chunks` (the back end's
    `exchanges_uneven_chunks`)."""
    return plan_packs([tf.TensorShape(shape).num_elements()
                       for shape, _ in shapes_and_dtypes],
                      [communication_dtype(dtype) for _, dtype in shapes_and_dtypes],
                      self.pack_size_bytes, num_shards=self.grid.x_size,
                      order=backprop_order(len(shapes_and_dtypes)),
                      whole_tensor_chunks=uneven_chunks)

  def all_reduce(self, tensors: Sequence[Optional[tf.Tensor]]
                 ) -> List[Optional[tf.Tensor]]:
    """The sum (or mean) over replicas of each tensor; `None` stays `None`."""
    self._check_replicas()
    backend = self._resolve_backend()
    results: List[Optional[tf.Tensor]] = [None] * len(tensors)
    present = [i for i, t in enumerate(tensors) if t is not None]
    if not present:
      return results
    dense = [tf.convert_to_tensor(tensors[i]) for i in present]
    for t in dense:
      if not t.shape.is_fully_defined():
        raise ValueError(f"the torus aggregator needs static shapes, got {t.shape}")
    uneven = backend.exchanges_uneven_chunks
    packs = self.plan([(t.shape, t.dtype) for t in dense], uneven_chunks=uneven)
    rows = self.grid.row_groups()
    columns = self.grid.column_groups()

    # Phases are issued breadth-first over the packs; each back end orders a group's
    # collectives of one kind in issue order, so pack k+1's reduce-scatter is on the
    # wire while pack k's received chunks are being summed, and pack k's all-gather
    # can start once its column all-reduce is done (all-gathers have a chain of
    # their own, or are broadcasts, see collectives.CollectiveOpsBackend). Each
    # pack is built as its x chunks, which the collective-ops back end sends
    # without a further copy; where chunks may be uneven they hold whole tensors,
    # and the gathered chunks are read out as they arrive, without a gather's copy
    # into one buffer.
    chunks = [pack.to_chunks([dense[i] for i in pack.indices]) for pack in packs]
    shards = [backend.reduce_scatter_chunks(c, rows) for c in chunks]
    shards = [backend.all_reduce_sum(s, columns) for s in shards]
    if self.average:
      # Dividing the shard, not the full buffer, touches 1/X of the data.
      shards = [s / tf.cast(self.grid.num_replicas, s.dtype) for s in shards]
    if uneven:
      members = [pack.from_chunks(backend.all_gather_chunks(s, pack.chunk_lengths,
                                                            rows))
                 for pack, s in zip(packs, shards)]
    else:
      members = [pack.from_buffer(backend.all_gather(s, rows))
                 for pack, s in zip(packs, shards)]
    for pack, pieces in zip(packs, members):
      for index, piece in zip(pack.indices, pieces):
        original = dense[index]
        results[present[index]] = tf.cast(
            tf.reshape(piece, original.shape), original.dtype)
    return results


def make_torus_aggregator(grid, *, backend=None,
                          pack_size_bytes: int = DEFAULT_PACK_SIZE_BYTES,
                          average: bool = False,
                          timeout_seconds: float = 0.0) -> TorusGradientAggregator:
  """A `gradient_aggregator=` for tf_keras optimizers that sums on a 2-D torus.

  Args:
    grid: a `TorusTopology` (for a grid that follows physical chip coordinates),
      an `(x, y)` shape or a string like "2x4". Its replica count must equal the
      strategy's; that is checked when the aggregator first runs, in replica context.
    backend: a `CollectiveBackend`, a `tf.distribute.Strategy`, or None for the
      strategy current when the aggregator is called.
    pack_size_bytes: cap on one flat buffer, counted in the summation dtype.
    average: divide the sums by the replica count. Keras losses are already scaled by
      1 / global batch, so training wants the sum (the default).
    timeout_seconds: bound on each collective wait for the collective-ops back end
      (0: wait forever). A timeout fails the step instead of hanging it.

  Passed as `gradient_aggregator=`, it replaces the optimizer's own cross-replica
  sum: tf_keras' `OptimizerV2.apply_gradients` calls it instead of
  `all_reduce_sum_gradients`, and `_distributed_apply` applies each replica's
  (already summed) gradient without reducing again.
  """
  return TorusGradientAggregator(_as_grid(grid), backend=backend,
                                 pack_size_bytes=pack_size_bytes, average=average,
                                 timeout_seconds=timeout_seconds)


def make_packed_strategy_aggregator(
    pack_size_bytes: int = DEFAULT_PACK_SIZE_BYTES) -> Callable:
  """A `gradient_aggregator=` that sums with the strategy's own all-reduce, packed.

  tf_keras' default aggregator calls the strategy's all-reduce without options: one
  pack per dtype. This one asks it to pack into buffers of at most `pack_size_bytes`
  (`CommunicationOptions(bytes_per_pack=)`), as the torus does: the strongest
  strategy baseline, and what `--allreduce=strategy` uses.
  """
  if pack_size_bytes < 1:
    raise ValueError(f"pack_size_bytes must be positive, got {pack_size_bytes}")
  options = tf.distribute.experimental.CommunicationOptions(
      bytes_per_pack=pack_size_bytes)

  def aggregate(grads_and_vars):
    grads_and_vars = list(grads_and_vars)
    result = [(None, v) for _, v in grads_and_vars]
    by_dtype = {}  # TF packs only tensors of one dtype together
    for i, (g, _) in enumerate(grads_and_vars):
      if g is not None:
        by_dtype.setdefault(tf.as_dtype(g.dtype), []).append(i)
    for indices in by_dtype.values():
      summed = tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, [grads_and_vars[i][0] for i in indices],
          options=options)
      for i, g in zip(indices, summed):
        result[i] = (g, grads_and_vars[i][1])
    return result
  return aggregate
