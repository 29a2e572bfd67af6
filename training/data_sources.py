"""Turns the configured data set into the trainer's `DataSource`.

This is where a data-set name meets files: the trainer sees only dataset functions and
example counts, and the input pipeline sees only file patterns and batch sizes.

Evaluation is padded (see input_pipeline.padded_eval_steps): every host's pipeline yields
`steps * replicas per host` full per-replica batches of (images, labels, weights), where
`steps`, the same on every host, covers the host with the most examples.
"""

import functools
import os

import tensorflow as tf

import input_pipeline
from input_pipeline import dataset_info as dataset_info_lib
from input_pipeline import tfds_source
from training.trainer import DataSource

# ImageNet-2012 (ILSVRC) split sizes, used when the shards carry no dataset_info.json.
IMAGENET_TRAIN_EXAMPLES = 1_281_167
IMAGENET_EVAL_EXAMPLES = 50_000
SYNTHETIC_EXAMPLES_PER_EPOCH = IMAGENET_TRAIN_EXAMPLES
SYNTHETIC_EVAL_BATCHES = 4


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


def _split_counts(data_dir, train_default, eval_default):
  info = dataset_info_lib.read_dataset_info(data_dir)
  if not info:
    return train_default, eval_default
  splits = info["splits"]
  return (splits.get("train", {}).get("num_examples", train_default),
          splits.get("validation", {}).get("num_examples", eval_default))


def _tfrecord_source(config, train_pattern, eval_pattern, num_train, num_eval,
                     area_range=input_pipeline.IMAGENET_AREA_RANGE):
  dtype = tf.bfloat16 if config.tpu else tf.float32

  def make_train_dataset(input_context, start_step):
    return input_pipeline.create_tfrecord_dataset(
        train_pattern, is_training=True,
        batch_size=input_context.get_per_replica_batch_size(config.train_batch_size),
        image_size=config.image_size, input_context=input_context,
        shuffle_seed=config.seed, cache=config.cache_dataset, dtype=dtype,
        skip_examples=_per_host_examples(input_context, config.train_batch_size,
                                         start_step), area_range=area_range)

  eval_steps = _padded_eval_steps_fn(
      functools.partial(input_pipeline.host_example_counts, eval_pattern),
      config.eval_batch_size)

  def make_eval_dataset(input_context):
    return input_pipeline.create_tfrecord_dataset(
        eval_pattern, is_training=False,
        batch_size=input_context.get_per_replica_batch_size(config.eval_batch_size),
        image_size=config.image_size, input_context=input_context, dtype=dtype,
        pad_to_batches=_eval_batches_per_host(input_context, eval_steps(input_context)))

  return DataSource(make_train_dataset, make_eval_dataset, num_train_examples=num_train,
                    num_eval_examples=num_eval, eval_steps=eval_steps,
                    input_options=input_pipeline.device_input_options())


def _tfds_source(config):
  name = config.dataset[len("tfds/"):]
  dtype = tf.bfloat16 if config.tpu else tf.float32
  splits = tfds_source.load_tfds_builder(name, config.data_dir).info.splits
  eval_split = "validation" if "validation" in splits else "test"
  num_train, num_eval = splits["train"].num_examples, splits[eval_split].num_examples

  def make_train_dataset(input_context, start_step):
    return input_pipeline.create_tfds_dataset(
        name, config.data_dir, "train", is_training=True,
        batch_size=input_context.get_per_replica_batch_size(config.train_batch_size),
        image_size=config.image_size, input_context=input_context,
        shuffle_seed=config.seed, dtype=dtype,
        skip_examples=_per_host_examples(input_context, config.train_batch_size,
                                         start_step))

  eval_steps = _padded_eval_steps_fn(
      functools.partial(tfds_source.host_example_counts, splits[eval_split]),
      config.eval_batch_size)

  def make_eval_dataset(input_context):
    return input_pipeline.create_tfds_dataset(
        name, config.data_dir, eval_split, is_training=False,
        batch_size=input_context.get_per_replica_batch_size(config.eval_batch_size),
        image_size=config.image_size, input_context=input_context, dtype=dtype,
        pad_to_batches=_eval_batches_per_host(input_context, eval_steps(input_context)))

  return DataSource(make_train_dataset, make_eval_dataset, num_train_examples=num_train,
                    num_eval_examples=num_eval, eval_steps=eval_steps,
                    input_options=input_pipeline.device_input_options())


def _synthetic_source(config):
  dtype = tf.bfloat16 if config.tpu else tf.float32

  def make_dataset(input_context, start_step=0, *, batch):
    del start_step  # Every synthetic batch is alike.
    return input_pipeline.create_synthetic_dataset(
        batch_size=input_context.get_per_replica_batch_size(batch),
        image_size=config.image_size, num_classes=config.num_classes, dtype=dtype)

  # Every synthetic batch is full and real: no padding, a fixed number of steps.
  return DataSource(
      lambda ctx, step: make_dataset(ctx, step, batch=config.train_batch_size),
      lambda ctx: make_dataset(ctx, batch=config.eval_batch_size),
      num_train_examples=SYNTHETIC_EXAMPLES_PER_EPOCH,
      num_eval_examples=SYNTHETIC_EVAL_BATCHES * config.eval_batch_size,
      eval_steps=lambda ctx: SYNTHETIC_EVAL_BATCHES,
      input_options=input_pipeline.device_input_options())


def data_source_for(config) -> DataSource:
  """The DataSource for `config.dataset` (see training/config.py for the names)."""
  if config.dataset == "digits":
    # Written once into the TFRecord format under the model dir (or --data_dir).
    records_dir = config.data_dir or os.path.join(config.model_dir, "data")
    spec = input_pipeline.prepare_digits_records(records_dir,
                                                 image_size=config.image_size)
    return _tfrecord_source(config, spec.train_file_pattern,
                            spec.validation_file_pattern, spec.num_train_examples,
                            spec.num_validation_examples,
                            input_pipeline.DIGITS_AREA_RANGE)
  if config.dataset == "imagenet":
    num_train, num_eval = _split_counts(config.data_dir, IMAGENET_TRAIN_EXAMPLES,
                                        IMAGENET_EVAL_EXAMPLES)
    return _tfrecord_source(config, os.path.join(config.data_dir, "train-*"),
                            os.path.join(config.data_dir, "validation-*"),
                            num_train, num_eval)
  if config.dataset == "synthetic":
    return _synthetic_source(config)
  return _tfds_source(config)
