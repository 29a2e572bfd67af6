"""Tests for input_pipeline.write_tfrecords: image folders -> ImageNet-schema shards."""

from tests import logical_devices

logical_devices.configure_logical_cpus()

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import os

import numpy as np
import tensorflow as tf
from PIL import Image

import input_pipeline
from input_pipeline import dataset_info
from input_pipeline import schema
from input_pipeline import write_tfrecords


def _save(path, seed, image_format, size=(20, 12)):
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
  Image.fromarray(pixels).save(path, format=image_format)


def _read_examples(pattern):
  examples = []
  for path in sorted(tf.io.gfile.glob(pattern)):
    for record in tf.data.TFRecordDataset(path):
      examples.append(tf.train.Example.FromString(record.numpy()).features.feature)
  return examples


class WriteTfrecordsTest(tf.test.TestCase):

  def _image_folder(self):
    root = os.path.join(self.get_temp_dir(), "images")
    for name, count in (("cat", 3), ("dog", 4)):
      os.makedirs(os.path.join(root, name), exist_ok=True)
      for i in range(count):
        _save(os.path.join(root, name, f"{name}{i}.jpg"), i, "JPEG")
    _save(os.path.join(root, "dog", "dog_png.png"), 9, "PNG")
    return root

  def test_writes_schema_shards_and_info(self):
    root = self._image_folder()
    output = os.path.join(self.get_temp_dir(), "records")
    info = write_tfrecords.write_image_folder(root, output, "train", num_shards=3,
                                              show_progress=False)
    self.assertEqual(info["class_names"], ["cat", "dog"])
    self.assertEqual(info["splits"]["train"]["num_examples"], 8)
    self.assertEqual(sorted(info["splits"]["train"]["shards"]),
                     [f"train-0000{i}-of-00003" for i in range(3)])
    with open(os.path.join(output, "dataset_info.json")) as f:
      self.assertEqual(json.load(f), info)
    examples = _read_examples(os.path.join(output, "train-*"))
    self.assertLen(examples, 8)
    for example in examples:
      filename = example[schema.FILENAME].bytes_list.value[0].decode()
      label = example[schema.LABEL].int64_list.value[0]
      self.assertEqual(label, 1 if filename.startswith("cat") else 2)  # 1-based
      self.assertEqual(example[schema.FORMAT].bytes_list.value, [b"JPEG"])
      encoded = example[schema.ENCODED_IMAGE].bytes_list.value[0]
      self.assertTrue(encoded.startswith(b"\xff\xd8\xff"))  # PNG re-encoded as JPEG
      decoded = tf.io.decode_jpeg(encoded)
      self.assertEqual(decoded.shape, (example[schema.HEIGHT].int64_list.value[0],
                                       example[schema.WIDTH].int64_list.value[0], 3))
      if filename.endswith(".jpg"):  # JPEG files are stored byte for byte
        with open(os.path.join(root, filename[:3], filename), "rb") as f:
          self.assertEqual(encoded, f.read())
    counts = dataset_info.shard_example_counts(
        sorted(tf.io.gfile.glob(os.path.join(output, "train-*"))))
    self.assertEqual(sum(counts.values()), 8)

  def test_records_feed_the_pipeline(self):
    output = os.path.join(self.get_temp_dir(), "records")
    write_tfrecords.write_image_folder(self._image_folder(), output, "validation",
                                       num_shards=2, show_progress=False)
    dataset = input_pipeline.create_tfrecord_dataset(
        os.path.join(output, "validation-*"),
        stream=input_pipeline.StreamOptions(is_training=False),
        preprocess=input_pipeline.PreprocessConfig(image_size=8),
        batch=input_pipeline.BatchOptions(batch_size=8))
    _, labels = next(iter(dataset))
    self.assertCountEqual(labels.numpy(), [0] * 3 + [1] * 5)

  def test_command_line(self):
    output = os.path.join(self.get_temp_dir(), "cli_records")
    write_tfrecords.main([f"--image_dir={self._image_folder()}", f"--output_dir={output}",
                          "--split=train", "--num_shards=2"])
    self.assertLen(tf.io.gfile.glob(os.path.join(output, "train-*")), 2)

  def test_rerun_is_identical(self):
    root = self._image_folder()
    first = os.path.join(self.get_temp_dir(), "first")
    second = os.path.join(self.get_temp_dir(), "second")
    for output in (first, second):
      write_tfrecords.write_image_folder(root, output, "train", num_shards=2,
                                         show_progress=False)
    for name in ("train-00000-of-00002", "train-00001-of-00002"):
      with open(os.path.join(first, name), "rb") as a, open(
          os.path.join(second, name), "rb") as b:
        self.assertEqual(a.read(), b.read())

  def test_empty_folder_is_named_error(self):
    empty = os.path.join(self.get_temp_dir(), "empty_images")
    os.makedirs(os.path.join(empty, "some_class"), exist_ok=True)
    with self.assertRaisesRegex(input_pipeline.DataError, "empty_images"):
      write_tfrecords.write_image_folder(empty, self.get_temp_dir(), "train",
                                         num_shards=1, show_progress=False)

  def test_unreadable_image_is_named_error(self):
    root = self._image_folder()
    with open(os.path.join(root, "cat", "broken.jpg"), "wb") as f:
      f.write(b"not a jpeg")
    with self.assertRaisesRegex(input_pipeline.DataError, "broken.jpg"):
      write_tfrecords.write_image_folder(root, os.path.join(self.get_temp_dir(), "o"),
                                         "train", num_shards=1, show_progress=False)


if __name__ == "__main__":
  tf.test.main()
