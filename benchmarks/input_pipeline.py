"""Input pipeline throughput, side by side in one run, on real photographs.

    python benchmarks/input_pipeline.py [--num_images=320] [--seconds=10]

Builds ImageNet-like JPEGs (about 500x375, quality 90) from the photographs that
scikit-learn and matplotlib ship (random crops and rescales), writes them as TFRecords
with our writer, then measures training images/s of:
  naive        sequential reads, full decode then crop, no parallelism, no prefetch
  pipeline     input_pipeline.create_tfrecord_dataset (fused decode-and-crop, parallel)
               as the trainer builds it: uint8 pixels out, normalised on the device
  pipeline_f32 the same, normalised to float32 on the host (the earlier output)
  pipeline+dct the first with DCT-domain reduced-scale decoding
  model_garden tf-models-official's classification_input Decoder/Parser + InputReader
  decode_only  parallel read + full JPEG decode, nothing else
  bare_work    the pipeline's own per-image functions (fused decode-and-crop, resize,
               flip, round to uint8) on the encoded bytes held in memory, no tf.data,
               four threads per core: the ceiling the pipeline should approach
Model Garden's parser normalises to float32 on the host, as its trainer expects; the
pipeline's uint8 output leaves that to the model (`ImageClassifier.call`), so
`pipeline_vs_model_garden` compares what each hands its model, and
`pipeline_f32_vs_model_garden` the same float32 output on both sides.
The last line is `pipeline_vs_bare_work: <ratio>x`.
"""

import argparse
import collections
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import tensorflow as tf
from PIL import Image
from sklearn.datasets import load_sample_images

import input_pipeline
from input_pipeline import preprocessing
from input_pipeline import schema
from input_pipeline import write_tfrecords

IMAGENET_LIKE_SIZE = (500, 375)  # width, height: the most common ImageNet shape


def source_photographs():
  """The real photographs installed packages ship, as uint8 RGB arrays."""
  photos = list(load_sample_images().images)  # two 427x640 photos
  sample_data = os.path.join(matplotlib.get_data_path(), "sample_data")
  with Image.open(os.path.join(sample_data, "grace_hopper.jpg")) as image:
    photos.append(np.asarray(image.convert("RGB")))
  return photos


def make_photo_folder(image_dir, num_images, num_classes=4, seed=0):
  """Random crops of the photographs rescaled to ~500x375, saved as quality-90 JPEGs."""
  rng = np.random.default_rng(seed)
  photos = source_photographs()
  for c in range(num_classes):
    os.makedirs(os.path.join(image_dir, f"class_{c}"), exist_ok=True)
  for i in range(num_images):
    photo = photos[i % len(photos)]
    height, width = photo.shape[:2]
    crop_h = int(height * rng.uniform(0.55, 1.0))
    crop_w = min(width, int(crop_h * rng.uniform(1.2, 1.45)))
    top = rng.integers(0, height - crop_h + 1)
    left = rng.integers(0, width - crop_w + 1)
    crop = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
    size = IMAGENET_LIKE_SIZE if rng.random() < 0.8 else IMAGENET_LIKE_SIZE[::-1]
    jitter = rng.uniform(0.9, 1.1)
    size = (int(size[0] * jitter), int(size[1] * jitter))
    if rng.random() < 0.5:
      crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    crop.resize(size, Image.BICUBIC).save(
        os.path.join(image_dir, f"class_{i % num_classes}", f"photo_{i:04d}.jpg"),
        format="JPEG", quality=90)


def naive_dataset(pattern, batch_size, image_size):
  """Sequential reads, full decode then crop, one element at a time, no prefetch."""
  def preprocess(record):
    example = schema.parse_example(record)
    image = tf.io.decode_jpeg(example["image_bytes"], channels=3)
    window = preprocessing.random_crop_window(
        tf.shape(image), example["bboxes"], tf.random.uniform([2], 0, 2**31, tf.int64))
    image = preprocessing.crop_window(image, window)
    image = preprocessing.resize_image(image, image_size)
    image = tf.image.random_flip_left_right(image)
    return preprocessing.normalize_image(image), example["label"]

  files = sorted(tf.io.gfile.glob(pattern))
  dataset = (tf.data.TFRecordDataset(files).repeat().shuffle(1000)
             .map(preprocess).batch(batch_size, drop_remainder=True))
  options = tf.data.Options()
  options.experimental_optimization.map_parallelization = False
  options.experimental_optimization.inject_prefetch = False
  options.autotune.enabled = False
  return dataset.with_options(options)


