"""No autotuning in the per-device copy buffers a strategy builds on CPU devices.

Why this exists: when a `MirroredStrategy` distributes a dataset, each replica's
device gets a small pipeline of its own (tensorflow/python/data/ops/
multi_device_iterator_ops.py, `_create_device_dataset`: a generator that fetches
from the host pipeline, then a fixed-size prefetch). Each of those pipelines runs with
tf.data's default options, autotuning on, so each starts a `Model::OptimizeLoop`
thread, which sleeps between optimisations for a period that doubles up to 60 s.
Deleting the iterator (Keras does at the end of every `fit` and every `evaluate`)
waits for each of those threads to wake up by itself (TF 2.20: the main thread blocks
in `RootDataset::Iterator::~Iterator` on the model thread, which does not wake when
its iterator is cancelled). With 8 logical CPU replicas that was 20-160 s per deletion
(docs/RESULTS.md, "The default run"). There is nothing for the autotuner to tune in
those pipelines: the generator has no parallelism and the prefetch has a fixed size.

TensorFlow has no option for those pipelines (they take no options from the host
dataset), so `untune_cpu_device_buffers` wraps the private function that builds them
and gives the CPU devices' ones `autotune.enabled = False`; other devices (GPU, TPU)
get TensorFlow's own pipeline unchanged. If TensorFlow renames the function, this
raises at install time rather than silently doing nothing
(tests/device_buffers_test.py checks it against the installed TensorFlow).
"""

import threading

import tensorflow as tf
from tensorflow.python.data.ops import multi_device_iterator_ops

_lock = threading.Lock()
_installed = False


def _untuned(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.with_options(options)


def on_cpu(dataset: tf.data.Dataset) -> bool:
  """Whether `dataset`'s variant lives on a CPU device (or has no device set, which
  places it on the host's CPU)."""
  device = dataset._variant_tensor.device  # pylint: disable=protected-access
  return not device or tf.DeviceSpec.from_string(device).device_type == "CPU"


def untune_cpu_device_buffers():
  """Installs the wrapper, once per process (later calls do nothing)."""
  global _installed
  with _lock:
    if _installed:
      return
    build = multi_device_iterator_ops._create_device_dataset  # pylint: disable=protected-access

    def create_device_dataset(*args, **kwargs):
      dataset = build(*args, **kwargs)
      return _untuned(dataset) if on_cpu(dataset) else dataset

    multi_device_iterator_ops._create_device_dataset = create_device_dataset  # pylint: disable=protected-access
    _installed = True
