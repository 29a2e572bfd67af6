"""Weight-update sharding: each replica updates only its shard of the weights.

After the torus reduce-scatter along x and all-reduce along y (Ying et al., 2018,
section 3.3) every replica holds 1/x of the summed gradients, and then all-gathers the
other (x-1)/x just to run the same optimizer arithmetic as its neighbours on the same
numbers. Kumar et al. (2019, MLPerf v0.6 on TPU pods) and Xu et al. (2020) apply the
optimizer to the shard instead and all-gather the updated *weights*: the same bytes on
the wire, but the optimizer's compute and its slot memory shrink by the shard count.

Two layouts (`WeightUpdateSharding.shards`):

* "x": reduce-scatter along x, all-reduce the shard along y, update 1/x of every pack,
  all-gather the weights along x. The y replicas of a column update the same shard.
* "xy": reduce-scatter along y as well, update 1/(x*y), all-gather along y then x. No
  update is computed twice, and the y phase moves half the bytes of an all-reduce.

LARS needs each layer's weight and gradient norm, and a shard may hold part of a layer
or several layers: each replica sums the squares of its parts, and one all-reduce of
all layers' partial sums (packed into one small vector) over the replicas whose shards
tile the pack (its row for "x", everyone for "xy") completes them. The same vector
carries a count of non-finite gradient elements, so skipping a step whose gradients
overflowed (the loss-scale optimizer's rule) costs no collective of its own.

Checkpoints. The optimizers here are tf_keras `SGD` and Model Garden `LARS`
subclasses, and keep those optimizers' full-size "momentum" slot per variable as a
*checkpoint view*: the sharded momentum lives in one flat buffer per pack per replica,
is all-gathered into the views by `gather_slots_for_checkpoint()` just before a save,
and is cut back out of them by `shard_slots_after_restore()` just after a restore. A
checkpoint therefore has exactly the layout of the unsharded optimizer's, and restores
across sharded and unsharded runs and across grids.
"""

import dataclasses
import functools
from typing import List, Optional, Sequence, Tuple, Union

import tensorflow as tf
import tf_keras
from official.modeling.optimization import lars
from tf_keras.src.mixed_precision import loss_scale_optimizer

from allreduce import collectives
from allreduce.topology import TopologyError, TorusTopology
from allreduce.torus_aggregator import (DEFAULT_PACK_SIZE_BYTES, Pack,
                                        backprop_order, plan_packs)
from training.weight_decay import EXCLUDED_FROM_DECAY

SHARD_LAYOUTS = ("x", "xy")

# Weights, gradients and slots are updated in float32 whatever the compute dtype: under
# tf_keras mixed precision the variables are float32 already (master weights), and
# half-precision gradients are summed in float32 as the torus aggregator sums them.
_UPDATE_DTYPE = tf.float32


@dataclasses.dataclass(frozen=True)
class WeightUpdateSharding:
  """Where each replica's shard of the weight update lies, and how it is summed.

  grid: the replica torus (its rows are the x rings, its columns the y rings).
  shards: "x" (each replica updates 1/x) or "xy" (1/(x*y)).
  pack_size_bytes: cap on one flat buffer (as for the torus aggregator).
  skip_non_finite: make a step whose summed gradients hold an inf or NaN a no-op
    (the step counter still advances), as `LossScaleOptimizer` does.
  timeout_seconds: bound on every collective wait (0 waits forever).
  """
  grid: TorusTopology
  shards: str = "x"
  pack_size_bytes: int = DEFAULT_PACK_SIZE_BYTES
  skip_non_finite: bool = False
  timeout_seconds: float = 0.0

  def __post_init__(self):
    if self.shards not in SHARD_LAYOUTS:
      raise ValueError(f"shards must be one of {SHARD_LAYOUTS}, got {self.shards!r}")
    if self.pack_size_bytes < 1:
      raise ValueError(
          f"pack_size_bytes must be positive, got {self.pack_size_bytes}")

  @property
  def num_shards(self) -> int:
    """How many pieces every pack is cut into."""
    if self.shards == "x":
      return self.grid.x_size
    return self.grid.num_replicas

  def shard_index(self, replica_id: int) -> int:
    """Which piece of every pack `replica_id` updates.

    The row reduce-scatter gives the replica of rank x (its x coordinate) chunk x of
    the pack; the column reduce-scatter ("xy") gives the replica of rank y sub-chunk y
    of that.
    """
    x, y = self.grid.coordinates(replica_id)
    return x if self.shards == "x" else x * self.grid.y_size + y

  def norm_groups(self) -> List[List[int]]:
    """The replicas whose shards tile every pack: who completes a per-layer sum."""
    if self.shards == "x":
      return self.grid.row_groups()
    return [list(range(self.grid.num_replicas))]


