"""A tiny learnable image set for trainer tests: each class brightens one quadrant."""

import numpy as np


def quadrant_images(num_examples, image_size, num_classes=4, seed=0):
  """(images [n, s, s, 3] float32, labels [n] int32): noise plus a bright quadrant.

  Class c lights quadrant c (row-major), so up to 4 classes are separable by a small
  convolutional net within a few steps.
  """
  if num_classes > 4:
    raise ValueError(f"at most 4 quadrant classes, got {num_classes}")
  rng = np.random.default_rng(seed)
  labels = np.arange(num_examples) % num_classes
  images = rng.normal(0.0, 0.3, (num_examples, image_size, image_size, 3))
  half = image_size // 2
  for i, label in enumerate(labels):
    y, x = divmod(int(label), 2)
    images[i, y * half:(y + 1) * half, x * half:(x + 1) * half] += 1.5
  return images.astype(np.float32), labels.astype(np.int32)
