"""Input pipelines: ImageNet-schema TFRecords, tfds builders, synthetic data, digits.

A pipeline is three pieces (see input_pipeline/pipeline.py): a record stream
(`tfrecord_stream`, `tfds_stream`), the per-example preprocessing of a
`PreprocessConfig`, and one batching tail. Each builder returns a `tf.data.Dataset` of
(images, labels) batches given an optional `tf.distribute.InputContext` (for padded
evaluation, (images, labels, weights)); none of them sees the model.
"""

from input_pipeline.data_error import DataError
from input_pipeline.digits import DatasetSpec
from input_pipeline.digits import prepare_digits_records
from input_pipeline.pipeline import DIGITS_AREA_RANGE
from input_pipeline.pipeline import DIGITS_AUGMENTATION
from input_pipeline.pipeline import IMAGENET_AREA_RANGE
from input_pipeline.pipeline import IMAGENET_AUGMENTATION
from input_pipeline.pipeline import BatchOptions
from input_pipeline.pipeline import ReadOptions
from input_pipeline.pipeline import SkippedImageCounter
from input_pipeline.pipeline import StreamOptions
from input_pipeline.pipeline import batch_and_prefetch
from input_pipeline.pipeline import batch_with_padding
from input_pipeline.pipeline import batches_from_stream
from input_pipeline.pipeline import create_tfrecord_dataset
from input_pipeline.pipeline import device_input_options
from input_pipeline.pipeline import distributed_dataset_fn
from input_pipeline.pipeline import examples_from_stream
from input_pipeline.pipeline import host_example_counts
from input_pipeline.pipeline import padded_eval_steps
from input_pipeline.pipeline import preprocess_examples
from input_pipeline.pipeline import tfrecord_stream
from input_pipeline.preprocessing import PreprocessConfig
from input_pipeline.synthetic import create_synthetic_dataset
from input_pipeline.tfds_source import create_tfds_dataset
from input_pipeline.tfds_source import tfds_stream

__all__ = [
    "BatchOptions",
    "DIGITS_AREA_RANGE",
    "DIGITS_AUGMENTATION",
    "DataError",
    "DatasetSpec",
    "IMAGENET_AREA_RANGE",
    "IMAGENET_AUGMENTATION",
    "PreprocessConfig",
    "ReadOptions",
    "SkippedImageCounter",
    "StreamOptions",
    "batch_and_prefetch",
    "batch_with_padding",
    "batches_from_stream",
    "create_synthetic_dataset",
    "create_tfds_dataset",
    "create_tfrecord_dataset",
    "device_input_options",
    "distributed_dataset_fn",
    "examples_from_stream",
    "host_example_counts",
    "padded_eval_steps",
    "prepare_digits_records",
    "preprocess_examples",
    "tfds_stream",
    "tfrecord_stream",
]
