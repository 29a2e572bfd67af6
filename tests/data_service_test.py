"""The training input through a tf.data service on loopback: a dispatcher and two
workers in this process feed 8 logical CPU replicas."""

import collections
import os
import socket
import subprocess
import sys

from tests import logical_devices

logical_devices.configure_logical_cpus()

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf

import input_pipeline
from training import config as config_lib
from training import data_service
from training import data_sources
from training import run as run_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_IMAGE_SIZE = 16


def _closed_port():
  """A loopback port where nothing listens (bound once, then released)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class DataServiceTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    service = tf.data.experimental.service
    cls.dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
    dispatcher_address = cls.dispatcher.target.split("://")[1]
    cls.workers = [service.WorkerServer(service.WorkerConfig(
        dispatcher_address=dispatcher_address)) for _ in range(2)]
    cls.model_dir = os.path.join(tf.compat.v1.test.get_temp_dir(), "data_service_run")
    cls.spec = input_pipeline.prepare_digits_records(
        os.path.join(cls.model_dir, "data"), image_size=_IMAGE_SIZE)

  def _config(self, **overrides):
    values = dict(model_dir=self.model_dir, data_service_address=self.dispatcher.target,
                  image_size=_IMAGE_SIZE, resnet_depth=10, resnet_width=8,
                  train_batch_size=16, eval_batch_size=16, mode="train")
    values.update(overrides)
    return config_lib.build_config("cpu_demo", **values)

  def test_each_record_once_per_epoch_in_a_fresh_order(self):
    stream = input_pipeline.StreamOptions(is_training=True, shuffle_seed=0,
                                          service_epoch=True).resolved()
    records = input_pipeline.tfrecord_stream(self.spec.train_file_pattern, stream)
    names = data_service.served_epochs(
        records.map(lambda seed, example: example["filename"]), self.dispatcher.target)
    count = self.spec.num_train_examples
    seen = [name for name in names.take(2 * count).as_numpy_iterator()]
    first, second = seen[:count], seen[count:]
    self.assertCountEqual(first, set(first))  # no name twice in an epoch
    self.assertLen(set(first), count)
    self.assertCountEqual(second, first)
    self.assertNotEqual(second, first)  # each epoch is shuffled anew

  def test_train_batches_hold_one_epoch_of_labels(self):
    config = self._config()
    source = data_sources.data_source_for(config.data, config.loop)
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                         num_replicas_in_sync=8)
    count = source.num_train_examples
    labels = []
    with self.assertLogs("absl", level="WARNING") as logs:
      batches = source.make_train_dataset(context, 0)
    self.assertIn("not deterministic", logs.output[0])
    for images, batch_labels in batches.take(count // 2 + 1):
      self.assertEqual(images.shape, (2, _IMAGE_SIZE, _IMAGE_SIZE, 3))
      labels.extend(batch_labels.numpy().tolist())
    in_files = [int(example["label"]) for _, example in input_pipeline.tfrecord_stream(
        self.spec.train_file_pattern, input_pipeline.StreamOptions(is_training=False))]
    self.assertEqual(collections.Counter(labels[:count]),
                     collections.Counter(in_files))

  def test_training_through_the_service_completes(self):
    config = self._config(train_steps=4, log_every_steps=2, checkpoint_every_steps=2,
                          model_dir=os.path.join(self.model_dir, "train"))
    trainer = run_lib.build_trainer(config, logical_devices.cpu_mirrored_strategy(8))
    loops = trainer.train()
    self.assertEqual(trainer.step, 4)
    self.assertLen(loops, 2)
    self.assertTrue(all(np.isfinite(loop["loss"]) for loop in loops))

  def test_config_errors_name_the_flag(self):
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"^--data_service_address: .*TFRecord"):
      self._config(dataset="synthetic")
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"^--data_service_address: .*not host:port"):
      self._config(data_service_address="grpc://nowhere")
    config = self._config(data_service_address=f"127.0.0.1:{_closed_port()}")
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"^--data_service_address: no tf.data service "
                                r"dispatcher answers at 127.0.0.1:\d+"):
      run_lib.check_data_service(config.data)
    run_lib.check_data_service(self._config().data)  # the live one answers

  def test_tool_reports_an_unreachable_dispatcher_in_one_line(self):
    port = _closed_port()
    result = subprocess.run(
        [sys.executable, "-m", "tools.data_service",
         f"--dispatcher_address=127.0.0.1:{port}", "--port=0"],
        cwd=_REPO, capture_output=True, text=True, timeout=60, check=False)
    self.assertEqual(result.returncode, 2)
    self.assertEqual(result.stdout, "")
    self.assertEqual(
        result.stderr.splitlines(),
        [f"tools.data_service: error: --dispatcher_address: no tf.data service "
         f"dispatcher answers at 127.0.0.1:{port} (Connection refused); start one "
         "with `python -m tools.data_service`"])

  def test_tool_reports_a_taken_port_in_one_line(self):
    with socket.socket() as taken:
      taken.bind(("", 0))
      taken.listen()
      port = taken.getsockname()[1]
      result = subprocess.run(
          [sys.executable, "-m", "tools.data_service", f"--port={port}"],
          cwd=_REPO, capture_output=True, text=True, timeout=60, check=False)
    self.assertEqual(result.returncode, 2)
    self.assertEqual(result.stderr.splitlines(),
                     [f"tools.data_service: error: --port: port {port} is in use on "
                      "this host; pick another, or 0 for any free port"])


if __name__ == "__main__":
  tf.test.main()
