"""Batch normalization whose statistics span a group of neighbouring replicas.

At pod scale the per-replica batch is small, so per-replica batch statistics are noisy,
while statistics over every replica cost a global all-reduce per layer and, past a few
thousand examples, hurt accuracy (Ying et al. 2018). The paper's answer is a
*group*: a few replicas that are neighbours on the torus pool their moments, so the extra
all-reduce stays on nearest-neighbour links. `allreduce.topology` decides which replicas
form a group; this module only sums moments within the groups it is given.

Each training step a layer issues exactly one collective: the per-channel sum, sum of
squares and example count of its replica's batch, packed into one tensor and summed over
the group. Combining sums (never averaging per-replica variances) gives the exact moments
of the group's concatenated batch, also when replicas hold different numbers of examples.
"""

from typing import Callable, Optional, Sequence

import tensorflow as tf
import tf_keras

from allreduce import collectives
from allreduce import topology as topology_lib
from allreduce.topology import GroupAssignment


class GroupSyncBatchNormalization(tf_keras.layers.experimental.SyncBatchNormalization):
  """Batch norm with mean and variance over the batches of a group of replicas.

  In training, mean and variance are those of the concatenation of the batches of the
  replicas in this replica's group (`group_size` replicas); in inference the moving
  statistics are used, as in any batch norm. `group_size=1` is per-replica batch norm
  and `group_size` = number of replicas is `SyncBatchNormalization`.

  Groups come from `group_assignment` (lists of replica ids, e.g.
  `TorusTopology.block_groups(group_size)`). Without one, the groups are the blocks of
  the most square torus for the replica count found at call time.

  In a single-replica context (no strategy, one replica, or cross-replica context) the
  layer is plain batch norm whatever `group_size` says, so a model built or evaluated
  outside the strategy behaves as expected.

  Numerics:
  * Moments are accumulated in float32 whatever the activation dtype (bfloat16 and
    float16 inputs are cast first, by the base class).
  * Within a group, sums are taken of `x - shift`, with `shift` the layer's moving
    mean (no gradient). That avoids the catastrophic cancellation of E[x^2] - E[x]^2
    once the moving mean tracks the batch mean (a few tens of steps with momentum 0.9); at initialisation the
    moving mean is zero and the precision is that of `SyncBatchNormalization`. The
    shift is the same on every replica of a group because the group's replicas apply
    the same updates to their copies of the moving mean. A replica alone (group size
    1) uses the two-pass moments of plain batch norm.
  * The moving variance is updated with the biased (population) variance of the group
    batch, as `SyncBatchNormalization` does.
  * The example count travels as float32: exact up to 2**24 values per channel in a
    group (batch * height * width); beyond that it rounds at the 1e-7 level.
  """

  def __init__(self,
               group_size: int = 1,
               group_assignment: Optional[Sequence[Sequence[int]]] = None,
               backend: Optional[collectives.CollectiveBackend] = None,
               **kwargs):
    """Creates the layer.

    Args:
      group_size: replicas per batch-norm group.
      group_assignment: the groups, as lists of replica ids that partition all
        replicas, each of `group_size` ids; `None` to derive them at call time.
      backend: the collective back end; `None` asks `allreduce.collectives` for the
        one that fits the strategy in scope at call time, so models never import it.
      **kwargs: the usual `BatchNormalization` arguments (axis, momentum, epsilon,
        gamma_initializer, dtype, name, ...). `virtual_batch_size` is not supported.
    """
    if kwargs.get("virtual_batch_size") is not None:
      raise ValueError("GroupSyncBatchNormalization does not support virtual_batch_size")
    if group_size < 1:
      raise ValueError(f"group_size must be positive, got {group_size}")
    if group_assignment is not None:
      # Lists, not the checker's tuples: `get_config` writes them out as given.
      group_assignment = [list(group) for group in topology_lib.check_group_assignment(
          group_assignment, group_size=group_size, name="batch-norm groups")]
    # SyncBatchNormalization logs once per process that its endpoint is deprecated
    # in favour of BatchNormalization(synchronized=True). Both run the same code; the
    # class is kept as the base because it names what this layer generalises.
    super().__init__(**kwargs)
    self.group_size = group_size
    self.group_assignment = group_assignment
    self._backend = backend

  def get_config(self):
    config = super().get_config()
    config.update(group_size=self.group_size, group_assignment=self.group_assignment)
    return config

  def groups_for(self, num_replicas: int) -> GroupAssignment:
    """The group assignment this layer uses with `num_replicas` replicas."""
    if self.group_assignment is None:
      grid = topology_lib.TorusTopology.for_replicas(num_replicas)
      return grid.block_groups(self.group_size)
    covered = sum(len(group) for group in self.group_assignment)
    if covered != num_replicas:
      raise ValueError(
          f"{self.name}: its batch-norm groups cover {covered} replicas but the "
          f"strategy runs {num_replicas}; build the groups for {num_replicas} replicas")
    return self.group_assignment

  def _calculate_mean_and_var(self, inputs, reduction_axes, keep_dims, mask=None):
    # tf_keras' (private) moments hook, the one SyncBatchNormalization itself uses;
    # the base class's `call` passes float32 inputs in training (16-bit activations
    # are cast before they get here) and normalizes with what this returns. If a
    # tf_keras release stops calling it, the tests of groups of 2 and 4 against the
    # NumPy reference fail.
    if mask is not None:
      raise ValueError(f"{self.name}: masks are not supported by group batch norm")
    groups = self._groups_in_context()
    if groups is None:
      # Alone: exactly the moments of plain (unfused) batch norm, two-pass and free
      # of cancellation.
      return self._no_sync_calculate_mean_and_var(inputs, reduction_axes, keep_dims)
    with tf_keras.backend.name_scope("group_moments"):
      x = tf.cast(inputs, tf.float32)
      ndims = x.shape.rank
      broadcast_shape = [x.shape[i] if i in self.axis else 1 for i in range(ndims)]
      shift = tf.stop_gradient(
          tf.reshape(tf.cast(self.moving_mean, tf.float32), broadcast_shape))
      shifted = x - shift
      local_sum = tf.reduce_sum(shifted, axis=reduction_axes, keepdims=True)
      local_squared_sum = tf.reduce_sum(
          tf.square(shifted), axis=reduction_axes, keepdims=True)
      local_count = tf.cast(
          tf.reduce_prod(tf.gather(tf.shape(x), reduction_axes)), tf.float32)

      group_sum, group_squared_sum, group_count = self._sum_over_group(
          local_sum, local_squared_sum, local_count, groups)

      shifted_mean = tf.math.divide_no_nan(group_sum, group_count)
      # Rounding can make E[d^2] - E[d]^2 slightly negative when the variance is ~0.
      variance = tf.maximum(
          tf.math.divide_no_nan(group_squared_sum, group_count)
          - tf.square(shifted_mean), 0.0)
      mean = shifted_mean + shift
      if not keep_dims:
        mean = tf.squeeze(mean, reduction_axes)
        variance = tf.squeeze(variance, reduction_axes)
      return mean, variance

  def _groups_in_context(self) -> Optional[GroupAssignment]:
    """The groups to sum over here, or None where this replica is alone."""
    replica_context = tf.distribute.get_replica_context()
    num_replicas = replica_context.num_replicas_in_sync if replica_context else 1
    if num_replicas == 1 or self.group_size == 1:
      return None
    return self.groups_for(num_replicas)

  def _sum_over_group(self, local_sum, local_squared_sum, local_count, groups):
    """Sums the three moments over this replica's group in one collective."""
    backend = self._backend or collectives.backend_for_strategy(
        tf.distribute.get_strategy(), chain=collectives.BATCH_NORM_CHAIN)
    num_channels = local_sum.shape.num_elements()  # static: the axis sizes are known
    packed = tf.concat(
        [tf.reshape(local_sum, [-1]), tf.reshape(local_squared_sum, [-1]),
         tf.reshape(local_count, [1])], axis=0)
    summed = _group_sum(packed, backend, groups)
    group_sum, group_squared_sum, group_count = tf.split(
        summed, [num_channels, num_channels, 1])
    return (tf.reshape(group_sum, tf.shape(local_sum)),
            tf.reshape(group_squared_sum, tf.shape(local_squared_sum)),
            tf.reshape(group_count, []))


