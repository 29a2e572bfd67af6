"""Tests for input_pipeline.digits: the embedded default data set."""

from tests import logical_devices

logical_devices.configure_logical_cpus()

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import os

import numpy as np
import tensorflow as tf

import input_pipeline
from input_pipeline import digits


class DigitsTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.output_dir = os.path.join(tf.compat.v1.test.get_temp_dir(), "digits_records")
    cls.spec = input_pipeline.prepare_digits_records(cls.output_dir, image_size=32)

  def test_spec_counts_and_classes(self):
    spec = self.spec
    self.assertEqual(spec.num_train_examples + spec.num_validation_examples, 1797)
    self.assertBetween(spec.num_validation_examples / 1797, 0.19, 0.21)
    self.assertEqual(spec.num_classes, 10)
    self.assertEqual(spec.class_names, tuple(str(i) for i in range(10)))
    self.assertLen(tf.io.gfile.glob(spec.train_file_pattern), 8)
    self.assertLen(tf.io.gfile.glob(spec.validation_file_pattern), 4)

  def test_split_is_stratified_and_disjoint(self):
    labels = np.arange(100) % 10
    train, validation = digits.split_indices(labels, 0.2, seed=0)
    self.assertEmpty(set(train) & set(validation))
    self.assertLen(set(train) | set(validation), 100)
    self.assertAllEqual(np.bincount(labels[validation]), [2] * 10)
    again, _ = digits.split_indices(labels, 0.2, seed=0)
    self.assertAllEqual(train, again)

  def test_second_call_reuses_records(self):
    shard = tf.io.gfile.glob(self.spec.train_file_pattern)[0]
    before = os.stat(shard).st_mtime_ns
    again = input_pipeline.prepare_digits_records(self.output_dir, image_size=32)
    self.assertEqual(again, self.spec)
    self.assertEqual(os.stat(shard).st_mtime_ns, before)

  def test_interrupted_write_is_redone(self):
    output_dir = os.path.join(self.get_temp_dir(), "interrupted")
    spec = input_pipeline.prepare_digits_records(output_dir, image_size=16,
                                                 num_train_shards=2,
                                                 num_validation_shards=1)
    os.remove(os.path.join(output_dir, digits.COMPLETION_MARKER))  # as after a crash
    with open(tf.io.gfile.glob(spec.train_file_pattern)[0], "wb") as f:
      f.write(b"half a shard")
    again = input_pipeline.prepare_digits_records(output_dir, image_size=16,
                                                  num_train_shards=2,
                                                  num_validation_shards=1)
    self.assertEqual(again, spec)
    with open(os.path.join(output_dir, digits.COMPLETION_MARKER)) as f:
      self.assertEqual(json.load(f)["image_size"], 16)
    count = sum(1 for _ in tf.data.TFRecordDataset(
        tf.io.gfile.glob(spec.train_file_pattern)))
    self.assertEqual(count, spec.num_train_examples)

  def test_pipeline_reads_digits(self):
    train = input_pipeline.create_tfrecord_dataset(
        self.spec.train_file_pattern,
        stream=input_pipeline.StreamOptions(is_training=True, shuffle_seed=0),
        preprocess=input_pipeline.PreprocessConfig(
            image_size=32, area_range=input_pipeline.DIGITS_AREA_RANGE),
        batch=input_pipeline.BatchOptions(batch_size=16))
    images, labels = next(iter(train))
    self.assertEqual(images.shape, (16, 32, 32, 3))
    self.assertTrue(np.all((labels.numpy() >= 0) & (labels.numpy() < 10)))
    validation = input_pipeline.create_tfrecord_dataset(
        self.spec.validation_file_pattern,
        stream=input_pipeline.StreamOptions(is_training=False),
        preprocess=input_pipeline.PreprocessConfig(image_size=32),
        batch=input_pipeline.BatchOptions(batch_size=16, drop_remainder=False))
    all_labels = np.concatenate([l.numpy() for _, l in validation])
    self.assertLen(all_labels, self.spec.num_validation_examples)
    self.assertLen(np.unique(all_labels), 10)

  def test_rendered_digit_keeps_its_shape(self):
    eight_by_eight = np.zeros((8, 8))
    eight_by_eight[:, 3:5] = 16  # a vertical stroke
    image = np.asarray(digits.render_digit(eight_by_eight, 32))
    self.assertEqual(image.shape, (32, 32, 3))
    self.assertGreater(image[:, 14:18].mean(), 200)
    self.assertLess(image[:, :8].mean(), 30)


if __name__ == "__main__":
  tf.test.main()
