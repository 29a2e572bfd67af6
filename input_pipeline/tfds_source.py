"""The same pipeline over a tensorflow-datasets builder prepared beforehand.

`imagenet2012`, or any image-classification builder with `image` and `label` features,
read from a local `data_dir` (nothing is downloaded at run time: prepare it first with
`tfds build <name> --data_dir=DIR`, with the archives in DIR/downloads/manual for
imagenet2012). The images are read still encoded (`SkipDecoding`), so the fused
decode-and-crop of `preprocessing` applies exactly as for our own TFRecords.
"""

import os
import random

import tensorflow as tf

from input_pipeline import pipeline
from input_pipeline import preprocessing
from input_pipeline.data_error import DataError


def load_tfds_builder(name, data_dir):
  """The prepared builder `name` under `data_dir`, or a DataError saying what to do."""
  import tensorflow_datasets as tfds  # Slow to import; only this module needs it.
  if not data_dir or not tf.io.gfile.isdir(data_dir):
    raise DataError(f"tfds data_dir {data_dir!r} is not a directory; prepare the data "
                    f"set with `tfds build {name} --data_dir=DIR` and pass that DIR.")
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f"tensorflow-datasets has no builder named {name!r}.") from e
  if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    raise DataError(f"{name} is not prepared under {data_dir} (no {builder.data_dir}); "
                    f"run `tfds build {name} --data_dir={data_dir}` first.")
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise DataError(f"{name} has features {list(features)}; an image-classification "
                    "builder with 'image' and 'label' is needed.")
  return builder


def create_tfds_dataset(
    name, data_dir, split, *, is_training, batch_size, image_size, input_context=None,
    shuffle_seed=None, deterministic=None, cache=False, dtype=tf.float32,
    skip_examples=0, cycle_length=16, shuffle_buffer_size=10_000,
    num_parallel_calls=pipeline.AUTOTUNE, area_range=pipeline.IMAGENET_AREA_RANGE,
    aspect_ratio_range=(3 / 4, 4 / 3), max_crop_attempts=10,
    eval_crop_fraction=preprocessing.EVAL_CROP_FRACTION, use_dct_scaling=False,
    resize_method="bilinear", drop_remainder=True, pad_to_batches=None,
    prefetch_batches=pipeline.AUTOTUNE, skipped_image_counter=None):
  """A tfds builder's split -> batches of (images, labels[, weights]).

  See create_tfrecord_dataset for the arguments (pad_to_batches: exactly that many
  batches of (images, labels, weights) for evaluation, padded with weight 0).

  tfds shards per host itself (`ReadConfig(input_context=...)`) and interleaves its
  own files. Labels are tfds's, already 0-based. `skip_examples` skips encoded
  examples, before decoding.

  Raises:
    DataError: data_dir missing, builder unknown or not prepared there.
  """
  import tensorflow_datasets as tfds
  builder = load_tfds_builder(name, data_dir)
  if deterministic is None:
    deterministic = (not is_training) or shuffle_seed is not None
  if shuffle_seed is None:
    shuffle_seed = random.SystemRandom().getrandbits(62)
  read_config = tfds.ReadConfig(
      input_context=input_context, shuffle_seed=shuffle_seed,
      interleave_cycle_length=cycle_length, try_autocache=False)
  records = builder.as_dataset(
      split=split, shuffle_files=is_training, read_config=read_config,
      decoders={"image": tfds.decode.SkipDecoding()})
  records = records.map(lambda example: {"image_bytes": example["image"],
                                         "label": tf.cast(example["label"], tf.int32),
                                         "filename": example.get("file_name", ""),
                                         "bboxes": tf.zeros([0, 4], tf.float32)})
  if cache:
    records = records.cache()
  if is_training:
    records = records.repeat().shuffle(shuffle_buffer_size, seed=shuffle_seed)
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  base_key = tf.constant([shuffle_seed, pipeline_id], tf.int64)
  examples = records.enumerate().skip(skip_examples).map(
      lambda position, example: (tf.random.experimental.stateless_fold_in(
          base_key, position), example))
  return pipeline.decode_and_batch(
      examples, is_training=is_training, batch_size=batch_size, image_size=image_size,
      dtype=dtype, deterministic=deterministic, num_parallel_calls=num_parallel_calls,
      area_range=area_range, aspect_ratio_range=aspect_ratio_range,
      max_crop_attempts=max_crop_attempts, eval_crop_fraction=eval_crop_fraction,
      use_dct_scaling=use_dct_scaling, resize_method=resize_method,
      drop_remainder=drop_remainder, pad_to_batches=pad_to_batches,
      prefetch_batches=prefetch_batches,
      skipped_image_counter=skipped_image_counter or pipeline.SkippedImageCounter())


def host_example_counts(split_info, num_input_pipelines):
  """Examples each input pipeline reads of a tfds split, by pipeline id.

  tfds gives host i of n the files i, i + n, ... of the split
  (`ReadConfig(input_context=...)`); their lengths are in the split's metadata
  (`builder.info.splits[split]`, already loaded by the caller), so nothing is read.
  """
  files_taken = [instruction.take for instruction in split_info.file_instructions]
  return [sum(files_taken[host::num_input_pipelines])
          for host in range(num_input_pipelines)]