def _group_sum(value, backend, groups):
  """`backend.all_reduce_sum` with its gradient: the upstream gradient summed alike.

  Every replica of a group receives the same sum, so the gradient of the loss (summed
  over replicas) with respect to one replica's input is the sum of the upstream
  gradients over the group. Defined here so it holds for every back end, also those
  whose raw op has no registered gradient (`CollectiveReduceV2`).
  """

  @tf.custom_gradient
  def summed(value):
    def grad(upstream):
      return backend.all_reduce_sum(upstream, groups)
    return backend.all_reduce_sum(value, groups), grad

  return summed(value)


def make_batch_norm_factory(
    group_size: int,
    grid: Optional[topology_lib.TorusTopology] = None,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    backend: Optional[collectives.CollectiveBackend] = None,
) -> Callable[..., tf_keras.layers.Layer]:
  """The `norm_layer` factory the ResNet builder takes: `norm_layer(name=..., ...)`.

  Args:
    group_size: replicas per batch-norm group (`bn_group_size`).
    grid: the replica torus; its `block_groups(group_size)` are the groups, and
      a size that does not tile it raises `TopologyError` here, before any model is
      built. `None` derives the groups at call time from the replica count.
    momentum: moving-average momentum (the reference TPU ResNet uses 0.9).
    epsilon: variance epsilon (the reference uses 1e-5).
    backend: the collective back end; `None` picks it from the strategy at call
      time.

  Group size 1 also gets a `GroupSyncBatchNormalization` (which then issues no
  collective and computes plain batch-norm moments) rather than tf_keras' fused
  `BatchNormalization`: one code path, and one moving-variance convention at every
  group size (the fused kernel stores the unbiased n/(n-1) variance, the grouped layer
  the biased one, like `SyncBatchNormalization`), so a checkpoint means the same
  whatever `bn_group_size` trained it. The price would be the fused kernel's speed,
  small where the step is dominated by convolutions and the gradient all-reduce;
  `benchmarks/batch_norm.py` measures both (docs/RESULTS.md, "Grouped batch norm").

  Returns:
    A callable taking layer keyword arguments (`name`, `gamma_initializer`, ...) and
    returning a channels-last batch-norm layer. Its dtype follows the global Keras
    mixed-precision policy unless `dtype=` is passed, so under `mixed_bfloat16` the
    activations are bfloat16 and the variables and moments float32.
  """
  group_assignment = None
  if grid is not None:
    group_assignment = grid.block_groups(group_size)
  elif group_size < 1:
    raise topology_lib.TopologyError(
        f"batch-norm group size must be positive, got {group_size}")

  def norm_layer(**kwargs):
    kwargs.setdefault("axis", -1)
    kwargs.setdefault("momentum", momentum)
    kwargs.setdefault("epsilon", epsilon)
    return GroupSyncBatchNormalization(
        group_size=group_size, group_assignment=group_assignment, backend=backend,
        **kwargs)

  return norm_layer