@dataclasses.dataclass(frozen=True)
class PackShard:
  """One replica's piece `[start, start + length)` of one pack.

  `start` is a multiple of `length`: a Python int where the replica id is known while
  tracing (MirroredStrategy), else a scalar int32 tensor (TPU).
  """
  pack: Pack
  start: Union[int, tf.Tensor]
  length: int

  def _slot_starts(self) -> List[int]:
    starts, position = [], 0
    for slot in self.pack.slots:
      starts.append(position)
      position += slot
    return starts

  def _static_pieces(self) -> List[Tuple[int, int, Optional[int]]]:
    """`(begin, end, i)` in pack coordinates covering the shard in order; `i` is the
    pack member whose data it is, None for alignment or tail padding (zeros)."""
    pieces = []
    end_of_shard = self.start + self.length
    regions = []
    for i, (begin, size, slot) in enumerate(
        zip(self._slot_starts(), self.pack.sizes, self.pack.slots)):
      regions.append((begin, begin + size, i))
      regions.append((begin + size, begin + slot, None))
    regions.append((sum(self.pack.slots), self.pack.length, None))
    for begin, end, member in regions:
      begin, end = max(begin, self.start), min(end, end_of_shard)
      if begin < end:
        pieces.append((begin, end, member))
    return pieces

  def cut(self, tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """This shard of the pack that `tensors` (the pack members, in pack order) form,
    in float32."""
    if not isinstance(self.start, int):
      # The shard is known only at run time: build the whole buffer and take its row
      # of shards. A gather, not `tf.slice`: XLA needs a slice's begin while
      # compiling (tf2xla folds it to a constant, which a TPU replica id is not),
      # while a gather's index may be a run-time value.
      rows = tf.reshape(self.pack.to_buffer(tensors), [-1, self.length])
      return tf.gather(rows, self.start // self.length)
    # Known while tracing: copy only the pieces that fall in the shard (the pack's
    # dtype is float32, `_UPDATE_DTYPE`: see `_create_slots`).
    return self.pack.window(tensors, self.start, self.length)

  @functools.cached_property
  def member_ids(self) -> tf.Tensor:
    """int32 `[length]`: the pack member each element belongs to (its alignment
    padding included); `len(pack.indices)` for the pack's tail padding. Sorted."""
    if isinstance(self.start, int):
      pieces = self._static_pieces()
      ids = [self._member_at(begin) for begin, _, _ in pieces]
      return tf.repeat(tf.constant(ids, tf.int32),
                       tf.constant([e - b for b, e, _ in pieces], tf.int32))
    slot_ends = tf.constant(
        [s + slot for s, slot in zip(self._slot_starts(), self.pack.slots)], tf.int32)
    positions = self.start + tf.range(self.length, dtype=tf.int32)
    return tf.searchsorted(slot_ends, positions, side="right", out_type=tf.int32)

  @functools.cached_property
  def _runs(self) -> List[Tuple[int, int]]:
    """Static shards: `(length, member)` runs covering the shard in order, member as
    in `member_ids` (alignment padding counts as its member's)."""
    runs = []
    for begin, end, _ in self._static_pieces():
      member = self._member_at(begin)
      if runs and runs[-1][1] == member:
        runs[-1] = (runs[-1][0] + end - begin, member)
      else:
        runs.append((end - begin, member))
    return runs

  def member_sums(self, values: tf.Tensor) -> tf.Tensor:
    """float32 `[members + 1]`: the sum of `values` (shard-shaped) over each member's
    elements, the tail padding's last."""
    segments = len(self.pack.indices) + 1
    if not isinstance(self.start, int):
      return tf.math.unsorted_segment_sum(values, self.member_ids, segments)
    # Static: slices and plain sums, several times faster on CPU than a segment sum
    # over per-element ids.
    lengths = [length for length, _ in self._runs]
    pieces = tf.split(values, lengths) if len(lengths) > 1 else [values]
    sums = [tf.zeros([], values.dtype)] * segments
    for piece, (_, member) in zip(pieces, self._runs):
      sums[member] = sums[member] + tf.reduce_sum(piece)
    return tf.stack(sums)

  def scale(self, values: tf.Tensor, per_member: tf.Tensor) -> tf.Tensor:
    """`values` (shard-shaped) times `per_member[m]` on each element of member m
    (`per_member` has `members + 1` entries, the tail padding's last)."""
    if not isinstance(self.start, int):
      return values * tf.gather(per_member, self.member_ids)
    # Static: one multiply per run and a concat instead of a per-element gather.
    lengths = [length for length, _ in self._runs]
    if len(lengths) == 1:
      return values * per_member[self._runs[0][1]]
    pieces = tf.split(values, lengths)
    return tf.concat([piece * per_member[member]
                      for piece, (_, member) in zip(pieces, self._runs)], axis=0)

  def _member_at(self, position: int) -> int:
    for i, (begin, slot) in enumerate(zip(self._slot_starts(), self.pack.slots)):
      if begin <= position < begin + slot:
        return i
    return len(self.pack.indices)


class ShardedUpdate:
  """The sharded `apply_gradients` of a momentum optimizer (a tf_keras OptimizerV2).

  The optimizer's own rule comes from `_shard_statistics` (per-layer partial sums the
  rule needs completed over the shard group) and `_shard_step` (the update of one
  shard), implemented by the subclasses below.
  """

  def __init__(self, *args, sharding: WeightUpdateSharding,
               backend: Optional[collectives.CollectiveBackend] = None, **kwargs):
    if "gradient_aggregator" in kwargs:
      raise ValueError("a sharded weight update sums the gradients itself; it takes "
                       "no gradient_aggregator")
    super().__init__(*args, **kwargs)
    self.sharding = sharding
    self._backend = backend
    self._packs: Optional[List[Pack]] = None
    self._planned_variables: Tuple = ()
    self._momentum_shards: List[tf.Variable] = []
    self._strategy = None
    self._replica_functions = {}  # replica-context method -> its traced strategy.run

  # ------------------------------------------------------------------ state

  @property
  def uses_momentum(self) -> bool:
    raise NotImplementedError

  def _create_slots(self, var_list):
    super()._create_slots(var_list)  # the full-size checkpoint views
    if self._packs is not None:
      return
    for variable in var_list:
      if variable.dtype.base_dtype != _UPDATE_DTYPE:
        raise ValueError(f"the sharded update keeps float32 weights; {variable.name} "
                         f"is {variable.dtype.name}")
      if not variable.shape.is_fully_defined():
        raise ValueError(f"{variable.name} has no static shape ({variable.shape})")
    self._strategy = tf.distribute.get_strategy()
    self._planned_variables = tuple(var_list)
    # Filled from the last layer, as the torus aggregator's: the first pack's
    # reduce-scatter starts while earlier layers still back-propagate (a row's
    # reduce-scatters run in issue order, so a first pack holding the first layers
    # would hold every pack back until backprop had finished).
    self._packs = plan_packs([v.shape.num_elements() for v in var_list],
                             [_UPDATE_DTYPE] * len(var_list),
                             self.sharding.pack_size_bytes,
                             num_shards=self.sharding.num_shards,
                             order=backprop_order(len(var_list)))
    if self.uses_momentum:
      # Per replica, not mirrored: every replica's shard differs. Not tracked by the
      # checkpoint (the full-size views are).
      for i, pack in enumerate(self._packs):
        self._momentum_shards.append(tf.Variable(
            tf.zeros([pack.length // self.sharding.num_shards], _UPDATE_DTYPE),
            trainable=False, name=f"momentum_shard_{i}",
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.NONE))

  def slot_bytes_per_replica(self) -> dict:
    """Bytes of optimizer slots one replica holds: the working shards, and the
    full-size checkpoint views (written only around saves and restores)."""
    views = sum(self.get_slot(v, name).shape.num_elements() * 4
                for v in self._planned_variables for name in self.get_slot_names())
    shards = sum(s.shape.num_elements() * 4 for s in self._momentum_shards)
    return dict(shards=shards, checkpoint_views=views)

  def _resolve_backend(self) -> collectives.CollectiveBackend:
    if self._backend is not None:
      return self._backend
    return collectives.backend_for_strategy(
        timeout_seconds=self.sharding.timeout_seconds)

  def _pack_shards(self) -> List[PackShard]:
    """This replica's shard of every pack (replica context)."""
    context = tf.distribute.get_replica_context()
    replica_id = tf.get_static_value(context.replica_id_in_sync_group)
    if replica_id is not None:
      index = self.sharding.shard_index(int(replica_id))
    else:
      table = [self.sharding.shard_index(r)
               for r in range(self.sharding.grid.num_replicas)]
      index = tf.gather(tf.constant(table, tf.int32),
                        context.replica_id_in_sync_group)
    shards = []
    for pack in self._packs:
      length = pack.length // self.sharding.num_shards
      shards.append(PackShard(pack, index * length, length))
    return shards

  def _members(self, pack: Pack, values):
    return [values[i] for i in pack.indices]

  # ------------------------------------------------------------- collectives

  def _sum_into_shards(self, backend, buffers):
    rows = self.sharding.grid.row_groups()
    columns = self.sharding.grid.column_groups()
    # Breadth-first over the packs, as the torus aggregator issues them.
    shards = [backend.reduce_scatter_sum(b, rows) for b in buffers]
    if self.sharding.shards == "xy":
      return [backend.reduce_scatter_sum(s, columns) for s in shards]
    return [backend.all_reduce_sum(s, columns) for s in shards]

  def _gather_shards(self, backend, shards):
    if self.sharding.shards == "xy":
      columns = self.sharding.grid.column_groups()
      shards = [backend.all_gather(s, columns) for s in shards]
    rows = self.sharding.grid.row_groups()
    return [backend.all_gather(s, rows) for s in shards]

  def _unpack_all(self, buffers) -> List[tf.Tensor]:
    values = [None] * len(self._planned_variables)
    for pack, buffer in zip(self._packs, buffers):
      for i, value in zip(pack.indices, pack.from_buffer(buffer)):
        values[i] = tf.reshape(value, self._planned_variables[i].shape)
    return values

  def _write_replica_copies(self, variables, values, then_count_step):
    """Writes every replica's own `values[i]` into its copy of `variables[i]`.

    From replica context a mirrored variable cannot be assigned a per-replica value
    directly; the merge call hands all replicas' values to one cross-replica
    function, which updates each copy with its own (as `OptimizerV2` applies
    gradients).
    """
    def write(strategy, values):
      updates = []
      for variable, value in zip(variables, values):
        updates.extend(strategy.extended.update(
            variable, lambda v, x: v.assign(x, read_value=False),
            args=(value,), group=False))
      if not then_count_step:
        return tf.group(updates)
      with tf.control_dependencies(updates):
        return self.iterations.assign_add(1, read_value=False)
    return tf.distribute.get_replica_context().merge_call(write, args=(values,))

  # ----------------------------------------------------------------- update

  def apply_gradients(self, grads_and_vars, name=None,
                      experimental_aggregate_gradients=True):
    """Sums the gradients, updates this replica's shard, all-gathers the weights.

    Called in replica context with every replica's own (unsummed) gradients, like
    `OptimizerV2.apply_gradients`; returns the op that advances the step counter.
    """
    del name
    if not experimental_aggregate_gradients:
      raise ValueError("a sharded weight update needs the unsummed gradients "
                       "(experimental_aggregate_gradients=True)")
    if tf.distribute.in_cross_replica_context():
      raise RuntimeError("apply_gradients runs in replica context")
    grads_and_vars = list(grads_and_vars)
    variables = [v for _, v in grads_and_vars]
    if any(g is None for g, _ in grads_and_vars):
      missing = [v.name for g, v in grads_and_vars if g is None]
      raise ValueError(f"the sharded update needs a gradient for every variable; "
                       f"none for {missing}")
    num_replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    if num_replicas != self.sharding.grid.num_replicas:
      raise TopologyError(
          f"torus shape {self.sharding.grid} holds {self.sharding.grid.num_replicas} "
          f"replicas but the strategy has {num_replicas}")
    with tf.init_scope():
      self._create_all_weights(variables)
    if [id(v) for v in variables] != [id(v) for v in self._planned_variables]:
      raise ValueError("apply_gradients got other variables than the ones its slots "
                       "were planned for; pass the same list, in the same order")
    gradients = [tf.convert_to_tensor(g) for g, _ in grads_and_vars]
    backend = self._resolve_backend()
    pack_shards = self._pack_shards()

    with tf.name_scope("sharded_update"):
      buffers = [p.to_buffer(self._members(p, gradients)) for p in self._packs]
      gradient_shards = self._sum_into_shards(backend, buffers)
      weight_shards = [s.cut(self._members(s.pack, variables)) for s in pack_shards]
      momentum_shards = [tf.convert_to_tensor(m) for m in self._momentum_shards]
      learning_rate = self._decayed_lr(_UPDATE_DTYPE)

      gradient_shards, partial_sums = self._shard_statistics(
          pack_shards, weight_shards, gradient_shards)
      sums, all_finite = self._complete_sums(backend, partial_sums, gradient_shards)
      new_weights, new_momentum = self._shard_step(
          pack_shards, weight_shards, gradient_shards, momentum_shards,
          learning_rate, sums)
      if all_finite is not None:
        new_weights = [tf.where(all_finite, n, w)
                       for n, w in zip(new_weights, weight_shards)]
        new_momentum = [tf.where(all_finite, n, m)
                        for n, m in zip(new_momentum, momentum_shards)]
      slot_writes = [m.assign(n, read_value=False)
                     for m, n in zip(self._momentum_shards, new_momentum)]
      with tf.control_dependencies(slot_writes):
        gathered = self._gather_shards(backend, new_weights)
      values = self._unpack_all(gathered)
      return self._write_replica_copies(variables, values, then_count_step=True)

  def _complete_sums(self, backend, partial_sums, gradient_shards):
    """Sums `partial_sums` over the replicas whose shards tile the packs, and with
    them a count of non-finite gradient elements; returns (sums, all finite or
    None)."""
    parts = [] if partial_sums is None else [partial_sums]
    if self.sharding.skip_non_finite:
      nonfinite = tf.add_n([
          tf.reduce_sum(tf.cast(~tf.math.is_finite(g), _UPDATE_DTYPE))
          for g in gradient_shards])
      parts.append(tf.reshape(nonfinite, [1]))
    if not parts:
      return None, None
    summed = backend.all_reduce_sum(tf.concat(parts, axis=0),
                                    self.sharding.norm_groups())
    if not self.sharding.skip_non_finite:
      return summed, None
    return summed[:-1], tf.equal(summed[-1], 0.0)

  def _shard_statistics(self, pack_shards, weights, gradients):
    """(gradients to step with, per-layer partial sums to complete, or None)."""
    del pack_shards, weights
    return gradients, None

  def _shard_step(self, pack_shards, weights, gradients, momentum, learning_rate,
                  sums):
    """(new weight shards, new momentum shards)."""
    raise NotImplementedError

  # ------------------------------------------------------------ checkpoints

  def gather_slots_for_checkpoint(self):
    """Fills the full-size "momentum" slots from the shards; call before a save.

    Cross-replica context (where the trainer saves). One all-gather per pack.
    """
    self._run_in_every_replica(self._gather_slots_in_replica)

  def _gather_slots_in_replica(self):
    backend = self._resolve_backend()
    gathered = self._gather_shards(
        backend, [tf.convert_to_tensor(m) for m in self._momentum_shards])
    views = [self.get_slot(v, "momentum") for v in self._planned_variables]
    self._write_replica_copies(views, self._unpack_all(gathered),
                               then_count_step=False)

  def shard_slots_after_restore(self):
    """Cuts each replica's shard out of the full-size "momentum" slots; call after
    a restore (and it does no harm after initialization). No collectives."""
    self._run_in_every_replica(self._shard_slots_in_replica)

  def _run_in_every_replica(self, replica_fn):
    """Runs `replica_fn` on every replica in one traced call (no-op without slots)."""
    if not self._momentum_shards:
      return
    key = replica_fn.__name__
    if key not in self._replica_functions:
      self._replica_functions[key] = tf.function(
          lambda: self._strategy.run(replica_fn))
    self._replica_functions[key]()

  def _shard_slots_in_replica(self):
    views = [self.get_slot(v, "momentum") for v in self._planned_variables]
    for buffer, shard in zip(self._momentum_shards, self._pack_shards()):
      buffer.assign(shard.cut(self._members(shard.pack, views)), read_value=False)


class ShardedSGD(ShardedUpdate, tf_keras.optimizers.legacy.SGD):
  """tf_keras legacy SGD (Keras momentum: v = m v - lr g; w += v, or Nesterov
  w += m v - lr g), applied shard by shard. Same slots and checkpoint as `SGD`."""

  @property
  def uses_momentum(self) -> bool:
    return bool(self._momentum)

  def _shard_step(self, pack_shards, weights, gradients, momentum, learning_rate,
                  sums):
    del pack_shards, sums
    if not self._momentum:
      return [w - learning_rate * g for w, g in zip(weights, gradients)], []
    coefficient = tf.cast(self._get_hyper("momentum", _UPDATE_DTYPE), _UPDATE_DTYPE)
    new_weights, new_momentum = [], []
    for w, g, v in zip(weights, gradients, momentum):
      v = coefficient * v - learning_rate * g
      new_momentum.append(v)
      if self.nesterov:
        new_weights.append(w + coefficient * v - learning_rate * g)
      else:
        new_weights.append(w + v)
    return new_weights, new_momentum


class ShardedLARS(ShardedUpdate, lars.LARS):
  """Model Garden LARS (classic momentum) applied shard by shard.

  Per layer, as `LARS._resource_apply_dense`: g' = g + wd w where decayed; trust
  ratio eeta ||w|| / ||g'|| where adapted (1 where either norm is 0); v = m v +
  lr trust g'; w -= v (Nesterov: w -= m v + lr trust g'). Same slots and checkpoint
  as `LARS`.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    if not self.classic_momentum:
      raise NotImplementedError("the sharded LARS implements classic momentum only")

  @property
  def uses_momentum(self) -> bool:
    return True

  def _layer_flags(self, pack: Pack, flag) -> tf.Tensor:
    """float32 `[members + 1]`: `flag(name)` per pack member, 0 for the padding."""
    names = [self._planned_variables[i].name for i in pack.indices]
    return tf.constant([float(flag(n)) for n in names] + [0.0], _UPDATE_DTYPE)

  def _shard_statistics(self, pack_shards, weights, gradients):
    decayed_gradients, weight_squares, gradient_squares = [], [], []
    for shard, w, g in zip(pack_shards, weights, gradients):
      if self.weight_decay_rate:
        decay = self._layer_flags(shard.pack, self._use_weight_decay)
        g = g + self.weight_decay_rate * shard.scale(w, decay)
      decayed_gradients.append(g)
      # One sum per member and one for the tail padding, dropped: a shard may hold
      # no element of some members, whose partial sums are then 0.
      layers = len(shard.pack.indices)
      weight_squares.append(shard.member_sums(w * w)[:layers])
      gradient_squares.append(shard.member_sums(g * g)[:layers])
    # Weight squares of every layer, then gradient squares: one vector, one
    # collective for all layers of all packs.
    return decayed_gradients, tf.concat(weight_squares + gradient_squares, axis=0)

  def _shard_step(self, pack_shards, weights, gradients, momentum, learning_rate,
                  sums):
    num_layers = sum(len(s.pack.indices) for s in pack_shards)
    weight_norms = tf.sqrt(sums[:num_layers])
    gradient_norms = tf.sqrt(sums[num_layers:2 * num_layers])
    trust = tf.where(
        weight_norms > 0,
        tf.where(gradient_norms > 0,
                 self.eeta * weight_norms / tf.where(gradient_norms > 0,
                                                     gradient_norms, 1.0),
                 1.0),
        1.0)
    new_weights, new_momentum = [], []
    first_layer = 0
    for shard, w, g, v in zip(pack_shards, weights, gradients, momentum):
      layers = len(shard.pack.indices)
      adapted = self._layer_flags(shard.pack, self._do_layer_adaptation)
      pack_trust = tf.concat([trust[first_layer:first_layer + layers], [1.0]], 0)
      first_layer += layers
      pack_trust = adapted * pack_trust + (1.0 - adapted)
      step = shard.scale(g, learning_rate * pack_trust)
      v = self.momentum * v + step
      new_momentum.append(v)
      if self.nesterov:
        new_weights.append(w - (self.momentum * v + step))
      else:
        new_weights.append(w - v)
    return new_weights, new_momentum


def build_sharded_optimizer(name, learning_rate, sharding: WeightUpdateSharding, *,
                            momentum=0.9, weight_decay=0.0):
  """`training.optimizer.build_optimizer`'s SGD or LARS, with a sharded update.

  Build it inside `strategy.scope()`. The weight-decay exclusions are the project's
  (`EXCLUDED_FROM_DECAY`), as for the unsharded LARS.
  """
  if name == "sgd":
    return ShardedSGD(learning_rate, momentum=momentum, sharding=sharding)
  if name == "lars":
    return ShardedLARS(
        learning_rate, momentum=momentum, weight_decay_rate=weight_decay,
        exclude_from_weight_decay=list(EXCLUDED_FROM_DECAY),
        exclude_from_layer_adaptation=list(EXCLUDED_FROM_DECAY),
        sharding=sharding)
  raise ValueError(f"unknown optimizer {name!r}")


# The legacy-optimizer loss-scale wrapper itself: the public
# `tf_keras.mixed_precision.LossScaleOptimizer` is a factory base whose subclasses are
# not constructed as wrappers.
_LegacyLossScaleOptimizer = loss_scale_optimizer.LossScaleOptimizer


class ShardedLossScaleOptimizer(_LegacyLossScaleOptimizer):
  """tf_keras' dynamic loss scaling around a sharded update, for mixed_float16.

  `LossScaleOptimizer` sums the gradients itself (so that every replica sees the same
  non-finite values and all skip the step together), then asks the inner optimizer to
  apply the *summed* gradients. A sharded update must get them unsummed: it sums them
  into its shards. Here every replica instead learns whether any replica's gradients
  hold an inf or NaN through one scalar all-reduce, and a replica whose own gradients
  are finite while another's are not gets a NaN put into its first gradient. The loss
  scale then moves, and a step is skipped, exactly as under the unsharded optimizer,
  and the inner optimizer still receives every replica's own gradients.

  `_apply_gradients` is tf_keras' (2.20) private hook through which the wrapper calls
  the inner optimizer; it is overridden to pass the gradients on as unsummed, and the
  wrapper class is reached through tf_keras' private module path.
  tests/sharded_update_test.py fails if either changes.
  """

  def apply_gradients(self, grads_and_vars, name=None,
                      experimental_aggregate_gradients=True):
    if not experimental_aggregate_gradients:
      raise ValueError("a sharded weight update needs the unsummed gradients "
                       "(experimental_aggregate_gradients=True)")
    grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
    gradients = [tf.convert_to_tensor(g) for g, _ in grads_and_vars]
    nonfinite = tf.add_n([tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32))
                          for g in gradients])
    backend = self.inner_optimizer._resolve_backend()  # pylint: disable=protected-access
    num_replicas = self.inner_optimizer.sharding.grid.num_replicas
    total = backend.all_reduce_sum(tf.reshape(nonfinite, [1]),
                                   [list(range(num_replicas))])[0]
    poison = tf.where(total > 0, tf.constant(float("nan"), gradients[0].dtype),
                      tf.zeros([], gradients[0].dtype))
    gradients[0] = gradients[0] + poison
    # Summed here means "every replica agrees on finiteness"; the sum itself happens
    # in the inner optimizer's shards.
    return super().apply_gradients(
        list(zip(gradients, [v for _, v in grads_and_vars])), name=name,
        experimental_aggregate_gradients=False)

  def _apply_gradients(self, grads, wrapped_vars, name):
    return self._optimizer.apply_gradients(
        list(zip(grads, wrapped_vars.value)), name=name,
        experimental_aggregate_gradients=True)
