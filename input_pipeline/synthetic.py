"""A synthetic data source for throughput runs: no files, no decoding.

One batch of random images with fixed labels is made once and repeated, so the step
time measured on it is the accelerator's alone: the ceiling the real pipeline has to
keep up with.
"""

import tensorflow as tf


def create_synthetic_dataset(*, batch_size, image_size, num_classes, dtype=tf.float32,
                             input_context=None, seed=0, num_batches=None):
  """An endless (or `num_batches` long) stream of one fixed batch.

  Args:
    batch_size: examples per batch, per replica.
    image_size: side of the square images.
    num_classes: labels are 0, 1, ..., num_classes - 1, 0, 1, ... across the batch.
    dtype: image dtype (tf.bfloat16 on TPU).
    input_context: accepted for the same call signature as the real pipelines; each
      host makes the same data.
    seed: seed of the random pixel values (standard normal, like normalized images).
    num_batches: stop after this many; None repeats forever.

  Returns:
    Dataset of (images [batch_size, image_size, image_size, 3] dtype,
    labels [batch_size] int32).
  """
  del input_context  # Every host produces the same synthetic data.
  images = tf.random.stateless_normal([batch_size, image_size, image_size, 3],
                                      seed=[seed, 0], dtype=tf.float32)
  labels = tf.range(batch_size, dtype=tf.int32) % num_classes
  dataset = tf.data.Dataset.from_tensors((tf.cast(images, dtype), labels))
  dataset = dataset.repeat(num_batches)
  return dataset.prefetch(tf.data.AUTOTUNE)
