"""The strategy factory on 8 logical CPUs: really 8 replicas, really collectives."""

import json
import os
from unittest import mock

from tests import logical_devices

logical_devices.configure_logical_cpus()

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from training import strategy as strategy_lib


class _FakeResolver:

  def __init__(self, cluster, task_type, task_id):
    self._cluster = cluster
    self.task_type, self.task_id = task_type, task_id

  def cluster_spec(self):
    return tf.train.ClusterSpec(self._cluster)


class StrategyTest(tf.test.TestCase):

  def test_cpu_split_into_eight_mirrored_replicas(self):
    with mock.patch.dict(os.environ, {}):
      os.environ.pop("TF_CONFIG", None)
      strategy = strategy_lib.create_strategy(num_cpu_devices=8)
    self.assertIsInstance(strategy, tf.distribute.MirroredStrategy)
    self.assertEqual(strategy.num_replicas_in_sync, 8)
    self.assertEqual([d.split("/")[-1] for d in strategy.extended.worker_devices],
                     [f"device:CPU:{i}" for i in range(8)])

    @tf.function
    def replica_sum():
      def one_hot_of_replica():
        ctx = tf.distribute.get_replica_context()
        value = tf.one_hot(ctx.replica_id_in_sync_group, 8) * 10.0
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)
      return strategy.run(one_hot_of_replica)

    # Every replica sees every other replica's contribution: a real all-reduce.
    for value in strategy.experimental_local_results(replica_sum()):
      self.assertAllEqual(value, [10.0] * 8)

  def test_input_context_is_the_one_dataset_functions_get(self):
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(4)])
    context = strategy_lib.input_context(strategy)
    # One process: one input pipeline feeding all 4 replicas.
    self.assertEqual((context.num_input_pipelines, context.input_pipeline_id,
                      context.num_replicas_in_sync), (1, 0, 4))
    self.assertEqual(context.get_per_replica_batch_size(32), 8)

  def test_fewer_devices_than_asked_is_an_error(self):
    # The runtime already started with 8 logical CPUs; 16 cannot be made any more.
    with self.assertRaisesRegex(RuntimeError, "asked for 16 logical CPUs"):
      strategy_lib.create_strategy(num_cpu_devices=16)

  def test_single_task_tf_config_is_not_multi_worker(self):
    tf_config = {"cluster": {"worker": ["localhost:1"]},
                 "task": {"type": "worker", "index": 0}}
    with mock.patch.dict(os.environ, {"TF_CONFIG": json.dumps(tf_config)}):
      strategy = strategy_lib.create_strategy(num_cpu_devices=8)
    self.assertIsInstance(strategy, tf.distribute.MirroredStrategy)

  def test_chief_is_worker_zero_or_the_chief_task(self):
    self.assertTrue(strategy_lib.is_chief(tf.distribute.get_strategy()))
    workers = {"worker": ["localhost:1", "localhost:2"]}
    with_chief = dict(workers, chief=["localhost:3"])
    cases = [(workers, "worker", 0, True), (workers, "worker", 1, False),
             (with_chief, "worker", 0, False), (with_chief, "chief", 0, True)]
    for cluster, task_type, task_id, expected in cases:
      strategy = mock.Mock(cluster_resolver=_FakeResolver(cluster, task_type, task_id))
      self.assertEqual(strategy_lib.is_chief(strategy), expected,
                       (cluster, task_type, task_id))


if __name__ == "__main__":
  tf.test.main()
