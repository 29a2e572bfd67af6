"""Tests for the sharded weight update on 8 logical CPUs.

The sharded SGD and LARS must end where the unsharded tf_keras SGD and Model Garden
LARS (summing with the strategy's all-reduce) end, weights and momentum slots alike,
on 2x4 and 4x2 grids, sharded over x and over x*y: with weight-decay exclusions, a
learning-rate schedule, layers split across shards, a step with non-finite gradients
(skipped, as under a loss-scale optimizer), `model.fit` under mixed_bfloat16, and
checkpoints restored across sharded and unsharded runs and across grids.

The same holds for the step as TPUStrategy builds it: the TPU back end's ops (emulated)
and a replica id known only at run time, so every shard offset is a tensor; that
step's graph holds only ops XLA compiles, with static shapes, and the per-replica shard
math compiles with XLA.
"""

from tests import logical_devices

logical_devices.configure_logical_cpus()

# pylint: disable=g-import-not-at-top,g-bad-import-order
import contextlib
import os
import re
import threading
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import tf_keras
from official.modeling.optimization import lars
# The kernel registry, which lists the XLA compilation kernels (device XLA_CPU_JIT)
# that tf2xla registers; TensorFlow has no public query for them.
from tensorflow.python.framework import kernels

from allreduce import collectives
from allreduce import torus_aggregator
from allreduce.topology import TorusTopology
from training import optimizer as optimizer_lib
from training import weight_decay
from training import sharded_optimizer
from tests import graph_walk
from tests import tpu_emulation

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


def make_optimizer(rule, sharding=None, backend=None):
  """The unsharded optimizer of `rule` (sharding None) or its sharded twin (on
  `backend`'s collectives, default the strategy's)."""
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
    kwargs.update(sharding=sharding, backend=backend)
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


# ------------------------------------------------------------------ TPU emulation

# Per replica thread: whether the code running now is an emulated TPU op, which (like
# XLA's own collectives) knows which replica it runs on.
_INSIDE_EMULATED_OP = threading.local()


class _RunTimeReplicaId:
  """A replica context whose `replica_id_in_sync_group` is a run-time int32 tensor.

  Under TPUStrategy it is one: `TPUExtended._tpu_function_creator`
  (tensorflow/python/distribute/tpu_strategy.py) puts the constant `i` first in
  replica `i`'s inputs, `tpu.split_compile_and_replicate` (tensorflow/python/tpu/
  tpu.py) fans each input into one `TPUReplicatedInput`, and `replicated_fn` opens the
  replica context with that input as the id: a graph input that `tf.get_static_value`
  cannot fold. A `PlaceholderWithDefault` is such an input here; everything else is
  the MirroredStrategy context's.
  """

  def __init__(self, context):
    self._context = context

  def __getattr__(self, name):
    return getattr(self._context, name)

  @property
  def replica_id_in_sync_group(self):
    return tf.raw_ops.PlaceholderWithDefault(
        input=self._context.replica_id_in_sync_group, shape=[])


def _knowing_the_replica(op):
  """`op` run with the MirroredStrategy replica context (its id a constant)."""
  def run(*args, **kwargs):
    outer = getattr(_INSIDE_EMULATED_OP, "active", False)
    _INSIDE_EMULATED_OP.active = True
    try:
      return op(*args, **kwargs)
    finally:
      _INSIDE_EMULATED_OP.active = outer
  return run


def run_time_replica_ids():
  """Within: `tf.distribute.get_replica_context()` (the one the sharded update and
  the back ends ask) reports the replica id as a run-time tensor, as on TPU, except
  inside the emulated TPU ops. TensorFlow's own internals keep the real context."""
  real = tf.distribute.get_replica_context

  def get_replica_context():
    context = real()
    if context is None or getattr(_INSIDE_EMULATED_OP, "active", False):
      return context
    return _RunTimeReplicaId(context)

  return mock.patch.object(tf.distribute, "get_replica_context", get_replica_context)


@contextlib.contextmanager
def tpu_step(emulated=True):
  """Replica ids known only at run time, as under TPUStrategy, and the TPU back
  end's ops emulated (`tests/tpu_emulation.py`); without `emulated` the TPU ops stay,
  for graphs that are traced and never run."""
  with contextlib.ExitStack() as stack:
    if emulated:
      stack.enter_context(tpu_emulation.emulated_tpu_ops(TIMEOUT_SECONDS))
      for module, name in ((tf.raw_ops, "CrossReplicaSum"),
                           (tf.raw_ops, "CollectivePermute"),
                           (collectives, "_xla_reduce_scatter")):
        stack.enter_context(mock.patch.object(
            module, name, _knowing_the_replica(getattr(module, name))))
    stack.enter_context(run_time_replica_ids())
    yield


