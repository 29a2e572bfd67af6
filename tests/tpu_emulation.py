"""The TPU back end's ops emulated on CPU collectives, for tests that run it.

`TpuBackend` builds XLA ops that have no CPU kernels. Inside
`emulated_tpu_ops()` they are replaced by emulations on `CollectiveOpsBackend` that read
each op's constant group assignment (or source-target pairs) and do what XLA defines
for it, so the back end's own logic around them runs for real under a MirroredStrategy
(where, unlike on TPU, the replica id is known while tracing).
"""

import contextlib
from unittest import mock

import tensorflow as tf

from allreduce import collectives


def emulated_tpu_ops(timeout_seconds: float = 60.0):
  """Patches the TPU ops with CPU emulations on `CollectiveOpsBackend`, in a `with`.

  Each emulation reads the op's constant group assignment (or pairs) and does what
  XLA defines for it, so everything around the ops (chunking, ranks, the table
  lookup, the ring bookkeeping) runs for real on 8 logical CPUs.
  """
  cpu = collectives.CollectiveOpsBackend(timeout_seconds=timeout_seconds)

  def groups_of(constant):
    return tf.get_static_value(constant).tolist()

  def cross_replica_sum(input, group_assignment, name=None):  # pylint: disable=redefined-builtin
    del name
    return cpu.all_reduce_sum(input, groups_of(group_assignment))

  def reduce_scatter(value, group_assignment, scatter_dimension, reduce_op):
    assert tf.get_static_value(scatter_dimension) == 0 and reduce_op == "Add"
    return cpu.reduce_scatter_sum(value, groups_of(group_assignment))

  def collective_permute(input, source_target_pairs, name=None):  # pylint: disable=redefined-builtin
    del name
    context = tf.distribute.get_replica_context()
    me = int(tf.get_static_value(context.replica_id_in_sync_group))
    num_replicas = context.num_replicas_in_sync
    (source,) = [s for s, t in groups_of(source_target_pairs) if t == me]
    everyone = cpu.all_gather(input[tf.newaxis], [list(range(num_replicas))])
    return everyone[source]

  stack = contextlib.ExitStack()
  stack.enter_context(mock.patch.object(tf.raw_ops, "CrossReplicaSum",
                                        cross_replica_sum))
  stack.enter_context(mock.patch.object(tf.raw_ops, "CollectivePermute",
                                        collective_permute))
  stack.enter_context(mock.patch.object(collectives, "_xla_reduce_scatter",
                                        reduce_scatter))
  return stack
