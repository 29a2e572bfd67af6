"""The embedded default data set: scikit-learn's 8x8 digits as ImageNet-schema records.

`load_digits` ships with scikit-learn (1797 labelled images, 10 classes), so the whole
project trains end to end with no download. The images go through the same path as a
real data set: rendered as RGB JPEG files in class folders, written to shards by
`write_tfrecords.write_image_folder`, read back by the ImageNet pipeline.
"""

import dataclasses
import json
import os
import tempfile

import numpy as np
import tensorflow as tf
from PIL import Image

from input_pipeline import dataset_info
from input_pipeline import write_tfrecords

# Written last: its presence means every shard and dataset_info.json are complete.
COMPLETION_MARKER = "digits_records_complete.json"
TRAIN_SPLIT = "train"
VALIDATION_SPLIT = "validation"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a trainer needs to read a written data set."""
  train_file_pattern: str
  validation_file_pattern: str
  num_train_examples: int
  num_validation_examples: int
  num_classes: int
  class_names: tuple
  image_size: int  # side of the stored images, in pixels


def render_digit(pixels_0_to_16, image_size):
  """An 8x8 array of ink levels 0..16 -> an RGB PIL image of image_size x image_size."""
  grey = np.round(np.asarray(pixels_0_to_16, np.float64) * (255.0 / 16.0)).astype(np.uint8)
  # Bicubic upscaling gives smooth strokes rather than 4x4 blocks, which JPEG keeps better.
  return Image.fromarray(grey, mode="L").resize((image_size, image_size),
                                                Image.BICUBIC).convert("RGB")


def split_indices(labels, validation_fraction, seed):
  """Deterministic per-class split: returns (train_indices, validation_indices)."""
  rng = np.random.default_rng(seed)
  train, validation = [], []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    num_validation = int(round(len(members) * validation_fraction))
    validation.extend(members[:num_validation])
    train.extend(members[num_validation:])
  return np.sort(train), np.sort(validation)


def _spec_from_info(output_dir, info, image_size):
  splits = info["splits"]
  return DatasetSpec(
      train_file_pattern=os.path.join(output_dir, f"{TRAIN_SPLIT}-*"),
      validation_file_pattern=os.path.join(output_dir, f"{VALIDATION_SPLIT}-*"),
      num_train_examples=splits[TRAIN_SPLIT]["num_examples"],
      num_validation_examples=splits[VALIDATION_SPLIT]["num_examples"],
      num_classes=info["num_classes"],
      class_names=tuple(info["class_names"]),
      image_size=image_size)


def prepare_digits_records(output_dir, image_size=32, *, validation_fraction=0.2,
                           num_train_shards=8, num_validation_shards=4, seed=0,
                           show_progress=False):
  """Writes the digits data set as TFRecords under `output_dir` (once) and describes it.

  Idempotent: a completion marker is written after everything else, so a second call
  with the same arguments reuses the records, and a call after a crash mid-write (no
  marker) rewrites them from scratch.

  Args:
    output_dir: folder for `train-*`, `validation-*` and `dataset_info.json`.
    image_size: side of the rendered RGB images (the 8x8 digits are upscaled).
    validation_fraction: share of each class held out, chosen with `seed`.
    num_train_shards, num_validation_shards: shard counts; several shards let per-host
      sharding and parallel interleave be exercised even on this tiny set.
    seed: fixes the split and the example order in the shards.
    show_progress: show the writer's progress bars.

  Returns:
    A `DatasetSpec`: train/validation file patterns, example counts, classes.
  """
  settings = {"image_size": image_size, "validation_fraction": validation_fraction,
              "num_train_shards": num_train_shards,
              "num_validation_shards": num_validation_shards, "seed": seed}
  marker_path = os.path.join(output_dir, COMPLETION_MARKER)
  if tf.io.gfile.exists(marker_path):
    with tf.io.gfile.GFile(marker_path, "r") as f:
      if json.load(f) == settings:
        return _spec_from_info(output_dir, dataset_info.read_dataset_info(output_dir),
                               image_size)
  _remove_previous_records(output_dir)

  from sklearn.datasets import load_digits  # Imported here: only this function needs it.
  digits = load_digits()
  class_names = [str(c) for c in digits.target_names]
  train_indices, validation_indices = split_indices(digits.target, validation_fraction,
                                                    seed)
  with tempfile.TemporaryDirectory(prefix="digits_images_") as image_root:
    for split, indices, num_shards in [(TRAIN_SPLIT, train_indices, num_train_shards),
                                       (VALIDATION_SPLIT, validation_indices,
                                        num_validation_shards)]:
      image_dir = os.path.join(image_root, split)
      for name in class_names:
        os.makedirs(os.path.join(image_dir, name))
      for index in indices:
        label = class_names[digits.target[index]]
        render_digit(digits.images[index], image_size).save(
            os.path.join(image_dir, label, f"digit_{index:04d}.png"))
      info = write_tfrecords.write_image_folder(
          image_dir, output_dir, split, num_shards=num_shards, class_names=class_names,
          shuffle_seed=seed, show_progress=show_progress)
  with tf.io.gfile.GFile(marker_path, "w") as f:
    json.dump(settings, f)
  return _spec_from_info(output_dir, info, image_size)


def _remove_previous_records(output_dir):
  """Deletes what an earlier (possibly interrupted) call may have left in output_dir."""
  if not tf.io.gfile.isdir(output_dir):
    return
  for pattern in (f"{TRAIN_SPLIT}-*", f"{VALIDATION_SPLIT}-*",
                  dataset_info.DATASET_INFO_FILENAME, COMPLETION_MARKER):
    for path in tf.io.gfile.glob(os.path.join(output_dir, pattern)):
      tf.io.gfile.remove(path)
