"""Builds the distribution strategy: TPU pod, GPUs, logical CPUs, or several workers.

The choice, in order: `tpu` given -> TPUStrategy; a `TF_CONFIG` naming more than one
task -> MultiWorkerMirroredStrategy; GPUs visible -> MirroredStrategy over them;
otherwise the CPU split into `num_cpu_devices` logical devices under MirroredStrategy, so
that every collective of the distributed path really runs on a laptop or CI machine.

Under MultiWorkerMirroredStrategy a worker without GPUs is exactly one replica
(TensorFlow places a CPU worker's replica on its CPU:0 whatever logical devices exist),
so `num_cpu_devices` does not apply there: the replica count is the worker count.
"""

import json
import os
from typing import Optional

import tensorflow as tf
from absl import logging


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


def _multi_worker_task_count() -> int:
  tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
  return sum(len(tasks) for tasks in tf_config.get("cluster", {}).values())


def create_strategy(*, tpu=None, num_cpu_devices: int = 8,
                    collective_timeout_seconds: float = 0.0) -> tf.distribute.Strategy:
  """The strategy for this machine; see the module docstring for the order.

  `collective_timeout_seconds` bounds each wait of a multi-worker strategy's own
  collectives (0: wait forever), so a lost worker fails the step instead of hanging it.
  """
  if tpu:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu="" if tpu == "local" else tpu)
    if tpu != "local":
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)

  gpus = tf.config.list_physical_devices("GPU")
  if _multi_worker_task_count() > 1:
    # No CPU split here: a CPU worker is one replica (see the module docstring).
    # Ring collectives over gRPC between workers; NCCL inside each GPU worker.
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=collective_timeout_seconds or None,
        implementation=tf.distribute.experimental.CommunicationImplementation.NCCL
        if gpus else tf.distribute.experimental.CommunicationImplementation.RING)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)

  if gpus:
    return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(len(gpus))])
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
  """True on the worker that writes checkpoints and summaries."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type is None or task_type == "chief" or (
      task_type == "worker" and task_id == 0
      and "chief" not in resolver.cluster_spec().as_dict())
