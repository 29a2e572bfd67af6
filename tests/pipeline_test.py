"""Tests for input_pipeline.pipeline (and the synthetic and tfds sources)."""

from tests import logical_devices

logical_devices.configure_logical_cpus()

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position
import functools
import io
import os
import time

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image

import input_pipeline
from input_pipeline import dataset_info
from input_pipeline import pipeline
from input_pipeline import preprocessing
from input_pipeline import schema
from input_pipeline import tfds_source
from tests import bad_images
from tests import toy_tfds

IMAGE_SIZE = 16


def _jpeg(seed, height=24, width=32):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
  output = io.BytesIO()
  Image.fromarray(pixels).save(output, format="JPEG", quality=90)
  return output.getvalue()


def _png(seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), np.uint8)
  output = io.BytesIO()
  Image.fromarray(pixels).save(output, format="PNG")
  return output.getvalue()


def _write_shards(directory, num_shards, examples_per_shard, split="train",
                  write_info=True):
  """Shards of tiny JPEGs whose 0-based label is a unique example id."""
  counts, next_id = {}, 0
  for shard in range(num_shards):
    name = f"{split}-{shard:05d}-of-{num_shards:05d}"
    with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
      for _ in range(examples_per_shard):
        writer.write(schema.make_example(_jpeg(next_id), next_id, 24, 32,
                                         filename=f"{next_id}.jpg").SerializeToString())
        next_id += 1
    counts[name] = examples_per_shard
  if write_info:
    dataset_info.write_split_info(directory, split, counts,
                                  [str(i) for i in range(next_id)])
  return os.path.join(directory, f"{split}-*")


def _labels(dataset):
  return np.concatenate([labels.numpy() for _, labels in dataset])


def _concatenated(dataset):
  """The batches of `dataset` joined along the batch axis, per component, in NumPy."""
  batches = list(dataset.as_numpy_iterator())
  return [np.concatenate(component) for component in zip(*batches)], len(batches)


def _pipeline_options(**kwargs):
  """The old keyword arguments sorted into the pipeline's option dataclasses."""
  options = {}
  for argument, option_class in (("stream", input_pipeline.StreamOptions),
                                 ("preprocess", input_pipeline.PreprocessConfig),
                                 ("batch", input_pipeline.BatchOptions),
                                 ("read", input_pipeline.ReadOptions)):
    fields = {field.name for field in dataclasses.fields(option_class)}
    options[argument] = option_class(**{name: kwargs.pop(name) for name in fields
                                        if name in kwargs})
  return dict(options, **kwargs)


def _host_context(num_hosts, host, replicas_per_host=1):
  return tf.distribute.InputContext(num_input_pipelines=num_hosts,
                                    input_pipeline_id=host,
                                    num_replicas_in_sync=num_hosts * replicas_per_host)


