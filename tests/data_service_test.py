"""The training input through a tf.data service on loopback: a dispatcher and two
workers in this process feed 8 logical CPU replicas, one host or two sharing a job."""

import collections
import io
import os
import socket
import subprocess
import sys

from tests import logical_devices

logical_devices.configure_logical_cpus()

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf
from PIL import Image

import input_pipeline
from input_pipeline import dataset_info
from input_pipeline import schema
from training import config as config_lib
from training import data_service
from training import data_sources
from training import run as run_lib
from tests import toy_tfds

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_IMAGE_SIZE = 16


def _closed_port():
  """A loopback port where nothing listens (bound once, then released)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _jpeg(seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), np.uint8)
  output = io.BytesIO()
  Image.fromarray(pixels).save(output, format="JPEG", quality=90)
  return output.getvalue()


def _write_id_labelled_shards(directory, num_shards, examples_per_shard):
  """ImageNet-schema train and validation shards; a record's label is its id."""
  os.makedirs(directory, exist_ok=True)
  num_examples = num_shards * examples_per_shard
  for split in ("train", "validation"):
    counts = {}
    for shard in range(num_shards):
      name = f"{split}-{shard:05d}-of-{num_shards:05d}"
      with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
        for i in range(shard * examples_per_shard, (shard + 1) * examples_per_shard):
          writer.write(schema.make_example(_jpeg(i), i, 24, 32).SerializeToString())
      counts[name] = examples_per_shard
    dataset_info.write_split_info(directory, split, counts,
                                  [str(i) for i in range(num_examples)])
  return num_examples


def _epoch_cuts(streams, num_examples, num_epochs, starts=(0, 0)):
  """Every way to cut the two hosts' ids into epochs holding each id once.

  A host reads a job to its end before its `repeat` starts the next epoch's job, so
  its stream is its part of epoch 0, then of epoch 1, ...; where the cuts fall depends
  on which host the workers answered first. Yields, for each way of cutting the
  first `num_epochs` epochs so that each holds every one of `num_examples` ids
  exactly once across the hosts together, the list of each epoch's (host 0's part,
  host 1's part). Nothing is yielded if some id came twice in an epoch or is missing.
  """
  if not num_epochs:
    yield []
    return
  everything = list(range(num_examples))
  first, second = streams
  for taken in range(num_examples + 1):
    ends = (starts[0] + taken, starts[1] + num_examples - taken)
    if ends[0] > len(first) or ends[1] > len(second):
      continue
    parts = (first[starts[0]:ends[0]], second[starts[1]:ends[1]])
    if sorted(parts[0] + parts[1]) == everything:
      for later in _epoch_cuts(streams, num_examples, num_epochs - 1, ends):
        yield [parts] + later


def _two_host_ids(datasets, batches_per_host):
  """Each host's labels (ids), reading the hosts' datasets in turn, as one step would."""
  iterators = [iter(dataset) for dataset in datasets]
  streams = ([], [])
  for _ in range(batches_per_host):
    for host, iterator in enumerate(iterators):
      streams[host].extend(int(label) for label in next(iterator)[1].numpy())
  return streams


class DataServiceTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    service = tf.data.experimental.service
    # Jobs no client reads are dropped after 1 s, not TensorFlow's 5 min: the workers
    # keep serving a job's repeated epochs until it is dropped, and the process cannot
    # exit before they stop (6 min after the tests had passed).
    cls.dispatcher = service.DispatchServer(service.DispatcherConfig(
        port=0, job_gc_check_interval_ms=200, job_gc_timeout_ms=1000))
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

  def _two_hosts_of(self, config, start_step):
    """The training datasets two hosts of 4 replicas each build, from one config."""
    source = data_sources.data_source_for(config.data, config.loop)
    contexts = [tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=host,
                                           num_replicas_in_sync=8) for host in range(2)]
    return source, [source.make_train_dataset(context, start_step)
                    for context in contexts]

  def _check_shared_epochs(self, config, start_step, num_epochs=2):
    """Two hosts on one job: each epoch gives every record once across both."""
    source, datasets = self._two_hosts_of(config, start_step)
    count = source.num_train_examples
    # Per-replica batches of 2; a host's share of an epoch is at most all of it.
    streams = _two_host_ids(datasets, batches_per_host=num_epochs * count // 2)
    cuts = list(_epoch_cuts(streams, count, num_epochs))
    self.assertNotEmpty(cuts, f"no epoch holds each id once: {streams}")
    # One job per epoch shared by both hosts, not a job per host. With a job per host
    # each host's stream is whole epochs of its own: every `count` ids in a row from
    # its start hold each id once. A host may take a whole epoch alone when the other
    # joins late (first come, first served), so sharing shows either as a host whose
    # stream is not whole epochs throughout, or as an epoch cut giving each host a
    # quarter or more of it (with a job per host that needs two prefixes to be
    # complementary by chance: under 1 in 10^4 here).
    def whole_epochs(stream):
      return all(sorted(stream[i:i + count]) == list(range(count))
                 for i in range(0, len(stream) - count + 1, count))

    whole = []
    for epochs in range(2 * num_epochs, num_epochs, -1):
      whole = list(_epoch_cuts(streams, count, epochs))
      if whole:
        break
    shared_cut = any(min(len(first), len(second)) >= count // 4
                     for cut in whole or cuts for first, second in cut)
    self.assertTrue(shared_cut or not all(whole_epochs(s) for s in streams),
                    f"each host's stream is whole epochs of its own: {streams}")
    return cuts[0]

  def test_two_hosts_share_each_epochs_job_and_a_resume_gets_its_own(self):
    data_dir = os.path.join(self.model_dir, "id_labelled")
    count = _write_id_labelled_shards(data_dir, num_shards=4, examples_per_shard=6)
    config = self._config(dataset="imagenet", data_dir=data_dir, num_classes=count,
                          model_dir=os.path.join(self.model_dir, "two_hosts"))
    names = [data_service.job_name_for(config.loop.model_dir, step, 2)
             for step in (0, 5)]
    self.assertNotEqual(names[0], names[1])
    self.assertIsNone(data_service.job_name_for(config.loop.model_dir, 0, 1))
    first_run = self._check_shared_epochs(config, start_step=0)
    # Epochs are jobs of their own: the second is shuffled anew.
    self.assertNotEqual(first_run[0], first_run[1])
    # A resumed run (from step 5, on the same live service) gets a new job name: the
    # first run's job of that epoch is not reused, and its epochs are whole again.
    self._check_shared_epochs(config, start_step=5)

  def test_tfds_data_set_through_the_service_on_two_hosts(self):
    data_dir = os.path.join(self.model_dir, "tfds")
    count = 32
    name = toy_tfds.prepare_toy_tfds(
        data_dir, {"train": count, "validation": 4}, num_shards=4)
    config = self._config(dataset=f"tfds/{name}", data_dir=data_dir, num_classes=count,
                          model_dir=os.path.join(self.model_dir, "tfds_run"))
    self._check_shared_epochs(config, start_step=0)

  def test_training_through_the_service_completes(self):
    # Two replicas, not the preset's eight: what is under test is the service feeding
    # the trainer, and an 8-replica step costs minutes to trace on 2 cores.
    config = self._config(train_steps=4, log_every_steps=2, checkpoint_every_steps=2,
                          torus_shape=(1, 2), bn_group_size=2,
                          model_dir=os.path.join(self.model_dir, "train"))
    trainer = run_lib.build_trainer(config, logical_devices.cpu_mirrored_strategy(2))
    loops = trainer.train()
    self.assertEqual(trainer.step, 4)
    self.assertLen(loops, 2)
    self.assertTrue(all(np.isfinite(loop["loss"]) for loop in loops))

  def test_config_errors_name_the_flag(self):
    with self.assertRaisesRegex(config_lib.ConfigError,
                                r"^--data_service_address: .*files .*not synthetic"):
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