def recording_shard_starts():
  """Patches `ShardedUpdate._pack_shards` to record every `PackShard.start` it makes;
  returns (the patch, the list)."""
  starts = []
  original = sharded_optimizer.ShardedUpdate._pack_shards  # pylint: disable=protected-access

  def pack_shards(self):
    shards = original(self)
    starts.extend(shard.start for shard in shards)
    return shards

  return mock.patch.object(sharded_optimizer.ShardedUpdate, "_pack_shards",
                           pack_shards), starts


def xla_kernel_devices(op_type):
  """The devices `op_type` has kernels for (XLA_CPU_JIT: XLA compiles it)."""
  tf.zeros([])  # tf2xla registers its kernels when the runtime starts, on first use
  return {k.device_type
          for k in kernels.get_registered_kernels_for_op(op_type).kernel}


# The inputs tf2xla compiles as constants (`CompileTimeConstantInput` in
# tensorflow/compiler/tf2xla/kernels/), of the op types a sharded step holds: a value
# known only at run time there (a TPU replica id) cannot compile. Checked against
# what XLA did with a run-time value where it mattered (the shard math test below).
COMPILE_TIME_INPUTS = {
    "Slice": ("begin", "size"),
    "StridedSlice": ("begin", "end", "strides"),
    "Reshape": ("shape",),
    "Pad": ("paddings",),
    "Range": ("start", "limit", "delta"),
    "ConcatV2": ("axis",),
    "SplitV": ("size_splits", "split_dim"),
    "GatherV2": ("axis",),
    "UnsortedSegmentSum": ("num_segments",),
    "CrossReplicaSum": ("group_assignment",),
    "XlaReduceScatter": ("group_assignment", "scatter_dimension"),
    "CollectivePermute": ("source_target_pairs",),
}
# Op types of a sharded step with no such input: element-wise arithmetic, variable
# reads and writes, shapes, and the plumbing around them.
NO_COMPILE_TIME_INPUTS = frozenset((
    "AddV2", "AssignAddVariableOp", "AssignVariableOp", "Cast", "Const",
    "EnsureShape", "FloorDiv", "FloorMod", "Greater", "Identity", "Less", "Minimum",
    "Mul", "NoOp", "Pack", "Placeholder", "PlaceholderWithDefault", "Pow",
    "ReadVariableOp", "RealDiv", "SelectV2", "Shape", "Sqrt", "StatelessIf", "Sub",
    "UpperBound"))


def run_time_compile_time_inputs(graph):
  """`op type: input` for every input of `graph` that tf2xla needs as a constant
  but that only a run knows; raises on an op type neither table lists."""
  found = []
  for op in graph.get_operations():
    if op.type in NO_COMPILE_TIME_INPUTS:
      continue
    if op.type not in COMPILE_TIME_INPUTS:
      raise KeyError(f"{op.type} ({op.name}): add it to COMPILE_TIME_INPUTS or "
                     "NO_COMPILE_TIME_INPUTS")
    inputs = inputs_by_name(op)
    for name in COMPILE_TIME_INPUTS[op.type]:
      if any(depends_on_a_run(t) for t in inputs[name]):
        found.append(f"{op.type}: {name} ({op.name})")
  return found


def depends_on_a_run(tensor, _seen=None):
  """Whether `tensor` depends on a value that only a run knows (an input, a
  variable, a collective's result); a constant, or the shape of a tensor whose
  shape is static, XLA knows while compiling."""
  seen = set() if _seen is None else _seen
  op = tensor.op
  if op.name in seen:
    return False
  seen.add(op.name)
  if op.type == "Const":
    return False
  if op.type in ("Shape", "Size", "Rank") and op.inputs[0].shape.is_fully_defined():
    return False
  if not op.inputs or op.type == "PlaceholderWithDefault":
    return True  # the function's inputs (variables among them), the replica id
  return any(depends_on_a_run(t, seen) for t in op.inputs)


def inputs_by_name(op):
  """`op`'s input tensors by the op definition's argument names (a list argument,
  as ConcatV2's values, names several)."""
  named, position = {}, 0
  for arg in op.op_def.input_arg:
    if arg.number_attr:
      count = op.get_attr(arg.number_attr)
    elif arg.type_list_attr:
      count = len(op.get_attr(arg.type_list_attr))
    else:
      count = 1
    named[arg.name] = op.inputs[position:position + count]
    position += count
  return named