def decode_only_dataset(pattern, batch_size):
  """Parallel reads and full JPEG decodes only: what any decoding pipeline can reach."""
  files = sorted(tf.io.gfile.glob(pattern))
  # The shape (not the pixels) is kept so that images of any size batch together.
  decode = lambda record: tf.shape(tf.io.decode_jpeg(
      schema.parse_example(record)["image_bytes"], channels=3))
  return (tf.data.TFRecordDataset(files, num_parallel_reads=len(files)).repeat()
          .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
          .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def model_garden_dataset(pattern, batch_size, image_size):
  """tf-models-official's classification pipeline (its InputReader) on our records."""
  from official.core import config_definitions  # pylint: disable=g-import-not-at-top
  from official.core import input_reader
  from official.vision.dataloaders import classification_input
  config = config_definitions.DataConfig(input_path=pattern, global_batch_size=batch_size,
                             is_training=True, shuffle_buffer_size=1000,
                             cycle_length=8, drop_remainder=True)
  decoder = classification_input.Decoder()
  parser = classification_input.Parser(output_size=[image_size, image_size],
                                       num_classes=4)
  reader = input_reader.InputReader(
      params=config, dataset_fn=tf.data.TFRecordDataset, decoder_fn=decoder.decode,
      parser_fn=parser.parse_fn(True))
  return reader.read()


def encoded_examples(pattern):
  """Every record's image bytes and boxes (padded, with counts), parsed into memory."""
  files = sorted(tf.io.gfile.glob(pattern))
  image_bytes, boxes = [], []
  for record in tf.data.TFRecordDataset(files):
    example = schema.parse_example(record)
    image_bytes.append(example["image_bytes"])
    boxes.append(example["bboxes"])
  num_boxes = [int(b.shape[0]) for b in boxes]
  most = max(num_boxes)
  padded = [tf.pad(b, [[0, most - int(b.shape[0])], [0, 0]]) for b in boxes]
  return (tf.stack(image_bytes), tf.stack(padded) if most else
          tf.zeros([len(boxes), 0, 4]), tf.constant(num_boxes, tf.int64))


class BareWork:
  """The pipeline's per-image work on in-memory bytes, with no tf.data: its ceiling.

  The same functions the pipeline maps (`preprocessing_for(...).decode`, then
  `.finish`: fused decode-and-random-crop, resize, flip, normalise), in a tf.function
  over one batch, called from Python threads (TensorFlow releases the GIL inside the
  call), several threads per core: a thread between calls (in Python,
  holding the GIL) then leaves its core to another, and a single thread per core was
  measured slower (docs/RESULTS.md). `num_workers` batches are in flight at once, as
  a prefetch buffer would hold them; they are taken in the order they were started.
  """

  def __init__(self, pattern, batch_size, image_size, num_workers, dtype=tf.uint8):
    self._bytes, self._boxes, self._counts = encoded_examples(pattern)
    self._num_examples = int(self._bytes.shape[0])
    self._batch_size = batch_size
    example = preprocessing.preprocessing_for(
        preprocessing.PreprocessConfig(image_size=image_size, dtype=dtype),
        is_training=True)

    def one_image(args):
      image_bytes, boxes, count, seed = args
      return example.finish(example.decode(image_bytes, boxes[:count], seed), seed)

    @tf.function
    def batch_of(start):
      indices = tf.range(start, start + batch_size) % self._num_examples
      seeds = tf.map_fn(lambda i: tf.random.experimental.stateless_fold_in(
          tf.constant([0, 1], tf.int64), i),
                        tf.cast(tf.range(start, start + batch_size), tf.int64),
                        fn_output_signature=tf.TensorSpec([2], tf.int64))
      # parallel_iterations=1: one thread per core does the parallelism.
      return tf.map_fn(one_image, (tf.gather(self._bytes, indices),
                                   tf.gather(self._boxes, indices),
                                   tf.gather(self._counts, indices), seeds),
                       fn_output_signature=tf.TensorSpec(
                           [image_size, image_size, 3], dtype),
                       parallel_iterations=1)

    self._batch_of = batch_of
    batch_of(tf.constant(0, tf.int64))  # traced once, before the threads share it
    self._pool = concurrent.futures.ThreadPoolExecutor(num_workers)
    self._next_start = 0
    self._in_flight = collections.deque(self._submit() for _ in range(num_workers))

  def _submit(self):
    start = self._next_start
    self._next_start += self._batch_size
    return self._pool.submit(self._batch_of, tf.constant(start, tf.int64))

  def __iter__(self):
    return self

  def __next__(self):
    images = self._in_flight.popleft().result()
    self._in_flight.append(self._submit())
    return images


# Host op types by the piece of per-image work they do (the rest is "other").
OP_WORK = {
    "DecodeAndCropJpeg": "decode", "ExtractJpegShape": "decode", "DecodeJpeg": "decode",
    "DecodeImage": "decode", "DecodePng": "decode",
    "StatelessSampleDistortedBoundingBox": "crop window", "ResizeBilinear": "resize",
    "ReverseV2": "flip", "Sub": "normalise", "RealDiv": "normalise", "Mul": "normalise",
    "Round": "round and cast", "Cast": "round and cast", "ClipByValue": "round and cast",
    "ParseExampleV2": "parse", "StatelessShuffle": "shuffle",
}


def host_op_profile(iterator, num_batches, logdir):
  """Self-time (µs) of host ops and of tf.data iterators over `num_batches` batches.

  The TF profiler around the running iterator; its `framework_op_stats` table (what
  TensorBoard's profile plugin shows) is read with the converter TensorFlow ships,
  a private module (`_pywrap_profiler_plugin`): the one reader of xplane files
  installed here, used nowhere else. Returns ({op type: µs}, {iterator path: µs});
  iterator paths have their interleave indices ("[3]") dropped, so the guard's
  nested datasets add up.
  """
  import glob  # pylint: disable=g-import-not-at-top
  import json
  import re
  from tensorflow.python.profiler.internal import _pywrap_profiler_plugin
  tf.profiler.experimental.start(logdir)
  for _ in range(num_batches):
    next(iterator)
  tf.profiler.experimental.stop()
  path, = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
  data, ok = _pywrap_profiler_plugin.xspace_to_tools_data([path], "framework_op_stats")
  if not ok:
    raise RuntimeError(f"the profiler's converter failed on {path}: {data[:200]}")
  table = json.loads(data)[0]
  column = {c["label"]: i for i, c in enumerate(table["cols"])}
  ops, iterators = collections.Counter(), collections.Counter()
  for row in table["rows"]:
    values = [cell.get("v") for cell in row["c"]]
    kind, name = values[column["Operation Type"]], values[column["Operation Name"]]
    self_time = values[column["Total self-time (us)"]]
    if kind == "Dataset":
      iterators[re.sub(r"\[\d+\]", "", name)] += self_time
    elif kind != "IDLE":
      ops[kind] += self_time
  return ops, iterators


def print_profile(label, ops, iterators, num_images):
  """The op self-time by piece of work, per image, and the slowest iterators."""
  work = collections.Counter()
  for kind, micros in ops.items():
    work[OP_WORK.get(kind, "other")] += micros
  total = sum(work.values())
  print(f"profile {label}: host op self-time {total / num_images:.0f} us/image")
  for piece, micros in work.most_common():
    print(f"    {piece:<15} {micros / num_images:7.0f} us/image  {100 * micros / total:5.1f}%")
  print("  iterator self-time (wall clock: includes waits of asynchronous ones)")
  for name, micros in iterators.most_common(6):
    print(f"    {micros / num_images:7.0f} us/image  {name}")


def images_per_second(iterator, batch_size, seconds, warmup_batches=2):
  """Rate of one already-running iterator over `seconds` (after a short warm-up)."""
  for _ in range(warmup_batches):
    next(iterator)
  start, batches = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    next(iterator)
    batches += 1
  return batches * batch_size / (time.perf_counter() - start)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_images", type=int, default=320)
  parser.add_argument("--num_shards", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--small_image_size", type=int, default=128,
                      help="a second output size, where DCT scaling applies more often")
  parser.add_argument("--seconds", type=float, default=3.0,
                      help="timing per pipeline per round")
  parser.add_argument("--rounds", type=int, default=5,
                      help="the pipelines take turns this many times; the best round "
                      "counts, which discounts other load on a shared machine")
  parser.add_argument("--profile_batches", type=int, default=0,
                      help="after the rounds, profile this many batches of the "
                      "pipeline and of pipeline_f32 with the TF profiler")
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory(prefix="input_pipeline_bench_") as root:
    image_dir, record_dir = os.path.join(root, "images"), os.path.join(root, "records")
    make_photo_folder(image_dir, args.num_images)
    info = write_tfrecords.write_image_folder(image_dir, record_dir, "train",
                                              num_shards=args.num_shards,
                                              show_progress=False)
    pattern = os.path.join(record_dir, "train-*")
    total_bytes = sum(os.path.getsize(p) for p in tf.io.gfile.glob(pattern))
    print(f"{info['splits']['train']['num_examples']} photographs, ~500x375 JPEG q90, "
          f"{total_bytes / 2**20:.1f} MiB in {args.num_shards} shards; "
          f"batch {args.batch_size}, {os.cpu_count()} CPU cores, "
          f"median of {args.rounds} alternating rounds of {args.seconds:.0f} s "
          "per pipeline")

    def ours(image_size, use_dct_scaling, dtype=tf.uint8):
      return input_pipeline.create_tfrecord_dataset(
          pattern, stream=input_pipeline.StreamOptions(is_training=True),
          preprocess=input_pipeline.PreprocessConfig(image_size=image_size,
                                                     use_dct_scaling=use_dct_scaling,
                                                     dtype=dtype),
          batch=input_pipeline.BatchOptions(args.batch_size),
          read=input_pipeline.ReadOptions(shuffle_buffer_size=1000))

    size, small = args.image_size, args.small_image_size
    candidates = [
        ("naive", f"{size}px", lambda: naive_dataset(pattern, args.batch_size, size)),
        ("pipeline", f"{size}px", lambda: ours(size, False)),
        ("pipeline_f32", f"{size}px", lambda: ours(size, False, tf.float32)),
        ("pipeline+dct", f"{size}px", lambda: ours(size, True)),
        ("model_garden", f"{size}px",
         lambda: model_garden_dataset(pattern, args.batch_size, size)),
        ("decode_only", "-", lambda: decode_only_dataset(pattern, args.batch_size)),
        ("bare_work", f"{size}px",
         lambda: BareWork(pattern, args.batch_size, size, 4 * os.cpu_count())),
        ("pipeline", f"{small}px", lambda: ours(small, False)),
        ("pipeline+dct", f"{small}px", lambda: ours(small, True)),
    ]
    # Every pipeline keeps one running iterator, and they take turns in short rounds:
    # a restart per round would time pipeline start-up, and long turns would let
    # drifting machine load decide the ratios (these machines are shared).
    iterators = [(name, output, iter(make())) for name, output, make in candidates]
    samples = {(name, output): [] for name, output, _ in iterators}
    for _ in range(args.rounds):
      for name, output, iterator in iterators:
        samples[(name, output)].append(
            images_per_second(iterator, args.batch_size, args.seconds))
    rates = {key: statistics.median(values) for key, values in samples.items()}
    profiles = []
    if args.profile_batches:
      for name, output, iterator in iterators:
        if name in ("pipeline", "pipeline_f32") and output == f"{args.image_size}px":
          profiles.append((name, host_op_profile(
              iterator, args.profile_batches, os.path.join(root, f"profile_{name}"))))
    for name, output, _ in iterators:
      values = samples[(name, output)]
      print(f"  {name:<13} {output:>6}  {rates[(name, output)]:8.1f} images/s "
            f"(range {min(values):.0f}-{max(values):.0f})")

  for name, (ops, iterator_times) in profiles:
    print_profile(f"{name} {size}px", ops, iterator_times,
                  args.profile_batches * args.batch_size)
  pipeline = rates[("pipeline", f"{size}px")]
  print(f"dct_scaling_gain_{size}px: "
        f"{rates[('pipeline+dct', f'{size}px')] / pipeline:.2f}x")
  print(f"dct_scaling_gain_{small}px: "
        f"{rates[('pipeline+dct', f'{small}px')] / rates[('pipeline', f'{small}px')]:.2f}x")
  print(f"pipeline_vs_decode_only_ceiling: {pipeline / rates[('decode_only', '-')]:.2f}x")
  model_garden = rates[("model_garden", f"{size}px")]
  print(f"pipeline_f32_vs_model_garden: "
        f"{rates[('pipeline_f32', f'{size}px')] / model_garden:.2f}x")
  print(f"pipeline_vs_pipeline_f32: {pipeline / rates[('pipeline_f32', f'{size}px')]:.2f}x")
  print(f"pipeline_vs_model_garden: {pipeline / model_garden:.2f}x")
  print(f"pipeline_vs_naive: {pipeline / rates[('naive', f'{size}px')]:.2f}x")
  print(f"pipeline_vs_bare_work: {pipeline / rates[('bare_work', f'{size}px')]:.2f}x")


if __name__ == "__main__":
  main()
