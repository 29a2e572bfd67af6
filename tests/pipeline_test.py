"""Tests for input_pipeline.pipeline (and the synthetic and tfds sources)."""

from tests import logical_devices

logical_devices.configure_logical_cpus()

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import io
import os

import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image

import input_pipeline
from input_pipeline import dataset_info
from input_pipeline import schema

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
    return input_pipeline.create_tfrecord_dataset(pattern, **defaults)

  def test_eval_shapes_labels_and_one_pass(self):
    pattern = _write_shards(self.get_temp_dir(), 3, 5)
    dataset = self._dataset(pattern, drop_remainder=False)
    images, labels = next(iter(dataset))
    self.assertEqual(images.shape, (4, IMAGE_SIZE, IMAGE_SIZE, 3))
    self.assertEqual(images.dtype, tf.float32)
    self.assertEqual(labels.dtype, tf.int32)
    self.assertCountEqual(_labels(dataset), range(15))
    self.assertLen(_labels(self._dataset(pattern)), 12)  # drop_remainder: 3 full batches

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
    counter = input_pipeline.SkippedImageCounter()
    for is_training in (False, True):
      dataset = self._dataset(path, is_training=is_training, batch_size=1,
                              drop_remainder=False, skipped_image_counter=counter)
      labels = _labels(dataset.take(3))
      self.assertCountEqual(labels, [0, 3, 4])
    self.assertEqual(counter.count(), 4)  # two bad records in each of two passes

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

  def test_bfloat16_output(self):
    pattern = _write_shards(self.get_temp_dir(), 1, 4)
    images, _ = next(iter(self._dataset(pattern, is_training=True, dtype=tf.bfloat16)))
    self.assertEqual(images.dtype, tf.bfloat16)

  def test_distributed_with_device_prefetch(self):
    pattern = _write_shards(self.get_temp_dir(), 4, 4)
    strategy = logical_devices.cpu_mirrored_strategy(2)
    dataset_fn, options = input_pipeline.distributed_dataset_fn(
        functools.partial(input_pipeline.create_tfrecord_dataset, pattern,
                          is_training=True, image_size=IMAGE_SIZE, shuffle_seed=0),
        global_batch_size=8)
    self.assertTrue(options.experimental_fetch_to_device)
    distributed = strategy.distribute_datasets_from_function(dataset_fn, options)
    images, labels = next(iter(distributed))
    per_replica = strategy.experimental_local_results(images)
    self.assertLen(per_replica, 2)
    self.assertEqual(per_replica[0].shape, (4, IMAGE_SIZE, IMAGE_SIZE, 3))
    self.assertEqual(strategy.experimental_local_results(labels)[1].shape, (4,))


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

  def test_missing_data_dir_is_named_error(self):
    missing = os.path.join(self.get_temp_dir(), "no_tfds_here")
    with self.assertRaisesRegex(input_pipeline.DataError, "no_tfds_here"):
      input_pipeline.create_tfds_dataset("imagenet2012", missing, "train",
                                         is_training=True, batch_size=2, image_size=8)

  def test_unprepared_builder_is_named_error(self):
    with self.assertRaisesRegex(input_pipeline.DataError, "not prepared"):
      input_pipeline.create_tfds_dataset("mnist", self.get_temp_dir(), "train",
                                         is_training=True, batch_size=2, image_size=8)


if __name__ == "__main__":
  tf.test.main()