def graph_op_types(graph):
  """Op types in `graph` and in every function its library holds (branches of
  conditionals, the learning-rate schedule's)."""
  types = {op.type for op in graph.get_operations()}
  for function in graph.as_graph_def().library.function:
    types.update(node.op for node in function.node_def)
  return types


_REFERENCES = {}


def unsharded_reference(rule):
  """Weights and slots of the unsharded optimizer after NUM_STEPS steps."""
  if rule not in _REFERENCES:
    variables = make_variables()
    optimizer = make_optimizer(rule)
    run_steps(optimizer, variables, gradient_values(NUM_STEPS), range(NUM_STEPS))
    _REFERENCES[rule] = ([v.numpy() for v in variables],
                         slot_values(optimizer, variables))
  return _REFERENCES[rule]


_SHARDED_RUNS = {}


def sharded_run(rule, grid, shards):
  """(steps counted, every replica's weights, every replica's momentum slots) of the
  sharded optimizer after NUM_STEPS steps under MirroredStrategy (offsets known while
  tracing); kept for the TPU test, which compares with them."""
  key = (rule, grid, shards)
  if key not in _SHARDED_RUNS:
    variables = make_variables()
    optimizer = make_optimizer(rule, make_sharding(grid, shards))
    run_steps(optimizer, variables, gradient_values(NUM_STEPS), range(NUM_STEPS))
    _SHARDED_RUNS[key] = (int(optimizer.iterations.numpy()),
                          [replica_values(v) for v in variables],
                          slot_values(optimizer, variables))
  return _SHARDED_RUNS[key]


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


class MatchesMixin:
  """The tolerance a sharded run's numbers meet against another run's."""

  def assert_matches(self, variables, optimizer, want_weights, want_slots):
    self.assert_copies_match(
        [v.name for v in variables], [replica_values(v) for v in variables],
        slot_values(optimizer, variables),
        [[w] * NUM_REPLICAS for w in want_weights], want_slots)

  def assert_copies_match(self, names, weights, slots, want_weights, want_slots):
    """Per variable: every replica's copy of its weight and of its momentum slot."""
    for name, copies, want in zip(names, weights, want_weights):
      for copy, want_copy in zip(copies, want, strict=True):
        self.assertAllClose(copy, want_copy, rtol=2e-5, atol=2e-6, msg=name)
    for name, copies, want in zip(names, slots, want_slots):
      for copy, want_copy in zip(copies, want, strict=True):
        self.assertAllClose(copy, want_copy, rtol=2e-5, atol=2e-6,
                            msg=f"momentum of {name}")