class SchemaTest(tf.test.TestCase):

  def test_parse_written_record(self):
    jpeg = _jpeg(0)
    example = schema.make_example(jpeg, 6, 24, 32, filename="n01_1.JPEG",
                                  class_text="seven", bboxes=[(0.1, 0.2, 0.8, 0.9)])
    path = os.path.join(self.get_temp_dir(), "schema.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
      writer.write(example.SerializeToString())
    record = next(iter(tf.data.TFRecordDataset(path)))
    raw = tf.train.Example.FromString(record.numpy()).features.feature
    self.assertEqual(raw[schema.LABEL].int64_list.value, [7])  # 1-based on disk
    self.assertEqual(raw[schema.HEIGHT].int64_list.value, [24])
    self.assertEqual(raw[schema.WIDTH].int64_list.value, [32])
    self.assertEqual(raw[schema.FORMAT].bytes_list.value, [b"JPEG"])
    for parsed in (schema.parse_example(record),
                   next(iter(tf.data.TFRecordDataset(path).map(schema.parse_example)))):
      self.assertEqual(parsed["image_bytes"].numpy(), jpeg)
      self.assertEqual(int(parsed["label"]), 6)
      self.assertEqual(parsed["filename"].numpy(), b"n01_1.JPEG")
      self.assertAllClose(parsed["bboxes"], [[0.1, 0.2, 0.8, 0.9]])

  def test_no_boxes_parse_as_empty(self):
    record = schema.make_example(_jpeg(0), 0, 24, 32).SerializeToString()
    self.assertEqual(schema.parse_example(record)["bboxes"].shape, (0, 4))


class PipelineTest(tf.test.TestCase, parameterized.TestCase):

  def _dataset(self, pattern, **kwargs):
    defaults = dict(is_training=False, batch_size=4, image_size=IMAGE_SIZE)
    defaults.update(kwargs)
    return input_pipeline.create_tfrecord_dataset(pattern,
                                                  **_pipeline_options(**defaults))

  def test_eval_shapes_labels_and_one_pass(self):
    pattern = _write_shards(self.get_temp_dir(), 3, 5)
    dataset = self._dataset(pattern, drop_remainder=False)
    images, labels = next(iter(dataset))
    self.assertEqual(images.shape, (4, IMAGE_SIZE, IMAGE_SIZE, 3))
    self.assertEqual(images.dtype, tf.float32)
    self.assertEqual(labels.dtype, tf.int32)
    self.assertCountEqual(_labels(dataset), range(15))
    self.assertLen(_labels(self._dataset(pattern)), 12)  # drop_remainder: 3 full batches

  @parameterized.parameters(tf.float32, tf.bfloat16)
  def test_padded_eval_is_whole_batches_of_every_example_then_zeros(self, dtype):
    pattern = _write_shards(self.get_temp_dir(), 3, 5)  # 15 examples
    (images, labels, weights), num_batches = _concatenated(
        self._dataset(pattern, pad_to_batches=5, dtype=dtype))
    self.assertEqual(num_batches, 5)
    self.assertEqual(images.shape, (20, IMAGE_SIZE, IMAGE_SIZE, 3))
    self.assertEqual(images.dtype, dtype.as_numpy_dtype)
    self.assertEqual(weights.dtype, np.float32)
    self.assertAllEqual(weights, [1.0] * 15 + [0.0] * 5)
    # The real examples are exactly the unpadded pipeline's, in its order.
    (unpadded_images, unpadded_labels), _ = _concatenated(
        self._dataset(pattern, drop_remainder=False, dtype=dtype))
    self.assertAllEqual(labels[:15], unpadded_labels)
    self.assertAllEqual(images[:15], unpadded_images)
    self.assertAllEqual(labels[15:], np.zeros(5))
    self.assertAllEqual(images[15:], np.zeros((5, IMAGE_SIZE, IMAGE_SIZE, 3)))
    # ...which no real image is.
    self.assertTrue(np.all(np.abs(images[:15].astype(np.float32)).max(axis=(1, 2, 3))
                           > 0))

  def test_padding_to_too_few_batches_reads_only_what_fits(self):
    # The weights' sum shows the shortfall (the trainer compares it with the set's size).
    pattern = _write_shards(self.get_temp_dir(), 3, 5)  # 15 examples > 3 batches of 4
    (_, labels, weights), num_batches = _concatenated(
        self._dataset(pattern, pad_to_batches=3))
    self.assertEqual(num_batches, 3)
    self.assertEqual(weights.sum(), 12)
    self.assertLen(set(labels.tolist()), 12)

  def test_padding_is_for_evaluation_only(self):
    pattern = _write_shards(self.get_temp_dir(), 1, 4)
    with self.assertRaisesRegex(ValueError, "evaluation only"):
      self._dataset(pattern, is_training=True, pad_to_batches=2)

  @parameterized.named_parameters(
      # (files, examples per file, hosts, replicas per host, per-replica batch)
      ("files_per_host", 3, 5, 2, 2, 2, True),
      ("uneven_hosts", 5, 3, 3, 1, 2, True),
      ("records_per_host", 1, 7, 2, 2, 1, True),
      # Files 0 and 1 over 3 hosts: hosts 0 and 2 split file 0, host 1 reads file 1.
      ("fewer_files_than_hosts", 2, 5, 3, 1, 2, True),
      ("counted_without_info", 4, 3, 2, 1, 4, False),
      ("one_host", 2, 9, 1, 4, 2, True))
  def test_multi_host_padded_eval_covers_every_example_once(
      self, num_files, per_file, num_hosts, replicas_per_host, per_replica_batch,
      with_info):
    pattern = _write_shards(self.get_temp_dir(), num_files, per_file,
                            write_info=with_info)
    num_examples = num_files * per_file
    global_batch = per_replica_batch * replicas_per_host * num_hosts
    counts = input_pipeline.host_example_counts(pattern, num_hosts)
    self.assertEqual(sum(counts), num_examples)
    steps = input_pipeline.padded_eval_steps(counts, global_batch)
    seen = []
    for host in range(num_hosts):
      (_, labels, weights), num_batches = _concatenated(self._dataset(
          pattern, batch_size=per_replica_batch,
          input_context=_host_context(num_hosts, host, replicas_per_host),
          pad_to_batches=steps * replicas_per_host))
      # Every host runs the same number of steps, whatever its share.
      self.assertEqual(num_batches, steps * replicas_per_host)
      self.assertEqual(weights.sum(), counts[host])
      seen.append(labels[weights == 1.0])
    # Together the hosts score every example exactly once.
    self.assertAllEqual(np.sort(np.concatenate(seen)), np.arange(num_examples))
    # And the steps are as few as that allows: one fewer would not hold the largest.
    per_host_step = per_replica_batch * replicas_per_host
    self.assertGreater(max(counts), (steps - 1) * per_host_step)

  def test_eval_output_is_deterministic(self):
    pattern = _write_shards(self.get_temp_dir(), 4, 6)
    first = list(self._dataset(pattern).as_numpy_iterator())
    second = list(self._dataset(pattern, cache=True).as_numpy_iterator())
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
      self.assertAllEqual(labels_a, labels_b)
      self.assertAllEqual(images_a, images_b)

  @parameterized.parameters((6, 2), (6, 3), (6, 4), (2, 3), (1, 2))
  def test_host_sharding_is_disjoint_and_complete(self, num_files, num_hosts):
    pattern = _write_shards(self.get_temp_dir(), num_files, 4)
    seen = []
    for host in range(num_hosts):
      context = tf.distribute.InputContext(num_input_pipelines=num_hosts,
                                           input_pipeline_id=host,
                                           num_replicas_in_sync=num_hosts)
      seen.append(set(_labels(self._dataset(pattern, input_context=context,
                                            batch_size=1))))
    for a in range(num_hosts):
      for b in range(a + 1, num_hosts):
        self.assertEmpty(seen[a] & seen[b])
    self.assertEqual(set.union(*seen), set(range(num_files * 4)))

  def test_training_repeats_shuffles_and_is_seeded(self):
    pattern = _write_shards(self.get_temp_dir(), 3, 4)
    run = lambda seed: list(self._dataset(
        pattern, is_training=True, shuffle_seed=seed, batch_size=6).take(6)
                            .as_numpy_iterator())
    first, again, other = run(1), run(1), run(2)
    labels = np.concatenate([l for _, l in first])
    for epoch in range(3):  # every epoch holds each example once
      self.assertCountEqual(labels[epoch * 12:(epoch + 1) * 12], range(12))
    self.assertNotAllEqual(labels[:12], labels[12:24])  # reshuffled per epoch
    self.assertNotAllEqual(labels[:12], np.arange(12))
    for (images_a, labels_a), (images_b, labels_b) in zip(first, again):
      self.assertAllEqual(labels_a, labels_b)
      self.assertAllEqual(images_a, images_b)
    self.assertNotAllEqual(labels, np.concatenate([l for _, l in other]))

  @parameterized.parameters((5, True), (17, True), (29, False), (0, True))
  def test_skip_examples_reproduces_uninterrupted_stream(self, skip, with_info):
    pattern = _write_shards(self.get_temp_dir(), 3, 4, write_info=with_info)
    make = functools.partial(self._dataset, pattern, is_training=True, shuffle_seed=7,
                             batch_size=1)
    uninterrupted = list(make().take(skip + 10).as_numpy_iterator())[skip:]
    resumed = list(make(skip_examples=skip).take(10).as_numpy_iterator())
    for (images_a, labels_a), (images_b, labels_b) in zip(uninterrupted, resumed):
      self.assertAllEqual(labels_a, labels_b)
      self.assertAllEqual(images_a, images_b)

  def test_corrupt_images_are_skipped_and_counted(self):
    path = os.path.join(self.get_temp_dir(), "mixed-00000-of-00001")
    good = _jpeg(1)
    records = [(good, 0, "good.jpg"), (good[:len(good) // 2], 1, "truncated.jpg"),
               (b"<html>404</html>", 2, "html.jpg"), (_png(3), 3, "png_in_jpeg.jpg"),
               (good, 4, "good2.jpg")]
    with tf.io.TFRecordWriter(path) as writer:
      for image_bytes, label, name in records:
        writer.write(schema.make_example(image_bytes, label, 24, 32,
                                         filename=name).SerializeToString())
    # Evaluation: one pass, so exactly the two bad records.
    counter = input_pipeline.SkippedImageCounter()
    dataset = self._dataset(path, batch_size=1, drop_remainder=False,
                            skipped_image_counter=counter)
    self.assertCountEqual(_labels(dataset), [0, 3, 4])
    self.assertEqual(counter.count(), 2)
    # Training: two epochs' good records need all of the first epoch read (its two bad
    # records counted); reading ahead into later epochs may count a few more.
    counter = input_pipeline.SkippedImageCounter()
    dataset = self._dataset(path, is_training=True, batch_size=1, drop_remainder=False,
                            skipped_image_counter=counter)
    self.assertCountEqual(_labels(dataset.take(6)), [0, 3, 4] * 2)
    # Records are decoded in groups, so the stream reads ahead whole groups of
    # checked records (a few epochs of this file), counting their bad ones too.
    self.assertGreaterEqual(counter.count(), 2)

  def _write_mixed(self, name, cases):
    """A shard of (image bytes, label, filename) records; returns its path."""
    path = os.path.join(self.get_temp_dir(), name)
    with tf.io.TFRecordWriter(path) as writer:
      for image_bytes, label, filename in cases:
        writer.write(schema.make_example(image_bytes, label, 48, 64,
                                         filename=filename).SerializeToString())
    return path

  @parameterized.parameters(1.0, preprocessing.EVAL_CROP_FRACTION)
  def test_every_kind_of_bad_image_is_decoded_or_skipped_never_fatal(
      self, crop_fraction):
    good = bad_images.encode(bad_images.noise_image(7), quality=90)
    cases = bad_images.bad_image_cases()
    records, expected_labels, expected_skips = [], [], []
    for label, (name, (image_bytes, outcome)) in enumerate(sorted(cases.items())):
      if crop_fraction == 1.0 and name in bad_images.SKIPPED_WHEN_WINDOW_REACHES_LAST_ROWS:
        outcome = "skipped"
      records.append((image_bytes, label, name))
      (expected_labels if outcome == "decoded" else expected_skips).append(label)
      # A good image after each bad one: it must still come through.
      records.append((good, 100 + label, f"good_{label}"))
      expected_labels.append(100 + label)
    path = self._write_mixed("bad-kinds-00000-of-00001", records)
    counter = input_pipeline.SkippedImageCounter()
    dataset = self._dataset(path, batch_size=3, drop_remainder=False,
                            eval_crop_fraction=crop_fraction,
                            skipped_image_counter=counter)
    self.assertCountEqual(_labels(dataset), expected_labels)
    self.assertEqual(counter.count(), len(expected_skips))

  def test_bad_images_in_training_are_never_fatal(self):
    # Random crops sometimes reach an image's last rows and sometimes not, so the
    # stray-marker JPEG is skipped in some epochs and decoded in others.
    cases = bad_images.bad_image_cases()
    good = bad_images.encode(bad_images.noise_image(7), quality=90)
    records = [(image_bytes, label, name) for label, (name, (image_bytes, _))
               in enumerate(sorted(cases.items()))] + [(good, 99, "good")]
    path = self._write_mixed("bad-train-00000-of-00001", records)
    counter = input_pipeline.SkippedImageCounter()
    dataset = self._dataset(path, is_training=True, batch_size=4, shuffle_seed=3,
                            skipped_image_counter=counter)
    labels = _labels(dataset.take(10))
    self.assertLen(labels, 40)
    possible = {label for label, (_, (_, outcome)) in enumerate(sorted(cases.items()))
                if outcome == "decoded"} | {99}
    self.assertContainsSubset(set(labels), possible)
    self.assertGreater(counter.count(), 0)

  def test_padding_absorbs_skipped_images(self):
    path = os.path.join(self.get_temp_dir(), "validation-00000-of-00001")
    good = _jpeg(1)
    with tf.io.TFRecordWriter(path) as writer:
      for label, image_bytes in enumerate([good, b"not an image", good,
                                           good[:len(good) // 2], good]):
        writer.write(schema.make_example(image_bytes, label, 24, 32).SerializeToString())
    counts = input_pipeline.host_example_counts(path, 1)
    self.assertEqual(counts, [5])  # records, before any is found undecodable
    steps = input_pipeline.padded_eval_steps(counts, 2)
    counter = input_pipeline.SkippedImageCounter()
    (_, labels, weights), num_batches = _concatenated(self._dataset(
        path, batch_size=2, pad_to_batches=steps, skipped_image_counter=counter))
    self.assertEqual(num_batches, 3)
    self.assertAllEqual(labels[weights == 1.0], [0, 2, 4])
    self.assertEqual(counter.count(), 2)

  def test_empty_pattern_is_named_error(self):
    pattern = os.path.join(self.get_temp_dir(), "nothing-here-*")
    with self.assertRaisesRegex(input_pipeline.DataError, "nothing-here-"):
      self._dataset(pattern)

  def test_unreadable_shard_is_named_error(self):
    _write_shards(self.get_temp_dir(), 2, 2)
    bad = os.path.join(self.get_temp_dir(), "train-99999-of-99999")
    with open(bad, "wb") as f:
      f.write(_jpeg(0))  # a JPEG where a TFRecord file should be
    with self.assertRaisesRegex(input_pipeline.DataError, "train-99999-of-99999"):
      self._dataset(os.path.join(self.get_temp_dir(), "train-*"))

  def test_each_host_checks_only_its_own_shards(self):
    # Files 0-2 good, file 3 a JPEG where a TFRecord file should be: with 2 hosts it
    # is host 1's (files 1 and 3); host 0 (files 0 and 2) never opens it.
    _write_shards(self.get_temp_dir(), 3, 2)
    bad = os.path.join(self.get_temp_dir(), "train-99999-of-99999")
    with open(bad, "wb") as f:
      f.write(_jpeg(0))
    pattern = os.path.join(self.get_temp_dir(), "train-*")
    stream = input_pipeline.StreamOptions(is_training=False)
    host_0 = input_pipeline.tfrecord_stream(pattern, stream,
                                            input_context=_host_context(2, 0))
    self.assertCountEqual([int(example["label"]) for _, example in host_0],
                          [0, 1, 4, 5])
    with self.assertRaisesRegex(input_pipeline.DataError, "train-99999-of-99999"):
      input_pipeline.tfrecord_stream(pattern, stream, input_context=_host_context(2, 1))

  def test_shard_check_names_the_first_bad_file_in_order(self):
    directory = self.get_temp_dir()
    pattern = _write_shards(directory, 5, 1)
    files = pipeline.list_shards(pattern)
    for name in ("train-00002-of-00005", "train-00004-of-00005"):
      with open(os.path.join(directory, name), "wb") as f:
        f.write(b"not a record file, long enough to hold a record header")
    with self.assertRaisesRegex(input_pipeline.DataError, "train-00002-of-00005"):
      pipeline.check_shards_readable(files, max_parallel_reads=4)
    pipeline.check_shards_readable(files[:2] + files[3:4])

  def test_runtime_limits_are_the_pipelines_options(self):
    pattern = _write_shards(self.get_temp_dir(), 1, 4)
    options = self._dataset(pattern, private_threadpool_size=3,
                            max_intra_op_parallelism=1,
                            autotune_ram_budget_bytes=256 << 20).options()
    self.assertEqual(options.threading.private_threadpool_size, 3)
    self.assertEqual(options.threading.max_intra_op_parallelism, 1)
    self.assertEqual(options.autotune.ram_budget, 256 << 20)
    self.assertTrue(options.deterministic)
    # Unset, they stay TensorFlow's defaults.
    defaults, tf_defaults = self._dataset(pattern).options(), tf.data.Options()
    self.assertEqual(defaults.threading.private_threadpool_size,
                     tf_defaults.threading.private_threadpool_size)
    self.assertEqual(defaults.threading.max_intra_op_parallelism,
                     tf_defaults.threading.max_intra_op_parallelism)
    self.assertEqual(defaults.autotune.ram_budget, tf_defaults.autotune.ram_budget)

  def test_bfloat16_output(self):
    pattern = _write_shards(self.get_temp_dir(), 1, 4)
    images, _ = next(iter(self._dataset(pattern, is_training=True, dtype=tf.bfloat16)))
    self.assertEqual(images.dtype, tf.bfloat16)

  def test_distributed_with_device_prefetch(self):
    pattern = _write_shards(self.get_temp_dir(), 4, 4)
    strategy = logical_devices.cpu_mirrored_strategy(2)
    dataset_fn, options = input_pipeline.distributed_dataset_fn(
        lambda batch_size, input_context: input_pipeline.create_tfrecord_dataset(
            pattern, input_context=input_context, **_pipeline_options(
                is_training=True, image_size=IMAGE_SIZE, shuffle_seed=0,
                batch_size=batch_size)),
        global_batch_size=8)
    self.assertTrue(options.experimental_fetch_to_device)
    distributed = strategy.distribute_datasets_from_function(dataset_fn, options)
    images, labels = next(iter(distributed))
    per_replica = strategy.experimental_local_results(images)
    self.assertLen(per_replica, 2)
    self.assertEqual(per_replica[0].shape, (4, IMAGE_SIZE, IMAGE_SIZE, 3))
    self.assertEqual(strategy.experimental_local_results(labels)[1].shape, (4,))


def _stream_labels_and_seeds(pattern, count, **options):
  """The first `count` (labels, seeds) of a seeded training record stream (no decode)."""
  read = input_pipeline.ReadOptions(**options.pop("read", {}))
  stream = input_pipeline.StreamOptions(is_training=True, shuffle_seed=7, **options)
  labels, seeds = [], []
  for seed, example in input_pipeline.tfrecord_stream(pattern, stream, read).take(count):
    labels.append(int(example["label"]))
    seeds.append(seed.numpy().tolist())
  return np.array(labels), seeds


class TrainingStreamTest(tf.test.TestCase, parameterized.TestCase):
  """The endless training stream: windows per epoch, read ahead, resumed exactly."""

  @parameterized.parameters((12, 5, 4), (12, 100, 12), (10_001, 10_000, 5001),
                            (1_000_001, 10_000, 9901), (None, 7, 7), (12, 12, 12))
  def test_windows_cut_an_epoch_evenly(self, per_epoch, buffer, expected):
    self.assertEqual(pipeline.shuffle_window_size(per_epoch, buffer),
                     expected)

  def test_buffer_larger_than_an_epoch_still_gives_each_example_once_per_epoch(self):
    pattern = _write_shards(self.get_temp_dir(), 3, 4)
    labels, _ = _stream_labels_and_seeds(pattern, 48,
                                         read=dict(shuffle_buffer_size=100))
    epochs = labels.reshape(4, 12)
    for epoch in epochs:
      self.assertCountEqual(epoch, range(12))
    self.assertLen({tuple(epoch) for epoch in epochs}, 4)  # reshuffled every epoch

  @parameterized.product(skip=(3, 4, 11, 12, 17, 30), with_info=(True, False))
  def test_resume_inside_and_across_epoch_boundaries_is_exact(self, skip, with_info):
    # 12 examples per epoch in windows of 4 (listed counts) or 5 (unlisted: the last
    # window of each epoch is 2).
    pattern = _write_shards(self.get_temp_dir(), 3, 4, write_info=with_info)
    read = dict(shuffle_buffer_size=5)
    labels, seeds = _stream_labels_and_seeds(pattern, 50, read=read)
    resumed_labels, resumed_seeds = _stream_labels_and_seeds(
        pattern, 20, read=read, skip_examples=skip)
    self.assertAllEqual(resumed_labels, labels[skip:skip + 20])
    self.assertEqual(resumed_seeds, seeds[skip:skip + 20])
    for epoch in labels[:36].reshape(3, 12):
      self.assertCountEqual(epoch, range(12))

  def test_next_epoch_is_read_while_the_last_window_is_consumed(self):
    # Epochs of 12 records in two windows of 6. A window must be read whole before its
    # first record can come out; the stream reads epoch 1's first window as soon as
    # epoch 0's last one is taken, so it does not stop at the boundary. (Restarting the
    # read-ahead per epoch would read nothing of epoch 1 until its first record is
    # asked for: 12 records read here instead of 18.)
    read_count = []

    def epoch_records(epoch):
      def note(value):
        read_count.append(1)
        return value
      return tf.data.Dataset.range(12).map(
          lambda i: tf.py_function(note, [epoch * 100 + i], tf.int64))

    records = pipeline.shuffled_epochs(
        epoch_records, first_epoch=0, window_size=6,
        window_key=lambda epoch, window: tf.stack([epoch, window]))
    # Only the stream's own read-ahead: none injected by tf.data's autotuning.
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False
    options.autotune.enabled = False
    iterator = iter(records.with_options(options))
    first = [int(next(iterator)) for _ in range(7)]  # into epoch 0's last window
    for _ in range(200):
      if len(read_count) >= 18:
        break
      time.sleep(0.05)
    self.assertLen(read_count, 18)
    rest = [int(next(iterator)) for _ in range(17)]
    self.assertCountEqual((first + rest)[:12], range(12))
    self.assertCountEqual((first + rest)[12:], range(100, 112))


class PodAssignmentTest(tf.test.TestCase):
  """Shard assignment for a simulated 1024-host pod, on file names only."""

  NUM_HOSTS = 1024

  def _contexts(self):
    return [tf.distribute.InputContext(num_input_pipelines=self.NUM_HOSTS,
                                       input_pipeline_id=host,
                                       num_replicas_in_sync=4 * self.NUM_HOSTS)
            for host in range(self.NUM_HOSTS)]

  def _records_read(self, shards, examples_per_file):
    """{(file, record)} each host keeps, by host; and the files each host opens."""
    kept = []
    for shard in shards:
      records = [(path, index) for path in shard.files
                 for index in range(examples_per_file[path])]
      kept.append(records[shard.record_shard_index::shard.num_record_shards])
    return kept

  def _check_partition(self, files, examples_per_file):
    shards = [pipeline.shard_for_host(files, context)
              for context in self._contexts()]
    kept = self._records_read(shards, examples_per_file)
    everything = [record for records in kept for record in records]
    self.assertLen(everything, sum(examples_per_file.values()))
    self.assertLen(set(everything), len(everything))  # each record once
    # No host opens more than its ceil share of the files.
    most_files = -(-len(files) // self.NUM_HOSTS)
    self.assertLessEqual(max(len(shard.files) for shard in shards), most_files)
    counts = pipeline.example_counts_by_host(files, examples_per_file,
                                                            self.NUM_HOSTS)
    self.assertEqual(counts, [len(records) for records in kept])
    return counts

  def test_imagenet_training_over_1024_hosts(self):
    files = [f"train-{i:05d}-of-01024" for i in range(1024)]
    # 1,281,167 examples: 1024 * 1251 = 1,281,024, and one more in each of the first
    # 143 files.
    examples_per_file = {path: 1251 + (i < 143) for i, path in enumerate(files)}
    self.assertEqual(sum(examples_per_file.values()), 1_281_167)
    counts = self._check_partition(files, examples_per_file)
    self.assertEqual(sorted(set(counts)), [1251, 1252])

  def test_imagenet_validation_over_1024_hosts_scores_each_example_once(self):
    files = [f"validation-{i:05d}-of-00128" for i in range(128)]
    examples_per_file = {path: 390 + (i < 80) for i, path in enumerate(files)}
    self.assertEqual(sum(examples_per_file.values()), 50_000)
    counts = self._check_partition(files, examples_per_file)
    # 8 hosts share each file: 48 or 49 examples each, instead of every host
    # reading all 128 files to keep 1/1024 of them.
    self.assertEqual(sorted(set(counts)), [48, 49])
    global_batch = 4 * self.NUM_HOSTS  # 4 replicas per host, 1 example each
    steps = input_pipeline.padded_eval_steps(counts, global_batch)
    self.assertEqual(steps, 13)  # ceil(49 / 4)
    # Each host's padded batches hold all of its examples, and its padding only.
    per_host_step = global_batch // self.NUM_HOSTS
    self.assertTrue(all(count <= steps * per_host_step for count in counts))
    self.assertEqual(sum(counts), 50_000)

  def test_uneven_sharers_when_hosts_do_not_divide_over_files(self):
    files = [f"validation-{i:05d}-of-00128" for i in range(128)]
    examples_per_file = {path: 390 + (i < 80) for i, path in enumerate(files)}
    shards = [pipeline.host_shard(files, 200, host)
              for host in range(200)]
    self.assertEqual({shard.num_record_shards for shard in shards}, {1, 2})
    counts = pipeline.example_counts_by_host(files, examples_per_file,
                                                            200)
    self.assertEqual(sum(counts), 50_000)
    self.assertTrue(all(len(shard.files) == 1 for shard in shards))


class SkippedImageCounterTest(tf.test.TestCase):
  """The counter stays a host-side resource whatever strategy scope it is made in."""

  def _write_records(self, records):
    path = os.path.join(self.get_temp_dir(), "counted-00000-of-00001")
    with tf.io.TFRecordWriter(path) as writer:
      for label, image_bytes in enumerate(records):
        writer.write(schema.make_example(image_bytes, label, 24, 32,
                                         filename=f"{label}.jpg").SerializeToString())
    return path

  def test_counts_eagerly_and_in_a_dataset(self):
    counter = input_pipeline.SkippedImageCounter()
    self.assertEqual(counter.count(), 0)
    self.assertEqual(int(counter.note_skipped("a.jpg")), 1)
    totals = tf.data.Dataset.from_tensor_slices(["b.jpg", "c.jpg"]).map(
        counter.note_skipped)
    self.assertCountEqual([int(t) for t in totals], [2, 3])
    self.assertEqual(counter.count(), 3)

  def test_made_in_a_mirrored_scope_it_stays_on_the_host(self):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    good = _jpeg(1)
    path = self._write_records([good, b"", good, bad_images.truncated(good),
                                bad_images.jpeg_with_corrupt_huffman_table(good)])
    with strategy.scope():
      counter = input_pipeline.SkippedImageCounter()
      dataset = input_pipeline.create_tfrecord_dataset(path, **_pipeline_options(
          is_training=False, batch_size=1, image_size=IMAGE_SIZE,
          drop_remainder=False, skipped_image_counter=counter))
      resource = counter._resource  # pylint: disable=protected-access
      self.assertNotIsInstance(resource, tf.distribute.DistributedValues)
      self.assertEqual(tf.DeviceSpec.from_string(counter.device).device_type, "CPU")
      self.assertEqual(tf.DeviceSpec.from_string(counter.device).device_index, 0)
      self.assertCountEqual(_labels(dataset), [0, 2])
    self.assertEqual(counter.count(), 3)
    # Distributed to the replicas, the pipeline still counts on the host.
    distributed = strategy.experimental_distribute_dataset(
        input_pipeline.create_tfrecord_dataset(path, **_pipeline_options(
            is_training=False, batch_size=2, image_size=IMAGE_SIZE,
            drop_remainder=False, skipped_image_counter=counter)))
    for _ in distributed:
      pass
    self.assertEqual(counter.count(), 6)

  def test_goes_through_no_variable_creator(self):
    # Strategies place variables through the variable creator stack; TPUStrategy's
    # puts them on the TPU whatever tf.device says. A creator that refuses all
    # variables stands in for it: the counter must not need one.
    created = []

    def refuse_variables(next_creator, **kwargs):
      del next_creator
      created.append(kwargs.get("name"))
      raise AssertionError("the counter must not create a tf.Variable")

    with tf.variable_creator_scope(refuse_variables):
      counter = input_pipeline.SkippedImageCounter()
      counted = tf.data.Dataset.from_tensor_slices(["x.jpg"]).map(counter.note_skipped)
      self.assertEqual([int(t) for t in counted], [1])
    self.assertEqual(created, [])
    self.assertEqual(counter.count(), 1)

  def test_made_inside_a_tf_function(self):
    made = []

    @tf.function
    def build():
      made.append(input_pipeline.SkippedImageCounter())
      return tf.constant(0)

    build()
    made[0].note_skipped("y.jpg")
    self.assertEqual(made[0].count(), 1)


class PaddedEvalStepsTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("partial_last_batch", [15], 4, 4),
      ("whole_batches_no_padding_step", [16], 4, 4),
      ("one_over", [17], 4, 5),
      ("longest_host", [10, 9], 8, 3),  # 4 per host and step: ceil(10 / 4)
      ("empty_host_runs_every_step", [5, 0], 2, 5),
      ("imagenet_one_host", [50_000], 4096, 13),  # 12 whole steps and 848
      ("imagenet_128_hosts", [391] * 127 + [343], 4096, 13))  # 32 per host and step
  def test_longest_host_sets_the_steps(self, counts, global_batch, expected):
    self.assertEqual(input_pipeline.padded_eval_steps(counts, global_batch), expected)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "does not divide over 3"):
      input_pipeline.padded_eval_steps([4, 4, 4], 8)
    with self.assertRaisesRegex(input_pipeline.DataError, "no examples"):
      input_pipeline.padded_eval_steps([0, 0], 8)


class SyntheticTest(tf.test.TestCase):

  def test_shapes_and_fixed_labels(self):
    dataset = input_pipeline.create_synthetic_dataset(
        batch_size=6, image_size=8, num_classes=4, dtype=tf.bfloat16)
    (images, labels), (images2, labels2) = list(dataset.take(2))
    self.assertEqual(images.shape, (6, 8, 8, 3))
    self.assertEqual(images.dtype, tf.bfloat16)
    self.assertAllEqual(labels, [0, 1, 2, 3, 0, 1])
    self.assertAllEqual(images, images2)
    self.assertAllEqual(labels, labels2)


class TfdsSourceTest(tf.test.TestCase):

  def test_padded_eval_over_two_hosts_covers_every_example_once(self):
    data_dir = self.get_temp_dir()
    name = toy_tfds.prepare_toy_tfds(data_dir, {"validation": 11}, num_shards=3)
    split_info = tfds_source.load_tfds_builder(name, data_dir).info.splits["validation"]
    counts = tfds_source.host_example_counts(split_info, 2)
    self.assertEqual(sum(counts), 11)
    steps = input_pipeline.padded_eval_steps(counts, 4)  # 2 hosts of 1 replica
    # Files of 4, 3 and 4 examples: host 0 reads files 0 and 2, host 1 file 1.
    self.assertEqual(counts, [8, 3])
    self.assertEqual(steps, 4)
    seen = []
    for host in range(2):
      (images, labels, weights), num_batches = _concatenated(
          input_pipeline.create_tfds_dataset(
              name, data_dir, "validation", **_pipeline_options(
                  is_training=False, batch_size=2, image_size=IMAGE_SIZE,
                  input_context=_host_context(2, host), pad_to_batches=steps)))
      self.assertEqual(num_batches, steps)
      self.assertEqual(weights.sum(), counts[host])
      self.assertAllEqual(images[weights == 0.0],
                          np.zeros((int((weights == 0).sum()), IMAGE_SIZE,
                                    IMAGE_SIZE, 3)))
      seen.append(labels[weights == 1.0])
    self.assertAllEqual(np.sort(np.concatenate(seen)), np.arange(11))

  def test_missing_data_dir_is_named_error(self):
    missing = os.path.join(self.get_temp_dir(), "no_tfds_here")
    with self.assertRaisesRegex(input_pipeline.DataError, "no_tfds_here"):
      input_pipeline.create_tfds_dataset("imagenet2012", missing, "train",
                                         **_pipeline_options(is_training=True,
                                                             batch_size=2, image_size=8))

  def test_unprepared_builder_is_named_error(self):
    with self.assertRaisesRegex(input_pipeline.DataError, "not prepared"):
      input_pipeline.create_tfds_dataset("mnist", self.get_temp_dir(), "train",
                                         **_pipeline_options(is_training=True,
                                                             batch_size=2, image_size=8))


if __name__ == "__main__":
  tf.test.main()
