"""Turns the configured data set into the trainer's `DataSource`.

This is where a data-set name meets files: the trainer sees only dataset functions and
example counts, and the input pipeline sees only file patterns and batch sizes.

Evaluation is padded (see input_pipeline.padded_eval_steps): every host's pipeline yields
`steps * replicas per host` full per-replica batches of (images, labels, weights), where
`steps`, the same on every host, covers the host with the most examples.
"""

import dataclasses
import functools
import os

import tensorflow as tf
from absl import logging

import input_pipeline
from input_pipeline import dataset_info as dataset_info_lib
from input_pipeline import tfds_source
from training import config as config_lib
from training import data_service
from training.specs import DataSource

# ImageNet-2012 (ILSVRC) split sizes, used when the shards carry no dataset_info.json.
IMAGENET_TRAIN_EXAMPLES = 1_281_167
IMAGENET_EVAL_EXAMPLES = 50_000
SYNTHETIC_EXAMPLES_PER_EPOCH = IMAGENET_TRAIN_EXAMPLES
SYNTHETIC_EVAL_BATCHES = 4


@dataclasses.dataclass(frozen=True)
class SourceSettings:
  """What the sources read: the config's data and loop sections, and the dtype of
  the synthetic images (chosen by the model's precision). Images read from files
  leave the host as uint8 pixels, whatever the precision: the model normalises them
  on the device (`ImageClassifier.call`), which moves a quarter of float32's bytes
  (half of bfloat16's) and takes the per-pixel float work off the host."""
  data: config_lib.DataConfig
  loop: config_lib.LoopConfig
  input_dtype: tf.DType = tf.float32


def _per_host_examples(input_context, global_batch_size, start_step):
  return start_step * global_batch_size // input_context.num_input_pipelines


def _padded_eval_steps_fn(examples_per_host, global_batch_size):
  """The DataSource's eval_steps(input_context) from a per-host counting function.

  `examples_per_host(num_input_pipelines)` lists each host's example count; it may read
  every evaluation record (shards without dataset_info.json), so it runs once per
  topology, and every host computes the same list, hence the same step count.
  """
  @functools.lru_cache(maxsize=None)
  def steps(num_input_pipelines):
    return input_pipeline.padded_eval_steps(examples_per_host(num_input_pipelines),
                                            global_batch_size)
  return lambda input_context: steps(input_context.num_input_pipelines)


