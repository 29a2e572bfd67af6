"""Builds the distribution strategy: TPU pod, GPUs, logical CPUs, or several workers.

The choice, in order: `tpu` given -> TPUStrategy; a `TF_CONFIG` naming more than one
task -> MultiWorkerMirroredStrategy; GPUs visible -> MirroredStrategy over them;
otherwise the CPU split into `num_cpu_devices` logical devices under MirroredStrategy, so
that every collective of the distributed path really runs on a laptop or CI machine.

Under MultiWorkerMirroredStrategy a worker without GPUs is exactly one replica
(TensorFlow places a CPU worker's replica on its CPU:0 whatever logical devices exist),
so `num_cpu_devices` does not apply there: the replica count is the worker count.

On TPU one Python process drives the whole slice (TF's `TPUStrategy` is single-client):
on a single TPU VM it runs there with `tpu="local"`; on a multi-host slice it runs on
worker 0 and reaches every host by the TPU's name (`tools/submit_tpu.py`, docs/TPU.md).
The strategy is built with an explicit `DeviceAssignment`, so which chip each replica
runs on is known here, and `replica_grid` turns it into the replica grid.
"""

import json
import os
from typing import Optional

import tensorflow as tf
from absl import logging
from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
from tensorflow.python.distribute import multi_worker_util
from tensorflow.python.eager import context as context_lib

from allreduce.topology import TorusTopology

_TPU_STRATEGIES = (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)


def split_cpu(num_cpu_devices: int):
  """Splits the CPU into logical devices; must run before the TF runtime starts."""
  cpu = tf.config.list_physical_devices("CPU")[0]
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices)
  except RuntimeError:
    pass  # Already initialised: accept it if it already has enough devices.
  available = len(tf.config.list_logical_devices("CPU"))
  if available < num_cpu_devices:
    raise RuntimeError(
        f"asked for {num_cpu_devices} logical CPUs but TensorFlow already started "
        f"with {available}; create the strategy before running any TensorFlow op")
  return [f"/cpu:{i}" for i in range(num_cpu_devices)]


def multi_worker_task_count() -> int:
  """Tasks that TF_CONFIG names (0 or 1: a single-process run)."""
  tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
  return sum(len(tasks) for tasks in tf_config.get("cluster", {}).values())


def _tpu_strategy(tpu: str) -> tf.distribute.TPUStrategy:
  """TPUStrategy over every core of the slice, from its one client process.

  `tpu="local"`: the TPU attached to this VM (TF's resolver treats "local" as a
  directly attached TPU, while "" would mean "look the name up in the environment").
  Any other value names a Cloud TPU: the resolver asks the Cloud TPU API for its
  workers and this process connects to all of them before initialising the system.
  """
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
  if tpu != "local":
    tf.config.experimental_connect_to_cluster(resolver)
  topology = tf.tpu.experimental.initialize_tpu_system(resolver)
  # An explicit assignment of one core per replica over every TPU device. Without
  # one the runtime picks the placement and it is not visible from Python, so the
  # replica grid could not follow the chips.
  assignment = tf.tpu.experimental.DeviceAssignment.build(
      topology, num_replicas=topology.num_tasks * topology.num_tpus_per_task)
  return tf.distribute.TPUStrategy(resolver,
                                   experimental_device_assignment=assignment)


def _bound_peer_silence(heartbeat_timeout_seconds: float):
  """Sets how long a silent worker may stall a multi-worker run.

  The bound is the coordination service's heartbeat timeout: when a worker misses its
  heartbeats for that long, the service aborts every worker's pending collectives and
  the step fails. MultiWorkerMirroredStrategy configures the same service (jobs "chief"
  and "worker", the leader chosen by `multi_worker_util.coordination_leader`) unless it
  is configured already, and exposes no heartbeat setting, so it is configured here
  first. Not per-op collective timeouts: TensorFlow's posix `Env::SchedClosureAfter`
  parks one sleeping thread per timed op for the whole timeout, which for the
  thousands of collectives of each training step runs out of threads within minutes.
  """
  context = context_lib.context()
  if context.coordination_service is not None or not heartbeat_timeout_seconds:
    return
  cluster_spec = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
  jobs = [coordination_config_pb2.CoordinatedJob(name=job,
                                                 num_tasks=cluster_spec.num_tasks(job))
          for job in ("chief", "worker") if job in cluster_spec.jobs]
  context.configure_coordination_service(
      service_type="standalone",
      service_leader=multi_worker_util.coordination_leader(cluster_spec),
      coordinated_jobs=jobs,
      heartbeat_timeout_in_ms=int(heartbeat_timeout_seconds * 1000))


