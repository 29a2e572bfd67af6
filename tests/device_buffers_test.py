"""The per-device copy buffers of a distributed dataset run without autotuning on CPU
devices, and keep TensorFlow's own options elsewhere (input_pipeline/device_buffers.py).

The stall this removes (deleting the iterator waits for the buffers' sleeping
autotune threads) is measured in benchmarks/iterator_teardown.py, not timed here.
"""

from tests import logical_devices

logical_devices.configure_logical_cpus()

# pylint: disable=g-import-not-at-top
import tensorflow as tf
from tensorflow.python.data.ops import multi_device_iterator_ops

import input_pipeline
from input_pipeline import device_buffers

CPUS = ["/device:CPU:0", "/device:CPU:1"]


class DeviceBuffersTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    input_pipeline.device_input_options()  # installs the wrapper, as the trainer does

  def test_cpu_device_buffers_are_not_autotuned_and_still_deliver(self):
    iterator = multi_device_iterator_ops.OwnedMultiDeviceIterator(
        tf.data.Dataset.range(6).map(lambda x: 2 * x), devices=CPUS)
    for device_iterator in iterator._device_iterators:  # pylint: disable=protected-access
      self.assertIs(device_iterator._dataset.options().autotune.enabled, False)  # pylint: disable=protected-access
    got = [[int(t) for t in iterator.get_next()] for _ in range(3)]
    self.assertEqual(got, [[0, 2], [4, 6], [8, 10]])

  def test_a_mirrored_strategy_reads_the_same_batches(self):
    strategy = logical_devices.cpu_mirrored_strategy(2)
    distributed = strategy.distribute_datasets_from_function(
        lambda context: tf.data.Dataset.range(8).batch(2),
        input_pipeline.device_input_options())
    # One pipeline on this host: its batches go to the replicas in turn.
    steps = [[t.numpy().tolist() for t in strategy.experimental_local_results(batch)]
             for batch in distributed]
    self.assertEqual(steps, [[[0, 1], [2, 3]], [[4, 5], [6, 7]]])

  def test_only_cpu_datasets_count_as_on_cpu(self):
    with tf.Graph().as_default():
      with tf.device("/device:TPU:0"):
        on_tpu = tf.data.Dataset.range(2)
      with tf.device("/job:worker/task:1/device:CPU:0"):
        on_a_cpu = tf.data.Dataset.range(2)
      placed_nowhere = tf.data.Dataset.range(2)
    self.assertFalse(device_buffers.on_cpu(on_tpu))
    self.assertTrue(device_buffers.on_cpu(on_a_cpu))
    self.assertTrue(device_buffers.on_cpu(placed_nowhere))

  def test_installing_twice_wraps_once(self):
    wrapped = multi_device_iterator_ops._create_device_dataset  # pylint: disable=protected-access
    device_buffers.untune_cpu_device_buffers()
    self.assertIs(multi_device_iterator_ops._create_device_dataset, wrapped)  # pylint: disable=protected-access


if __name__ == "__main__":
  tf.test.main()