def _eval_batches_per_host(input_context, steps):
  """Per-replica batches one host's eval pipeline yields for `steps` steps."""
  return (steps * input_context.num_replicas_in_sync
          // input_context.num_input_pipelines)


def _split_counts(info, train_default, eval_default):
  if not info:
    return train_default, eval_default
  splits = info["splits"]
  return (splits.get("train", {}).get("num_examples", train_default),
          splits.get("validation", {}).get("num_examples", eval_default))


def check_class_count(num_classes_in_data, num_classes, where):
  """A data set with more classes than the model's output layer is a config error.

  `tf.one_hot` of a label >= num_classes is all zeros: the run would "train" to a
  meaningless accuracy and exit 0.
  """
  if num_classes_in_data is not None and num_classes_in_data > num_classes:
    raise config_lib.ConfigError(
        "num_classes", f"the data in {where} has {num_classes_in_data} classes "
        f"(labels up to {num_classes_in_data - 1}) but the model has {num_classes}; "
        f"pass --num_classes={num_classes_in_data}")


def with_label_check(dataset, num_classes):
  """Fails the stream, naming --num_classes, on a label outside [0, num_classes).

  For data sets whose class count is not written down anywhere; runs on each batch of
  labels (a few integers), after the host's prefetch buffer.
  """
  def check(*batch):
    labels = batch[1]
    in_range = tf.reduce_all((labels >= 0) & (labels < num_classes))
    with tf.control_dependencies([tf.debugging.Assert(
        in_range, [LABEL_OUT_OF_RANGE, num_classes, "; labels seen:", labels],
        summarize=16)]):
      return tuple(tf.identity(t) for t in batch)
  return dataset.map(check)


# The first words of the stream's error for a bad label: main.py turns the error into
# one line that names the flag.
LABEL_OUT_OF_RANGE = "label outside [0, --num_classes):"


def train_stream_options(config, input_context, start_step):
  """The training stream of a `SourceSettings`: seeded, positioned at `start_step`.

  --deterministic_input (default) keeps the order a function of the seed and the
  position, so a run resumed at `start_step` reads what the interrupted run would have.
  """
  if not config.data.deterministic_input:
    logging.warning("--nodeterministic_input: the training stream's order depends on "
                    "read timing, so a resumed run does not continue the interrupted "
                    "run's stream exactly (resume is approximate).")
  return input_pipeline.StreamOptions(
      is_training=True, shuffle_seed=config.loop.seed,
      deterministic=config.data.deterministic_input,
      skip_examples=_per_host_examples(input_context, config.loop.train_batch_size,
                                       start_step))


def batch_options(config, per_replica_batch_size, pad_to_batches=None):
  """`BatchOptions` with the config's tf.data runtime limits."""
  ram_budget_mb = config.data.input_ram_budget_mb
  return input_pipeline.BatchOptions(
      per_replica_batch_size, pad_to_batches=pad_to_batches,
      private_threadpool_size=config.data.input_threadpool_size,
      max_intra_op_parallelism=config.data.input_max_intra_op_parallelism,
      autotune_ram_budget_bytes=None if ram_budget_mb is None else ram_budget_mb << 20)


def _stream_source(config, make_stream, *, num_train, num_eval, eval_host_counts,
                   augmentation=input_pipeline.IMAGENET_AUGMENTATION,
                   check_labels_in_stream=True):
  """The DataSource of a record stream: what every real-data source has in common.

  Args:
    config: a `SourceSettings`.
    make_stream: `make_stream(stream_options, input_context)` -> the host's
      (seed, example dict) stream: the training split when
      `stream_options.is_training`, else the evaluation split.
    num_train, num_eval: examples of each split.
    eval_host_counts: `eval_host_counts(num_input_pipelines)` -> each host's
      evaluation example count.
    augmentation: `input_pipeline.PreprocessConfig` fields of the training
      augmentation (e.g. `input_pipeline.DIGITS_AUGMENTATION`).
    check_labels_in_stream: check each batch's labels against --num_classes (for data
      whose class count is not written down anywhere).
  """
  preprocess = input_pipeline.PreprocessConfig(
      image_size=config.data.image_size, dtype=tf.uint8, **augmentation)

  def checked(dataset):
    if check_labels_in_stream:
      return with_label_check(dataset, config.data.num_classes)
    return dataset

  def batches(stream, batch, input_context):
    stream = stream.resolved()
    return checked(input_pipeline.batches_from_stream(
        make_stream(stream, input_context), stream, preprocess, batch))

  warned_of_service_order = []  # once per source (a run), not per fit segment

  def served_train_dataset(input_context, start_step, batch):
    """The training batches, their examples made by tf.data service workers.

    The service gets the per-example stream, not batches: a job then holds exactly
    one epoch whatever the batch size (a worker batching its own shards would drop
    or pad a partial batch per worker), every host registers the same dataset (so
    the hosts of a run can share one job), and each host batches for its own
    replicas. An element is one preprocessed image, in uint8 pixels (147 KB at 224
    pixels, a quarter of float32's bytes over the network), still large enough that
    the per-element cost of the transfer is small beside its bytes.
    """
    if not warned_of_service_order:
      data_service.warn_not_deterministic(config.loop.seed)
      warned_of_service_order.append(True)
    stream = input_pipeline.StreamOptions(
        is_training=True, shuffle_seed=config.loop.seed, service_epoch=True).resolved()
    # The whole training split, not this host's share: the service splits it among
    # the hosts, as it hands out the shards.
    one_epoch = input_pipeline.examples_from_stream(make_stream(stream, None), stream,
                                                    preprocess)
    examples = data_service.served_epochs(
        one_epoch, config.data.data_service_address,
        job_name=data_service.job_name_for(config.loop.model_dir, start_step,
                                           input_context.num_input_pipelines))
    return checked(input_pipeline.batch_and_prefetch(examples, batch,
                                                     deterministic=False))

  def make_train_dataset(input_context, start_step):
    batch = batch_options(
        config, input_context.get_per_replica_batch_size(config.loop.train_batch_size))
    if config.data.data_service_address:
      return served_train_dataset(input_context, start_step, batch)
    stream = train_stream_options(config, input_context, start_step)
    return batches(stream, batch, input_context)

  eval_steps = _padded_eval_steps_fn(eval_host_counts, config.loop.eval_batch_size)

  def make_eval_dataset(input_context):
    batch = batch_options(
        config, input_context.get_per_replica_batch_size(config.loop.eval_batch_size),
        pad_to_batches=_eval_batches_per_host(input_context, eval_steps(input_context)))
    return batches(input_pipeline.StreamOptions(is_training=False), batch,
                   input_context)

  return DataSource(make_train_dataset, make_eval_dataset, num_train_examples=num_train,
                    num_eval_examples=num_eval, eval_steps=eval_steps,
                    input_options=input_pipeline.device_input_options())


def _tfrecord_source(config, train_pattern, eval_pattern, num_train, num_eval,
                     augmentation=input_pipeline.IMAGENET_AUGMENTATION):
  def make_stream(stream, input_context):
    # --cache_dataset: only the training split is read more than once.
    read = input_pipeline.ReadOptions(cache=config.data.cache_dataset and stream.is_training)
    pattern = train_pattern if stream.is_training else eval_pattern
    return input_pipeline.tfrecord_stream(pattern, stream, read, input_context)

  return _stream_source(
      config, make_stream, num_train=num_train, num_eval=num_eval,
      eval_host_counts=functools.partial(input_pipeline.host_example_counts,
                                         eval_pattern),
      augmentation=augmentation)


def _tfds_source(config):
  name = config.data.dataset[len("tfds/"):]
  info = tfds_source.load_tfds_builder(name, config.data.data_dir).info
  check_class_count(getattr(info.features["label"], "num_classes", None),
                    config.data.num_classes, f"tfds/{name} under {config.data.data_dir}")
  splits = info.splits
  eval_split = "validation" if "validation" in splits else "test"

  def make_stream(stream, input_context):
    split = "train" if stream.is_training else eval_split
    return input_pipeline.tfds_stream(name, config.data.data_dir, split, stream,
                                      input_context=input_context)

  # The class count is checked above, from the builder's metadata.
  return _stream_source(
      config, make_stream, num_train=splits["train"].num_examples,
      num_eval=splits[eval_split].num_examples,
      eval_host_counts=functools.partial(tfds_source.host_example_counts,
                                         splits[eval_split]),
      check_labels_in_stream=False)


def _synthetic_source(config):
  dtype = config.input_dtype

  def make_dataset(input_context, start_step=0, *, batch):
    del start_step  # Every synthetic batch is alike.
    return input_pipeline.create_synthetic_dataset(
        batch_size=input_context.get_per_replica_batch_size(batch),
        image_size=config.data.image_size, num_classes=config.data.num_classes, dtype=dtype)

  # Every synthetic batch is full and real: no padding, a fixed number of steps.
  return DataSource(
      lambda ctx, step: make_dataset(ctx, step, batch=config.loop.train_batch_size),
      lambda ctx: make_dataset(ctx, batch=config.loop.eval_batch_size),
      num_train_examples=SYNTHETIC_EXAMPLES_PER_EPOCH,
      num_eval_examples=SYNTHETIC_EVAL_BATCHES * config.loop.eval_batch_size,
      eval_steps=lambda ctx: SYNTHETIC_EVAL_BATCHES,
      input_options=input_pipeline.device_input_options())


def digits_source(config, records_dir) -> DataSource:
  """The embedded digits, written once as TFRecords into `records_dir` (ours)."""
  spec = input_pipeline.prepare_digits_records(records_dir, image_size=config.data.image_size)
  check_class_count(spec.num_classes, config.data.num_classes, "the embedded digits set")
  return _tfrecord_source(config, spec.train_file_pattern,
                          spec.validation_file_pattern, spec.num_train_examples,
                          spec.num_validation_examples, input_pipeline.DIGITS_AUGMENTATION)


def data_source_for(data, loop, scratch_dir=None,
                    input_dtype=tf.float32) -> DataSource:
  """The DataSource for `data.dataset` (see training/config.py for the names).

  `data` and `loop` are the config's sections. `scratch_dir` is a folder of this
  process's own under the model dir (default: the model dir); the digits are generated
  there, never into a folder the user named. Nothing here writes anywhere else:
  --data_dir is only read. `input_dtype` is the synthetic images' dtype (bfloat16
  when the model computes in it); images read from files are uint8 pixels (see
  `SourceSettings`).
  """
  config = SourceSettings(data, loop, input_dtype)
  if config.data.dataset == "digits":
    records_dir = os.path.join(scratch_dir or config.loop.model_dir, "data")
    return digits_source(config, records_dir)
  if config.data.dataset == "imagenet":
    info = dataset_info_lib.read_dataset_info(config.data.data_dir)
    if info:
      check_class_count(info.get("num_classes"), config.data.num_classes,
                        dataset_info_lib.dataset_info_path(config.data.data_dir))
    num_train, num_eval = _split_counts(info, IMAGENET_TRAIN_EXAMPLES,
                                        IMAGENET_EVAL_EXAMPLES)
    return _tfrecord_source(config, os.path.join(config.data.data_dir, "train-*"),
                            os.path.join(config.data.data_dir, "validation-*"),
                            num_train, num_eval)
  if config.data.dataset == "synthetic":
    return _synthetic_source(config)
  return _tfds_source(config)
