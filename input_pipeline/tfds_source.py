"""The same pipeline over a tensorflow-datasets builder prepared beforehand.

`imagenet2012`, or any image-classification builder with `image` and `label` features,
read from a local `data_dir` (nothing is downloaded at run time: prepare it first with
`tfds build <name> --data_dir=DIR`, with the archives in DIR/downloads/manual for
imagenet2012). The images are read still encoded (`SkipDecoding`), so the fused
decode-and-crop of `preprocessing` applies exactly as for our own TFRecords.
"""

import os

import tensorflow as tf

from input_pipeline import pipeline
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


def _example_dict(example):
  """A tfds example (image still encoded) -> the keys of `schema.parse_example`."""
  return {"image_bytes": example["image"],
          "label": tf.cast(example["label"], tf.int32),
          "filename": example.get("file_name", ""),
          "bboxes": tf.zeros([0, 4], tf.float32)}


def tfds_stream(name, data_dir, split, stream, read=pipeline.ReadOptions(),
                input_context=None):
  """A tfds builder's split -> this host's (seed [2], example dict) stream.

  The same example keys as `schema.parse_example`, so the rest of the pipeline
  (`pipeline.batches_from_stream`) does not know where the records came from. tfds
  shards per host itself (`ReadConfig(input_context=...)`) and interleaves its own
  files; of `read` it uses cycle_length, shuffle_buffer_size and cache. Labels are
  tfds's, already 0-based. `stream.skip_examples` skips encoded examples, before
  decoding. With `stream.service_epoch`, one epoch of the whole split for the tf.data
  service (see `service_epoch`); `input_context` is then not used.

  Raises:
    DataError: data_dir missing, builder unknown or not prepared there.
  """
  import tensorflow_datasets as tfds
  stream = stream.resolved()
  builder = load_tfds_builder(name, data_dir)
  if stream.service_epoch:
    return service_epoch(builder, split, stream, read)
  read_config = tfds.ReadConfig(
      input_context=input_context, shuffle_seed=stream.shuffle_seed,
      interleave_cycle_length=read.cycle_length, try_autocache=False)
  records = builder.as_dataset(
      split=split, shuffle_files=stream.is_training, read_config=read_config,
      decoders={"image": tfds.decode.SkipDecoding()})
  records = records.map(_example_dict)
  if read.cache:
    records = records.cache()
  if stream.is_training:
    records = records.repeat().shuffle(read.shuffle_buffer_size,
                                       seed=stream.shuffle_seed)
  base_key = pipeline.host_stream_key(stream, input_context)
  return records.enumerate().skip(stream.skip_examples).map(
      lambda position, example: (tf.random.experimental.stateless_fold_in(
          base_key, position), example))


def service_epoch(builder, split, stream, read=pipeline.ReadOptions()):
  """One epoch of a tfds split, made to be split by file among tf.data service workers.

  `builder.as_dataset` cannot be split by the service: it asserts the split's example
  count, so a worker handed some of the files fails ("Input dataset was expected to
  contain 11 elements but contained only 8 elements", tf 2.20 / tfds 4.9), and with
  `shuffle_files` the file shuffle draws every file into the first worker. But a
  prepared tfds split is TFRecord files of serialized examples (the builder's
  `file_format`, checked here), listed with their paths in the split's file
  instructions, so the TFRecord stream's service epoch
  (`pipeline.service_epoch_records`) applies to them as to our own shards, and the
  builder's own feature spec parses the records (plain TensorFlow ops, which the
  service can serialise; the image stays encoded). The workers open the files by the
  paths this host sees: they must read the same data_dir (a shared file system, or
  GCS).

  Raises:
    DataError: the split is not stored as TFRecord files.
  """
  import tensorflow_datasets as tfds
  file_format = builder.info.file_format
  if file_format is not None and file_format != tfds.core.FileFormat.TFRECORD:
    raise DataError(f"{builder.name} is stored as {file_format.value} files; the "
                    "tf.data service reads tfds data sets stored as TFRecord files "
                    f"(rebuild it with `tfds build {builder.name} "
                    "--file_format=tfrecord`).")
  instructions = builder.info.splits[split].file_instructions
  # (path, records to skip, records to take) per file: a sub-split ("train[:10%]")
  # reads parts of files.
  files = tf.data.Dataset.from_tensor_slices((
      [instruction.filename for instruction in instructions],
      tf.constant([instruction.skip for instruction in instructions], tf.int64),
      tf.constant([instruction.take for instruction in instructions], tf.int64)))

  def interleave_files(file_parts):
    return file_parts.interleave(
        lambda path, skip, take: tf.data.TFRecordDataset(
            path, buffer_size=read.read_buffer_bytes).skip(skip).take(take),
        cycle_length=read.cycle_length, block_length=read.block_length,
        num_parallel_calls=read.num_parallel_reads, deterministic=False)

  features = builder.info.features
  records = pipeline.service_epoch_records(files, interleave_files, read,
                                           pipeline.host_stream_key(stream, None))
  return records.map(
      lambda seed, record: (seed, _example_dict(features.deserialize_example(
          record, decoders={"image": tfds.decode.SkipDecoding()}))),
      num_parallel_calls=read.num_parallel_calls, deterministic=False)


def create_tfds_dataset(name, data_dir, split, *, stream, preprocess, batch,
                        read=pipeline.ReadOptions(), input_context=None,
                        skipped_image_counter=None):
  """A tfds builder's split -> batches of (images, labels[, weights]).

  `tfds_stream`, then `pipeline.batches_from_stream`; see them for the arguments.

  Raises:
    DataError: data_dir missing, builder unknown or not prepared there.
  """
  stream = stream.resolved()
  examples = tfds_stream(name, data_dir, split, stream, read, input_context)
  return pipeline.batches_from_stream(examples, stream, preprocess, batch,
                                      num_parallel_calls=read.num_parallel_calls,
                                      skipped_image_counter=skipped_image_counter)


def host_example_counts(split_info, num_input_pipelines):
  """Examples each input pipeline reads of a tfds split, by pipeline id.

  tfds gives host i of n the files i, i + n, ... of the split
  (`ReadConfig(input_context=...)`); their lengths are in the split's metadata
  (`builder.info.splits[split]`, already loaded by the caller), so nothing is read.
  """
  files_taken = [instruction.take for instruction in split_info.file_instructions]
  return [sum(files_taken[host::num_input_pipelines])
          for host in range(num_input_pipelines)]
