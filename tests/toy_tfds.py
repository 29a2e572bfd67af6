"""A tiny tfds image-classification data set, prepared offline in a test's folder."""

import numpy as np


def prepare_toy_tfds(data_dir, split_sizes, num_shards):
  """Writes a tfds builder's splits into `data_dir`; returns the builder's name.

  `split_sizes` maps each split's name to its example count. Example i of a split has
  label i (so a test can tell which examples it read) and a 24x32 JPEG of seeded noise.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  num_classes = max(split_sizes.values())

  class ToyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(24, 32, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=num_classes)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(count)
              for split, count in split_sizes.items()}

    def _generate_examples(self, count):
      for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (24, 32, 3), np.uint8)
        yield i, {"image": pixels, "label": i}

  ToyImages(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=num_shards))
  return "toy_images"
