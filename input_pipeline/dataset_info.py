"""The small JSON file the writer puts next to its shards: counts and class names.

The trainer needs the number of examples per split (steps per epoch), and the pipeline
needs the number per shard (to skip whole epochs when resuming without reading them).
Layout of `dataset_info.json`:

    {"num_classes": 10, "class_names": [...],
     "splits": {"train": {"num_examples": 1437,
                          "shards": {"train-00000-of-00008": 180, ...}}}}
"""

import json
import os

import tensorflow as tf

from input_pipeline.data_error import DataError

DATASET_INFO_FILENAME = "dataset_info.json"


def dataset_info_path(directory):
  return os.path.join(directory, DATASET_INFO_FILENAME)


def read_dataset_info(directory):
  """Returns the parsed `dataset_info.json` in `directory`, or None if there is none."""
  path = dataset_info_path(directory)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path, "r") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path} is not valid JSON ({e}); delete it and rerun the "
                      "writer.") from e


def write_split_info(directory, split, shard_counts, class_names):
  """Adds (or replaces) one split's entry in `dataset_info.json`, atomically.

  Args:
    directory: where the shards and the JSON live.
    split: split name, e.g. "train".
    shard_counts: dict shard basename -> number of examples in it.
    class_names: list of class names, index = 0-based label.
  """
  info = read_dataset_info(directory) or {}
  if info.get("class_names", class_names) != list(class_names):
    raise DataError(
        f"{dataset_info_path(directory)} lists classes {info['class_names']} but this "
        f"split has {list(class_names)}; write every split with the same class list "
        "(pass class_names=) or use a fresh output directory.")
  info["num_classes"] = len(class_names)
  info["class_names"] = list(class_names)
  info.setdefault("splits", {})[split] = {
      "num_examples": int(sum(shard_counts.values())),
      "shards": {name: int(count) for name, count in sorted(shard_counts.items())},
  }
  write_json_atomically(dataset_info_path(directory), info)
  return info


def write_json_atomically(path, value):
  """Writes `value` as JSON to `path`, on any tf.io.gfile file system.

  Write-then-rename, so that a crash never leaves half a JSON file behind.
  """
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2, sort_keys=True, default=str)
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def shard_example_counts(file_paths):
  """Examples per file from the JSON next to the files, or None if any is unlisted."""
  counts = {}
  infos = {}
  for path in file_paths:
    directory = os.path.dirname(path)
    if directory not in infos:
      infos[directory] = read_dataset_info(directory) or {}
    name = os.path.basename(path)
    for split in infos[directory].get("splits", {}).values():
      if name in split.get("shards", {}):
        counts[path] = split["shards"][name]
        break
    else:
      return None
  return counts