def create_strategy(*, tpu=None, num_cpu_devices: int = 8,
                    collective_timeout_seconds: float = 0.0) -> tf.distribute.Strategy:
  """The strategy for this machine; see the module docstring for the order.

  `collective_timeout_seconds`: in a multi-worker run, a worker silent for this long
  (killed, its host gone) fails every other worker's step instead of hanging it (0:
  TensorFlow's default heartbeat timeout). One process has no peer to lose.
  """
  if tpu:
    return _tpu_strategy(tpu)

  gpus = tf.config.list_physical_devices("GPU")
  if multi_worker_task_count() > 1:
    _bound_peer_silence(collective_timeout_seconds)
    # No CPU split here: a CPU worker is one replica (see the module docstring).
    # Ring collectives over gRPC between workers; NCCL inside each GPU worker.
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.NCCL
        if gpus else tf.distribute.experimental.CommunicationImplementation.RING)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)

  if gpus:
    # NCCL sums on the GPUs over NVLink/PCIe; the default on one machine may copy
    # through the host.
    return tf.distribute.MirroredStrategy(
        [f"/gpu:{i}" for i in range(len(gpus))],
        cross_device_ops=tf.distribute.NcclAllReduce())
  devices = split_cpu(num_cpu_devices)
  logging.info("No accelerator found: %d logical CPU replicas.", num_cpu_devices)
  return tf.distribute.MirroredStrategy(devices)


def input_context(strategy: tf.distribute.Strategy,
                  options: Optional[tf.distribute.InputOptions] = None
                  ) -> tf.distribute.InputContext:
  """The `InputContext` the strategy gives this host's dataset functions.

  Taken from the strategy itself (it calls a dataset function with it; `options` as the
  real datasets are distributed with, since the replication mode changes the context)
  rather than rebuilt from the strategy's type, so the number of input pipelines is the
  one every pipeline sees. It builds a one-element dataset per host and nothing else.
  """
  contexts = []

  def dataset_fn(context):
    contexts.append(context)
    return tf.data.Dataset.range(1)

  strategy.distribute_datasets_from_function(dataset_fn, options)
  return contexts[0]


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the worker that writes checkpoints and summaries.

  Under TPUStrategy the one client process is the whole job, so it is the chief
  (its resolver's cluster spec lists the slice's hosts as "worker" tasks, but those
  run TPU servers, not this program).
  """
  if isinstance(strategy, _TPU_STRATEGIES):
    return True
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type is None or task_type == "chief" or (
      task_type == "worker" and task_id == 0
      and "chief" not in resolver.cluster_spec().as_dict())


def tpu_device_assignment(strategy: tf.distribute.TPUStrategy):
  """The `DeviceAssignment` a TPUStrategy was built with, or None.

  TPUStrategy keeps it only as `extended._device_assignment` (no public getter in
  TF 2.20); this is the one place that reads it, and tests/strategy_test.py fails
  if TensorFlow renames it.
  """
  return getattr(strategy.extended, "_device_assignment", None)


def replica_grid(strategy: tf.distribute.Strategy, shape=None) -> TorusTopology:
  """The replica grid for `strategy`, `shape` (x, y) or None for the default.

  Under TPUStrategy the grid follows the chips: each replica's physical
  `(x, y, z, core)` from the strategy's device assignment, folded onto two axes by
  `TorusTopology.from_physical_coordinates`, so rows and columns are physical rings
  and batch-norm groups are neighbours. Elsewhere replicas are numbered in order on
  `shape` (or the most square grid).
  """
  if isinstance(strategy, _TPU_STRATEGIES):
    assignment = tpu_device_assignment(strategy)
    if assignment is None:
      raise ValueError(
          "this TPUStrategy has no device assignment, so which chip each replica runs "
          "on is unknown; build it with training.strategy.create_strategy(tpu=...)")
    if assignment.num_cores_per_replica != 1:
      raise ValueError(
          f"replicas of {assignment.num_cores_per_replica} cores are not supported: "
          "the torus grid places one core per replica")
    coordinates = [tuple(int(v) for v in assignment.coordinates(replica, 0))
                   for replica in range(assignment.num_replicas)]
    return TorusTopology.from_physical_coordinates(coordinates, shape=shape)
  return TorusTopology.for_replicas(strategy.num_replicas_in_sync, shape)


def is_single_client(strategy: tf.distribute.Strategy) -> bool:
  """True when this process alone drives every replica (no peer to agree with)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if isinstance(strategy, tf.distribute.TPUStrategy) or resolver is None:
    return True
  jobs = resolver.cluster_spec().as_dict()
  return sum(len(tasks) for name, tasks in jobs.items() if name in ("chief", "worker")) <= 1


def worker_scratch_dir(strategy: tf.distribute.Strategy, model_dir: str) -> str:
  """The model dir for the chief; for another worker a folder of its own inside it.

  What every worker must write (its copy of a checkpoint, the generated digits) goes
  there, so that workers never write the same file and nothing lands outside the
  model dir.
  """
  if is_chief(strategy):
    return model_dir
  resolver = strategy.cluster_resolver
  return os.path.join(model_dir, f"workertemp_{resolver.task_type}_{resolver.task_id}")

