"""Turns a folder of class sub-folders of images into sharded ImageNet-schema TFRecords.

    python -m input_pipeline.write_tfrecords --image_dir=DIR --output_dir=DIR \
        [--split=train] [--num_shards=8]

`image_dir` holds one sub-folder per class (`image_dir/<class name>/*.jpg|*.png`); the
classes are numbered in sorted folder-name order. Output: `<split>-00000-of-000NN`
shards plus `dataset_info.json` (counts per shard and split, class names).

JPEG files are stored byte for byte; anything else (PNG, CMYK or palette JPEGs) is
re-encoded as RGB JPEG, as the public ImageNet converters do, because the training
pipeline's fused decode-and-crop only works on JPEG.
"""

import argparse
import io
import os

import numpy as np
import tensorflow as tf
import tqdm
from PIL import Image

from input_pipeline import dataset_info
from input_pipeline import schema
from input_pipeline.data_error import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_labelled_images(image_dir, class_names=None):
  """Returns (class_names, [(path, class_index), ...]) for a folder of class folders.

  Args:
    image_dir: folder with one sub-folder per class.
    class_names: the label order to use; default: the sorted sub-folder names. Pass the
      training split's list when writing another split, so the labels agree even if a
      class has no images in this split.
  """
  if not tf.io.gfile.isdir(image_dir):
    raise DataError(f"--image_dir {image_dir!r} is not a directory.")
  folders = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(image_dir)
                   if tf.io.gfile.isdir(os.path.join(image_dir, d)))
  if class_names is None:
    class_names = folders
  unknown = sorted(set(folders) - set(class_names))
  if unknown:
    raise DataError(f"{image_dir} has class folders {unknown} that are not in "
                    f"class_names {list(class_names)}.")
  labelled = []
  for class_index, name in enumerate(class_names):
    folder = os.path.join(image_dir, name)
    if not tf.io.gfile.isdir(folder):
      continue
    for filename in sorted(tf.io.gfile.listdir(folder)):
      if filename.lower().endswith(IMAGE_EXTENSIONS):
        labelled.append((os.path.join(folder, filename), class_index))
  if not labelled:
    raise DataError(f"No {'/'.join(IMAGE_EXTENSIONS)} images found in class "
                    f"sub-folders of {image_dir}; expected {image_dir}/<class>/<image>.")
  return list(class_names), labelled


def encode_as_jpeg(raw_bytes, jpeg_quality):
  """Returns (jpeg_bytes, height, width); keeps RGB/greyscale JPEG bytes unchanged."""
  with Image.open(io.BytesIO(raw_bytes)) as image:
    width, height = image.size
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
      return raw_bytes, height, width
    output = io.BytesIO()
    image.convert("RGB").save(output, format="JPEG", quality=jpeg_quality)
    return output.getvalue(), height, width


def shard_names(split, num_shards):
  return [f"{split}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def write_image_folder(image_dir, output_dir, split, *, num_shards, class_names=None,
                       shuffle_seed=0, jpeg_quality=95, show_progress=True):
  """Writes the images under `image_dir` as `num_shards` TFRecord shards of `split`.

  Examples are shuffled (with `shuffle_seed`, so reruns write identical shards) before
  they are cut into shards: a shard then holds a mix of classes, and reading a few
  shards in parallel already gives a well-mixed stream.

  Returns:
    The updated contents of `dataset_info.json` (a dict).
  """
  class_names, labelled = list_labelled_images(image_dir, class_names)
  if num_shards < 1:
    raise ValueError(f"num_shards must be at least 1, got {num_shards}.")
  num_shards = min(num_shards, len(labelled))
  order = np.random.default_rng(shuffle_seed).permutation(len(labelled))
  tf.io.gfile.makedirs(output_dir)
  counts = {}
  progress = tqdm.tqdm(total=len(labelled), desc=f"writing {split}", unit="image",
                       disable=not show_progress)
  for name, indices in zip(shard_names(split, num_shards),
                           np.array_split(order, num_shards)):
    path = os.path.join(output_dir, name)
    # Written under a temporary name and renamed when complete, so a crash never leaves
    # a short shard that looks finished.
    with tf.io.TFRecordWriter(path + ".incomplete") as writer:
      for index in indices:
        image_path, class_index = labelled[index]
        with tf.io.gfile.GFile(image_path, "rb") as f:
          raw_bytes = f.read()
        try:
          jpeg_bytes, height, width = encode_as_jpeg(raw_bytes, jpeg_quality)
        except (OSError, SyntaxError) as e:  # PIL's errors for unreadable images.
          raise DataError(f"Cannot read image {image_path}: {e}") from e
        example = schema.make_example(
            jpeg_bytes, class_index, height, width, filename=os.path.basename(image_path),
            class_text=class_names[class_index])
        writer.write(example.SerializeToString())
        progress.update(1)
    tf.io.gfile.rename(path + ".incomplete", path, overwrite=True)
    counts[name] = len(indices)
  progress.close()
  return dataset_info.write_split_info(output_dir, split, counts, class_names)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--image_dir", required=True,
                      help="folder with one sub-folder of JPEG/PNG images per class")
  parser.add_argument("--output_dir", required=True, help="where the shards go")
  parser.add_argument("--split", default="train", help="shard name prefix")
  parser.add_argument("--num_shards", type=int, default=8)
  parser.add_argument("--shuffle_seed", type=int, default=0)
  parser.add_argument("--jpeg_quality", type=int, default=95,
                      help="quality for images that have to be re-encoded")
  args = parser.parse_args(argv)
  info = write_image_folder(args.image_dir, args.output_dir, args.split,
                            num_shards=args.num_shards, shuffle_seed=args.shuffle_seed,
                            jpeg_quality=args.jpeg_quality)
  split = info["splits"][args.split]
  print(f"wrote {split['num_examples']} examples of {info['num_classes']} classes in "
        f"{len(split['shards'])} shards to {args.output_dir}")


if __name__ == "__main__":
  main()
