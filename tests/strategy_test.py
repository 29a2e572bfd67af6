"""The strategy factory on 8 logical CPUs: really 8 replicas, really collectives."""

import inspect
import json
import os
from unittest import mock

from tests import logical_devices

logical_devices.configure_logical_cpus()

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from training import strategy as strategy_lib


def _v3_slice(x_chips, y_chips):
  """A v3 `Topology` as TF reports it: 2x2 chips of 2 cores per host (task)."""
  hosts = [[[hx + x, hy + y, 0, core] for y in range(2) for x in range(2)
            for core in range(2)]
           for hy in range(0, y_chips, 2) for hx in range(0, x_chips, 2)]
  return tf.tpu.experimental.Topology(mesh_shape=[x_chips, y_chips, 1, 2],
                                      device_coordinates=hosts)


def _fake_tpu_strategy(assignment, resolver=None):
  """A TPUStrategy instance (for isinstance) holding only what the code reads."""
  strategy = tf.distribute.TPUStrategy.__new__(tf.distribute.TPUStrategy)
  strategy._extended = mock.Mock(_device_assignment=assignment)
  strategy._cluster_resolver = resolver
  return strategy


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



class TpuStrategyTest(tf.test.TestCase):
  """What create_strategy(tpu=...) calls, with TF's TPU entry points mocked."""

  def _create(self, tpu, topology):
    resolver = mock.Mock(name="resolver")
    with mock.patch.object(tf.distribute.cluster_resolver, "TPUClusterResolver",
                           return_value=resolver) as resolver_class, \
         mock.patch.object(tf.config, "experimental_connect_to_cluster") as connect, \
         mock.patch.object(tf.tpu.experimental, "initialize_tpu_system",
                           return_value=topology) as initialize, \
         mock.patch.object(tf.distribute, "TPUStrategy") as strategy_class:
      strategy = strategy_lib.create_strategy(tpu=tpu)
    self.assertIs(strategy, strategy_class.return_value)
    resolver_class.assert_called_once_with(tpu=tpu)
    initialize.assert_called_once_with(resolver)
    ((args, kwargs),) = strategy_class.call_args_list
    self.assertEqual(args, (resolver,))
    return resolver, connect, kwargs["experimental_device_assignment"]

  def test_local_tpu_is_passed_as_local(self):
    # "local": the TPU attached to this VM; "" would mean "find it by name".
    _, connect, assignment = self._create("local", _v3_slice(2, 2))
    connect.assert_not_called()
    self.assertEqual((assignment.num_replicas, assignment.num_cores_per_replica),
                     (8, 1))

  def test_named_tpu_connects_first(self):
    resolver, connect, assignment = self._create("my-tpu", _v3_slice(2, 2))
    connect.assert_called_once_with(resolver)
    self.assertEqual(assignment.num_replicas, 8)

  def test_multi_host_slice_uses_every_core_of_every_host(self):
    resolver, connect, assignment = self._create("my-pod", _v3_slice(4, 4))
    connect.assert_called_once_with(resolver)
    self.assertEqual(assignment.num_replicas, 32)
    self.assertLen({assignment.host_device(r) for r in range(32)}, 4)

  def test_gpus_sum_with_nccl(self):
    gpus = [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU"),
            tf.config.PhysicalDevice("/physical_device:GPU:1", "GPU")]
    with mock.patch.dict(os.environ, {}), \
         mock.patch.object(tf.config, "list_physical_devices",
                           side_effect=lambda kind=None: gpus if kind == "GPU" else []), \
         mock.patch.object(tf.distribute, "MirroredStrategy") as mirrored:
      os.environ.pop("TF_CONFIG", None)
      strategy_lib.create_strategy()
    ((args, kwargs),) = mirrored.call_args_list
    self.assertEqual(args, (["/gpu:0", "/gpu:1"],))
    self.assertIsInstance(kwargs["cross_device_ops"], tf.distribute.NcclAllReduce)

  def test_the_single_client_is_chief(self):
    # A named pod's resolver lists the hosts as "worker" tasks; the one client
    # process is still the chief, whatever its resolver's task says.
    pod = {"worker": [f"10.0.0.{i}:8470" for i in range(4)]}
    for task_id in (0, 3):
      strategy = _fake_tpu_strategy(None, _FakeResolver(pod, "worker", task_id))
      self.assertTrue(strategy_lib.is_chief(strategy))


class ReplicaTopologyTest(tf.test.TestCase):

  def test_tpu_grid_follows_the_chips(self):
    topology = _v3_slice(4, 4)
    assignment = tf.tpu.experimental.DeviceAssignment.build(topology,
                                                            num_replicas=32)
    strategy = _fake_tpu_strategy(assignment)
    grid = strategy_lib.replica_grid(strategy)
    self.assertEqual(grid.shape, (8, 4))  # 4 chips x 2 cores, by 4 chips
    for row in grid.row_groups():
      places = [tuple(assignment.coordinates(r, 0)) for r in row]
      self.assertEqual([p[0] * 2 + p[3] for p in places], list(range(8)))
      self.assertLen({p[1] for p in places}, 1)
    self.assertEqual(strategy_lib.replica_grid(strategy, (4, 8)).shape, (4, 8))
    with self.assertRaisesRegex(ValueError, "does not follow this TPU slice"):
      strategy_lib.replica_grid(strategy, (2, 16))

  def test_tpu_strategy_without_assignment_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "no device assignment"):
      strategy_lib.replica_grid(_fake_tpu_strategy(None))

  def test_other_strategies_number_replicas_in_order(self):
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(8)])
    grid = strategy_lib.replica_grid(strategy, (2, 4))
    self.assertEqual((grid.shape, grid.device_order), ((2, 4), tuple(range(8))))
    self.assertEqual(strategy_lib.replica_grid(strategy).shape, (2, 4))

  def test_tpu_strategy_still_keeps_its_device_assignment(self):
    # tpu_device_assignment reads a private attribute; fail loudly if TF renames it.
    from tensorflow.python.distribute import tpu_strategy  # pylint: disable=g-import-not-at-top
    source = inspect.getsource(tpu_strategy.TPUExtended.__init__)
    self.assertIn("self._device_assignment = device_assignment", source)


if __name__ == "__main__":
  tf.test.main()