class ShardedUpdateTest(MatchesMixin, tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(
      ("sgd", (2, 4), "x"), ("sgd", (2, 4), "xy"),
      ("sgd", (4, 2), "x"), ("sgd", (4, 2), "xy"),
      ("lars", (2, 4), "x"), ("lars", (2, 4), "xy"),
      ("lars", (4, 2), "x"), ("lars", (4, 2), "xy"))
  def test_matches_the_unsharded_optimizer(self, rule, grid, shards):
    want_weights, want_slots = unsharded_reference(rule)
    steps, weights, slots = sharded_run(rule, grid, shards)
    self.assertEqual(steps, NUM_STEPS)
    self.assert_copies_match([name for name, _, _ in VARIABLE_SPECS], weights, slots,
                             [[w] * NUM_REPLICAS for w in want_weights], want_slots)

  @parameterized.parameters("x", "xy")
  def test_the_first_pack_is_summed_before_the_first_layers_gradients(self, shards):
    """Overlap with backprop: the first reduce-scatter a replica issues (a row's
    run in issue order) needs only the last layers' gradients, which backprop
    makes first, not the first layer's, which it makes last."""
    variables = make_variables()
    optimizer = make_optimizer("lars", make_sharding((2, 4), shards))
    with strategy().scope():
      optimizer._create_all_weights(variables)  # pylint: disable=protected-access
    self.assertGreater(len(optimizer._packs), 2)  # pylint: disable=protected-access
    tables = [tf.constant(g[0]) for g in gradient_values(1)]

    def replica_step():
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      grads = [tf.identity(tf.gather(t, replica), name=f"gradient_{i}")
               for i, t in enumerate(tables)]
      optimizer.apply_gradients(zip(grads, variables))

    graph = tf.function(lambda: strategy().run(replica_step)).get_concrete_function(
        ).graph
    # Replica 0's ops carry no `replica_<k>/` prefix; the first op that sends a
    # gradient chunk (a pair broadcast off NCCL, an all-to-all under it).
    first = next(op for op in graph.get_operations()
                 if op.type in ("CollectiveBcastSendV2", "CollectiveAllToAllV2")
                 and "replica_" not in op.name)
    gradients = sorted(int(name.split("_")[-1])
                       for name in graph_walk.ancestors(first)
                       if re.fullmatch(r"gradient_\d+", name))
    packs = optimizer._packs  # pylint: disable=protected-access
    self.assertNotEmpty(gradients)
    self.assertContainsSubset(gradients, packs[0].indices)
    self.assertNotIn(0, gradients)
    # The first pack holds the last layer, and every later pack earlier layers
    # than the one before it.
    self.assertIn(len(VARIABLE_SPECS) - 1, packs[0].indices)
    for earlier, later in zip(packs, packs[1:]):
      self.assertGreater(min(earlier.indices), max(later.indices))

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
    want_weights, want_slots = unsharded_reference(rule)
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


class TpuShardedStepTest(MatchesMixin, tf.test.TestCase, parameterized.TestCase):
  """The whole sharded step as TPUStrategy builds it: the TPU back end's ops and a
  run-time replica id, so every shard offset is a tensor and the dynamic path runs."""

  def run_tpu_steps(self, rule, grid, shards):
    """Every replica's weights and momentum slots (per variable) after NUM_STEPS
    steps on the emulated TPU back end, with run-time replica ids."""
    recording, starts = recording_shard_starts()
    variables = make_variables()
    optimizer = make_optimizer(rule, make_sharding(grid, shards),
                               backend=collectives.TpuBackend())
    with recording, tpu_step():
      run_steps(optimizer, variables, gradient_values(NUM_STEPS), range(NUM_STEPS))
      slots = slot_values(optimizer, variables)
    self.assertEqual(int(optimizer.iterations.numpy()), NUM_STEPS)
    # Every replica's every pack, traced once, its offset known only at run time.
    packs = optimizer._packs  # pylint: disable=protected-access
    self.assertLen(starts, NUM_REPLICAS * len(packs))
    for start in starts:
      self.assertIsInstance(start, tf.Tensor)
      self.assertIsNone(tf.get_static_value(start))
    return [replica_values(v) for v in variables], slots

  # Each rule, grid and shard count twice, each pair of them once (the static path
  # above runs all eight; an emulated TPU run costs 20-50 s on 2 cores).
  @parameterized.parameters(
      ("sgd", (2, 4), "x"), ("sgd", (4, 2), "xy"),
      ("lars", (2, 4), "xy"), ("lars", (4, 2), "x"))
  def test_matches_the_unsharded_optimizer_and_the_static_path(self, rule, grid,
                                                              shards):
    names = [name for name, _, _ in VARIABLE_SPECS]
    weights, slots = self.run_tpu_steps(rule, grid, shards)
    want_weights, want_slots = unsharded_reference(rule)
    self.assert_copies_match(names, weights, slots,
                             [[w] * NUM_REPLICAS for w in want_weights], want_slots)
    # The static path: slices and plain sums where this one gathers and sums
    # segments, on the CPU collectives.
    _, static_weights, static_slots = sharded_run(rule, grid, shards)
    self.assert_copies_match(names, weights, slots, static_weights, static_slots)

  def test_the_kernel_registry_tells_xla_ops_apart(self):
    # The check below is only as good as this query: it must see both kinds.
    self.assertIn("XLA_CPU_JIT", xla_kernel_devices("UnsortedSegmentSum"))
    self.assertIn("XLA_CPU_JIT", xla_kernel_devices("XlaReduceScatter"))
    self.assertNotIn("XLA_CPU_JIT", xla_kernel_devices("DecodeJpeg"))

  @parameterized.parameters(("lars", (2, 4), "xy"), ("sgd", (4, 2), "x"))
  def test_the_step_graph_has_only_xla_ops_and_static_shapes(self, rule, grid,
                                                              shards):
    """The step, and the checkpoint's slot gather and re-shard, traced (not run)
    with the real TPU ops."""
    variables = make_variables()
    optimizer = make_optimizer(rule, make_sharding(grid, shards),
                               backend=collectives.TpuBackend())
    tables = [tf.constant(g[0]) for g in gradient_values(1)]

    def replica_step():
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      optimizer.apply_gradients(zip([tf.gather(t, replica) for t in tables],
                                    variables))

    recording, starts = recording_shard_starts()
    graphs = []
    with recording, tpu_step(emulated=False):
      for replica_fn in (replica_step,
                         optimizer._gather_slots_in_replica,  # pylint: disable=protected-access
                         optimizer._shard_slots_in_replica):  # pylint: disable=protected-access
        run = tf.function(lambda fn=replica_fn: strategy().run(fn), autograph=False)
        graphs.append(run.get_concrete_function().graph)
    self.assertNotEmpty(starts)
    for start in starts:
      self.assertIsNone(tf.get_static_value(start))

    types = set().union(*(graph_op_types(g) for g in graphs))
    self.assertContainsSubset(
        {"XlaReduceScatter", "CollectivePermute", "CrossReplicaSum", "GatherV2"}, types)
    if rule == "lars":  # per-layer norms and trust ratios over run-time offsets
      self.assertContainsSubset({"UnsortedSegmentSum", "UpperBound"}, types)
    without_xla = {t for t in types if "XLA_CPU_JIT" not in xla_kernel_devices(t)}
    # CrossReplicaSum and CollectivePermute are compiled by the TPU runtime's own
    # registrations (not in this build); Placeholder: the functions' inputs (the
    # variables' handles), which enter the compiled computation as arguments.
    self.assertEqual(without_xla,
                     {"CrossReplicaSum", "CollectivePermute", "Placeholder"})
    for graph in graphs:
      self.assertEqual(run_time_compile_time_inputs(graph), [])
      for op in graph.get_operations():
        for output in op.outputs:
          self.assertTrue(output.shape.is_fully_defined(),
                          msg=f"{op.type} {op.name}: {output.shape}")

  @parameterized.parameters("sgd", "lars")
  def test_the_shard_math_compiles_with_xla_at_a_run_time_offset(self, rule):
    """Cut, per-member sums, trust ratios, scale and momentum update, compiled with
    `jit_compile=True` and the shard index an argument, give the numbers of the
    static and the uncompiled dynamic path."""
    sharding = make_sharding((2, 4), "xy")
    variables = make_variables()
    optimizer = make_optimizer(rule, sharding)
    with strategy().scope():
      optimizer._create_all_weights(variables)  # pylint: disable=protected-access
    packs = optimizer._packs  # pylint: disable=protected-access
    lengths = [pack.length // sharding.num_shards for pack in packs]
    weights = [tf.constant(w) for w in initial_values()]
    gradients = [tf.constant(g[0, 0]) for g in gradient_values(1)]
    rng = np.random.default_rng(5)
    momentum = [tf.constant(rng.standard_normal(n).astype(np.float32))
                for n in lengths]
    learning_rate = tf.constant(0.3)

    def shard_math(index, momentum):
      shards = [sharded_optimizer.PackShard(pack, index * length, length)
                for pack, length in zip(packs, lengths)]
      # pylint: disable=protected-access
      w = [s.cut(optimizer._members(s.pack, weights)) for s in shards]
      g = [s.cut(optimizer._members(s.pack, gradients)) for s in shards]
      g, partial_sums = optimizer._shard_statistics(shards, w, g)
      # The shard's partial sums stand in for the completed ones (a collective):
      # the same shapes, and numbers that differ from shard to shard.
      return optimizer._shard_step(shards, w, g, momentum, learning_rate,
                                   partial_sums)

    compiled = tf.function(shard_math, jit_compile=True)
    # One program for every shard: XLA would fold an index that some op needs
    # while compiling (as tf.slice's begin) into the program, which then differs
    # from shard to shard; on TPU, where the index is the replica's own, it would not
    # compile at all.
    programs = {compiled.experimental_get_compiler_ir(tf.constant(index), momentum)(
        stage="hlo") for index in (0, 1)}
    self.assertEqual(len(programs), 1, "the shard index is compiled in")
    for index in range(sharding.num_shards):
      got = compiled(tf.constant(index), momentum)
      for want in (shard_math(index, momentum),  # the static path
                   shard_math(tf.constant(index), momentum)):  # dynamic, uncompiled
        for got_part, want_part in zip(tf.nest.flatten(got), tf.nest.flatten(want),
                                       strict=True):
          self.assertAllClose(got_part, want_part, rtol=2e-5, atol=2e-6)


if __name__ == "__main__":
  tf.test.main()
