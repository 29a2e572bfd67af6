"""The tf.data pipeline over ImageNet-schema TFRecord shards, in three pieces.

The chain of Ying et al. 2018, sec. 3.2, read top to bottom:
  1. a record stream, `tfrecord_stream` (or `tfds_source.tfds_stream`): list files,
     shard per host, shuffle files, parallel interleave, (cache), shuffle, parse; it
     yields (seed, example dict) and owns resuming (`StreamOptions.skip_examples`);
  2. the per-example preprocessing, built once from a `preprocessing.PreprocessConfig`
     and run by `preprocess_examples`: fused decode-and-crop (damaged images counted and
     dropped), resize, flip, normalize (or, with `dtype=tf.uint8`, round to pixels that
     the model normalises on the device: what the trainer's sources do);
  3. one tail, `batch_and_prefetch`: batch (or pad for evaluation), prefetch, options.
`examples_from_stream` is 2 on any stream, `batches_from_stream` joins 2 and 3, and
`create_tfrecord_dataset` is 1-3.
The knobs travel in small frozen dataclasses (`StreamOptions`, `ReadOptions`,
`BatchOptions`, `PreprocessConfig`). `distributed_dataset_fn` wraps any of the dataset builders for
`strategy.distribute_datasets_from_function`, with prefetch onto the devices.

Evaluation covers every example with static batch shapes (as TPUs need) by padding:
`padded_eval_steps` gives the step count that covers the host with the most examples,
the same on every host, and `batch_with_padding` fills each host's stream up to it with
zero-weight examples.
"""

import concurrent.futures
import dataclasses
import random
import uuid

import tensorflow as tf
from absl import logging

from input_pipeline import dataset_info
from input_pipeline import device_buffers
from input_pipeline import preprocessing
from input_pipeline import schema
from input_pipeline.data_error import DataError

AUTOTUNE = tf.data.AUTOTUNE

IMAGENET_AREA_RANGE = preprocessing.IMAGENET_AREA_RANGE
DIGITS_AREA_RANGE = preprocessing.DIGITS_AREA_RANGE
IMAGENET_AUGMENTATION = preprocessing.IMAGENET_AUGMENTATION
DIGITS_AUGMENTATION = preprocessing.DIGITS_AUGMENTATION


class SkippedImageCounter:
  """Counts records dropped because their image bytes could not be decoded.

  Backed by an int64 resource on the host CPU, so the count can be read while the
  pipeline runs (and logged by the trainer). Pass one instance to several datasets to
  get a total.

  Why a raw resource (`tf.raw_ops.VarHandleOp`) and not a `tf.Variable`: inside
  `strategy.scope()` every `tf.Variable` goes through the strategy's variable creator,
  which ignores `tf.device` (TPUStrategy) or mirrors the variable onto every replica
  (MirroredStrategy), so the host-side `Dataset.map` that counts would capture a
  device variable. A raw resource goes through no creator, stays where it is made,
  and is neither tracked nor checkpointed (a count of skips is not state to restore).
  """

  def __init__(self):
    # init_scope: the resource must exist eagerly even if the dataset is built inside a
    # tf.function (e.g. a tf_keras DatasetCreator).
    with tf.init_scope(), tf.device("/cpu:0"):
      self._resource = tf.raw_ops.VarHandleOp(
          dtype=tf.int64, shape=[], shared_name=f"skipped_images_{uuid.uuid4().hex}")
      tf.raw_ops.AssignVariableOp(resource=self._resource,
                                  value=tf.constant(0, tf.int64))

  def __del__(self):
    try:
      with tf.init_scope():
        tf.raw_ops.DestroyResourceOp(resource=self._resource, ignore_lookup_error=True)
    except Exception:  # pylint: disable=broad-except
      pass  # The runtime may already be gone at interpreter exit.

  @property
  def device(self):
    """The device holding the count (the host's CPU)."""
    return self._resource.device

  def count(self):
    return int(tf.raw_ops.ReadVariableOp(resource=self._resource, dtype=tf.int64))

  def note_skipped(self, filename):
    """Adds one and logs the file name; returns the new count."""
    added = tf.raw_ops.AssignAddVariableOp(resource=self._resource,
                                           value=tf.constant(1, tf.int64))
    with tf.control_dependencies([added]):
      total = tf.raw_ops.ReadVariableOp(resource=self._resource, dtype=tf.int64)
    printed = tf.print("input_pipeline: skipped undecodable image", filename,
                       "- images skipped so far:", total, output_stream=logging.warning)
    with tf.control_dependencies([printed]):
      return tf.identity(total)


def list_shards(file_pattern):
  """The sorted files matching `file_pattern` (a glob or a list of globs).

  Raises:
    DataError: naming the pattern when it matches nothing.
  """
  patterns = [file_pattern] if isinstance(file_pattern, str) else list(file_pattern)
  files = sorted({path for pattern in patterns for path in tf.io.gfile.glob(pattern)})
  if not files:
    raise DataError(
        f"File pattern {file_pattern!r} matches no files. Check --data_dir, or write "
        "records with `python -m input_pipeline.write_tfrecords`.")
  return files


def check_shards_readable(files, max_parallel_reads=16):
  """Reads the first record of each shard, in parallel, so a broken shard is named up front.

  TensorFlow's own error for a corrupt record ("corrupted record at 128") does not name
  the file; hours into a run, on one of a thousand shards, that is not actionable. The
  pipeline passes only this host's own shards (after `shard_for_host`): on a pod each
  host opens its ~1/N of the files, not all of them, and a slow file system's latency
  is paid `max_parallel_reads` files at a time rather than once per file.

  Args:
    files: the shards to check.
    max_parallel_reads: files opened at once (threads; TensorFlow's reads release the
      GIL).

  Raises:
    DataError: naming the first shard, in `files` order, that is missing, unreadable or
      not a TFRecord file.
  """
  def read_error(path):
    try:
      for _ in tf.data.TFRecordDataset(path).take(1):
        pass
    except (tf.errors.DataLossError, tf.errors.NotFoundError,
            tf.errors.PermissionDeniedError, tf.errors.InvalidArgumentError) as e:
      return e
    return None

  if not files:
    return
  with concurrent.futures.ThreadPoolExecutor(
      min(max_parallel_reads, len(files))) as pool:
    errors = list(pool.map(read_error, files))
  for path, error in zip(files, errors):
    if error is not None:
      raise DataError(f"Shard {path} cannot be read as TFRecords: {error.message}. "
                      "Rewrite or remove this file.") from error


@dataclasses.dataclass(frozen=True)
class HostShard:
  """Which part of the shards this input pipeline (host) reads."""
  files: tuple
  # When there are fewer files than hosts, each host reads one file and keeps every
  # num_record_shards-th of its records, starting at record_shard_index.
  num_record_shards: int = 1
  record_shard_index: int = 0


def host_shard(files, num_hosts, host):
  """The part of `files` that host `host` of `num_hosts` reads: a pure function.

  At least as many files as hosts: whole files, round-robin (files host, host + N, ...),
  so no host reads more than ceil(files / hosts) of them. Fewer files than hosts (128
  validation shards over 256 hosts): host h reads only file h mod F, shared with the
  other hosts of that residue, and keeps its stride of the file's records. Each host
  then opens one file instead of all of them; the hosts sharing a file (floor or ceil
  of N / F of them) split its records, so together they read every record once.
  """
  num_files = len(files)
  if num_files >= num_hosts:
    return HostShard(tuple(files[host::num_hosts]))
  file_index = host % num_files
  sharers = len(range(file_index, num_hosts, num_files))
  return HostShard((files[file_index],), sharers, host // num_files)


def shard_for_host(files, input_context):
  """Splits files among input pipelines: disjoint, and together they cover everything.

  See `host_shard`; no context, or one input pipeline, reads every file.
  """
  if input_context is None or input_context.num_input_pipelines == 1:
    return HostShard(tuple(files))
  return host_shard(files, input_context.num_input_pipelines,
                    input_context.input_pipeline_id)


def _examples_per_file(files):
  """{file: examples}, from dataset_info.json, else by counting each file's records once."""
  counts = dataset_info.shard_example_counts(files)
  if counts is not None:
    return counts
  logging.warning("No dataset_info.json lists %d of these shards; counting their "
                  "records (write_tfrecords writes one, which saves this read).",
                  len(files))
  per_file = tf.data.Dataset.from_tensor_slices(list(files)).map(
      lambda path: tf.data.TFRecordDataset(path).reduce(
          tf.constant(0, tf.int64), lambda n, _: n + 1),
      num_parallel_calls=AUTOTUNE, deterministic=True)
  return dict(zip(files, (int(n) for n in per_file.as_numpy_iterator())))


def examples_of_host(shard, examples_per_file):
  """Examples a host reads in one pass of `shard`, given {file: examples}."""
  total = sum(examples_per_file[path] for path in shard.files)
  # Records index, index + n, ... of `total`.
  return len(range(shard.record_shard_index, total, shard.num_record_shards))


def examples_per_epoch(shard):
  """Examples this host sees per epoch: from dataset_info.json, else by counting."""
  return examples_of_host(shard, _examples_per_file(shard.files))


def example_counts_by_host(files, examples_per_file, num_input_pipelines):
  """Examples each of `num_input_pipelines` hosts reads of `files`: a pure function."""
  return [examples_of_host(host_shard(files, num_input_pipelines, host),
                           examples_per_file)
          for host in range(num_input_pipelines)]


def host_example_counts(file_pattern, num_input_pipelines):
  """Examples each input pipeline (host) reads in one pass, by pipeline id.

  Every host computes all of them, from the same dataset_info.json (or by counting the
  same records, each file once), so every host derives the same evaluation step count.
  """
  files = list_shards(file_pattern)
  return example_counts_by_host(files, _examples_per_file(files), num_input_pipelines)


def padded_eval_steps(examples_per_host, global_batch_size):
  """Evaluation steps that cover every example of every host; the same for all hosts.

  A step takes global_batch_size / len(examples_per_host) examples from each host (one
  per-replica batch for each of its replicas). The host with the most examples sets the
  count; `batch_with_padding` fills the other hosts, and its own last step, with padding.

  Args:
    examples_per_host: examples of each host, by input pipeline id (as
      `host_example_counts` gives them).
    global_batch_size: evaluation examples per step over all replicas.

  Raises:
    ValueError: the batch does not divide over the hosts.
    DataError: there is nothing to evaluate.
  """
  num_hosts = len(examples_per_host)
  if not num_hosts or global_batch_size % num_hosts:
    raise ValueError(f"global batch {global_batch_size} does not divide over "
                     f"{num_hosts} input pipelines")
  examples_per_host_step = global_batch_size // num_hosts
  steps = max(-(-count // examples_per_host_step) for count in examples_per_host)
  if not steps:
    raise DataError("The evaluation set has no examples.")
  return steps


def batch_with_padding(examples, *, batch_size, num_batches):
  """(image, label) examples -> `num_batches` full batches of (images, labels, weights).

  The real examples come first, in order, with weight 1.0; then padding examples (zero
  image, label 0, weight 0.0) fill the last batches. Every batch is full, so shapes stay
  static, and metrics weighted by `weights` count each real example once and padding
  not at all. Records dropped upstream as undecodable only mean more padding.

  Args:
    examples: dataset of (image, label) with fully defined shapes.
    batch_size: examples per batch.
    num_batches: batches to yield; for evaluation, this host's share of
      `padded_eval_steps` (steps * replicas per host).

  Returns:
    A dataset of `num_batches` (images [batch_size, ...], labels [batch_size],
    weights [batch_size] float32). Real examples beyond num_batches * batch_size are
    not read: the caller compares the weights' sum with the count it expected
    (`Trainer.evaluate` warns when they differ).
  """
  image_spec, label_spec = examples.element_spec
  if not image_spec.shape.is_fully_defined():
    raise ValueError(f"padding needs a static image shape, got {image_spec.shape}")
  padding = tf.data.Dataset.from_tensors(
      (tf.zeros(image_spec.shape, image_spec.dtype),
       tf.zeros(label_spec.shape, label_spec.dtype), tf.constant(0.0))).repeat()
  # A check inside the stream that no real example is left over would never fire under
  # Keras: it reads exactly num_batches, and an error in a prefetched batch beyond them
  # is never raised.
  return (examples.map(lambda image, label: (image, label, tf.constant(1.0)))
          .concatenate(padding)
          .take(num_batches * batch_size)
          .batch(batch_size, drop_remainder=True))


def _fold(key, value):
  return tf.random.experimental.stateless_fold_in(key, value)


def shuffle_window_size(examples_per_epoch, shuffle_buffer_size):
  """Records per shuffle window: at most `shuffle_buffer_size`, an epoch cut evenly.

  An epoch of E records is cut into ceil(E / buffer) windows of (nearly) equal length,
  not into full windows and a short remainder: while an epoch's last window is consumed
  the next epoch's first window is read, and a last window of a few records would leave
  the reader a whole window behind at every epoch boundary. None (the epoch's length
  is not written down): windows of `shuffle_buffer_size`.
  """
  if not examples_per_epoch:
    return shuffle_buffer_size
  num_windows = -(-examples_per_epoch // shuffle_buffer_size)
  return -(-examples_per_epoch // num_windows)


def shuffled_epochs(epoch_records, *, first_epoch, window_size, window_key,
                    skip_windows=0):
  """Endless epochs of records, each epoch permuted window by window, never draining.

  Epoch e's records (`epoch_records(e)`, in read order) are cut into windows of
  `window_size`; each window is permuted by `stateless_shuffle` with the key
  `window_key(e, w)`, a pure function of the epoch and the window's index in it. So
  the record at any position of the stream depends only on the keys and the position,
  and each epoch holds each of its records exactly once (no window spans two epochs).

  The epochs form one stream (one `flat_map` over `Dataset.counter`) and the
  read-ahead of one window sits after it: while a window is consumed the next one is
  read and permuted, also across an epoch boundary, so the stream never waits for a
  buffer to refill (a per-epoch read-ahead, or `Dataset.shuffle` restarted each epoch,
  stops at every boundary until the next epoch's first window is read).

  Used instead of `Dataset.shuffle` because its sliding buffer's state is not a function
  of the position (a resumed run could not rebuild it), and because it cannot take a
  tensor seed once a global seed of 0 is set (`tf.random.set_seed(0)`: TensorFlow then
  casts the seed tensor to a Python bool).

  Args:
    epoch_records: epoch (int64 scalar tensor) -> that epoch's records.
    first_epoch: the first epoch of the stream.
    window_size: records per window (see `shuffle_window_size`).
    window_key: (epoch, window) int64 tensors -> a [2] int64 key.
    skip_windows: whole windows of the first epoch to leave out, before permuting them
      (resuming: they are read but not held or shuffled).
  """
  def windows_of(epoch):
    skip = tf.where(epoch == first_epoch, tf.constant(skip_windows, tf.int64),
                    tf.constant(0, tf.int64))
    return (epoch_records(epoch).skip(skip * window_size).batch(window_size)
            .enumerate()
            .map(lambda window, block: tf.random.experimental.stateless_shuffle(
                block, seed=window_key(epoch, window + skip))))

  return (tf.data.Dataset.counter(first_epoch).flat_map(windows_of)
          .prefetch(1).unbatch())


@dataclasses.dataclass(frozen=True)
class StreamOptions:
  """Which examples a host reads, in what order, and where a resumed run starts.

  is_training: an endless stream of epochs, shuffled, with each example's seed for its
    augmentation. Otherwise one pass in file order.
  shuffle_seed: with `deterministic`, fixes the training stream: each epoch's order and
    each example's augmentation are functions of (seed, host, epoch, position). None: a
    fresh random seed.
  deterministic: keep element order through the parallel steps. None: deterministic for
    evaluation and for training with a `shuffle_seed`, otherwise not (faster: a slow
    record does not hold up the ones behind it).
  skip_examples: training only: start as if this many examples had already been read by
    this host (resuming at step s: s * per-host examples per step). Skipped as encoded
    records, before any decoding; exact when the stream is deterministic (see
    `tfrecord_stream`), approximate otherwise (a slow read can reorder records).
  service_epoch: training only: one epoch, made to be split by shard among tf.data
    service workers (see `tfrecord_stream`); its order is drawn afresh on each pass, so
    it is never deterministic and cannot skip.
  """
  is_training: bool
  shuffle_seed: int | None = None
  deterministic: bool | None = None
  skip_examples: int = 0
  service_epoch: bool = False

  def resolved(self):
    """These options with `deterministic` and `shuffle_seed` decided.

    Every piece of one pipeline must see the same decision (and the same random seed),
    so the composition resolves once and hands the result on.
    """
    if self.skip_examples and not self.is_training:
      raise ValueError("skip_examples applies to training only.")
    if self.service_epoch and (not self.is_training or self.skip_examples
                               or self.deterministic):
      raise ValueError("service_epoch is one non-deterministic training epoch: it "
                       "takes no skip_examples and no deterministic=True.")
    deterministic = self.deterministic
    if deterministic is None:
      deterministic = not self.service_epoch and (
          (not self.is_training) or self.shuffle_seed is not None)
    shuffle_seed = self.shuffle_seed
    if shuffle_seed is None:
      shuffle_seed = random.SystemRandom().getrandbits(62)
    return dataclasses.replace(self, deterministic=deterministic,
                               shuffle_seed=shuffle_seed)


@dataclasses.dataclass(frozen=True)
class ReadOptions:
  """How the encoded records are read; none of it changes which examples come out.

  shuffle_files: shuffle the shard order each training epoch.
  cycle_length, block_length, num_parallel_reads: the parallel interleave: how many
    shards are read at once, records taken from each in turn, reader threads.
  read_buffer_bytes: read buffer per open shard.
  shuffle_buffer_size: records per shuffle window, at most: each epoch is cut into
    windows of about this many records (as interleaved from the shuffled shards), each
    permuted anew every epoch (see `shuffled_epochs`). Up to three windows of encoded
    records are in memory: the one filling, the one read ahead, the one consumed.
  cache: keep the encoded records in host memory after the first epoch (only when this
    host's share fits). The per-epoch file shuffle then no longer changes anything; the
    record shuffle still does.
  check_shards: read the first record of each of this host's shards up front, in
    parallel, so a broken shard is an error naming it (one small read per shard).
  label_offset: subtracted from the stored label (1 for the ImageNet converters).
  num_parallel_calls: parallelism of parse and decode.
  tfds builders interleave their own files: of these they use cycle_length,
  shuffle_buffer_size, cache and num_parallel_calls.
  """
  shuffle_files: bool = True
  cycle_length: int = 16
  block_length: int = 1
  num_parallel_reads: int = AUTOTUNE
  read_buffer_bytes: int = 8 << 20
  shuffle_buffer_size: int = 10_000
  cache: bool = False
  check_shards: bool = True
  label_offset: int = schema.LABEL_OFFSET_ON_DISK
  num_parallel_calls: int = AUTOTUNE


@dataclasses.dataclass(frozen=True)
class BatchOptions:
  """How preprocessed examples become the batches a step takes.

  batch_size: examples per batch *per replica* (the caller passes
    `input_context.get_per_replica_batch_size(global_batch_size)`).
  drop_remainder: drop a final partial batch, giving the static batch shape TPUs need.
    For evaluation this leaves out up to batch_size - 1 examples per host; pass False
    for an exact count (the last batch is then smaller), or use pad_to_batches.
  pad_to_batches: evaluation only: exactly this many full batches of (images, labels,
    weights), every real example (weight 1) followed by zero-weight padding (see
    `batch_with_padding`; `padded_eval_steps` gives the count). Overrides drop_remainder.
  prefetch_batches: batches prepared ahead on the host.
  The tf.data runtime's limits (None: TensorFlow's default), set once on the whole
  pipeline by `batch_and_prefetch`:
  private_threadpool_size: threads of a pool of this dataset's own (None: the shared
    pool); bounds what the input takes from a host that also runs the training step.
  max_intra_op_parallelism: threads one tf.data op may use inside itself.
  autotune_ram_budget_bytes: memory the autotuner may spend on buffers (TensorFlow's
    default: half the host's RAM, too much when several processes share a host).
  """
  batch_size: int
  drop_remainder: bool = True
  pad_to_batches: int | None = None
  prefetch_batches: int = AUTOTUNE
  private_threadpool_size: int | None = None
  max_intra_op_parallelism: int | None = None
  autotune_ram_budget_bytes: int | None = None


def host_stream_key(stream, input_context):
  """The key every seed of this host's stream derives from: (shuffle seed, host)."""
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  return tf.constant([stream.shuffle_seed, pipeline_id], tf.int64)


def tfrecord_stream(file_pattern, stream, read=ReadOptions(), input_context=None):
  """ImageNet-schema TFRecords -> this host's (seed [2], example dict) stream.

  The record half of the pipeline: list files, shard per host, check this host's files,
  shuffle files, parallel interleave, (cache), shuffle, parse. The example dicts are
  `schema.parse_example`'s.

  Training is one endless stream of epochs: epoch e reads this host's files in an order
  keyed by (seed, host, e), interleaved, and permutes each window of its records with a
  key of (seed, host, e, window) (see `shuffled_epochs`); each example's augmentation
  seed is keyed by its position p in that stream. With a deterministic stream the
  example at p is therefore a pure function of (seed, host, p), and resuming is exact:
  `skip_examples = p` starts at epoch p // E (E: this host's examples per epoch), drops
  the whole windows before p's window as encoded records, then the rest of that window
  after permuting it, and numbers the positions from p.

  Args:
    file_pattern: glob (or list of globs) of TFRecord shards.
    stream: `StreamOptions` (resolved here if the caller has not).
    read: `ReadOptions`.
    input_context: a `tf.distribute.InputContext`; shards are split among its input
      pipelines (hosts), disjoint and complete.

  Raises:
    DataError: the pattern matches nothing, or a shard cannot be read (named).
  """
  stream = stream.resolved()
  files = list_shards(file_pattern)
  host = shard_for_host(files, input_context)
  if read.check_shards:
    check_shards_readable(host.files)
  deterministic = stream.deterministic
  if stream.skip_examples and not deterministic:
    logging.warning("skip_examples=%d with a non-deterministic stream: the resumed "
                    "stream will not match the interrupted one exactly.",
                    stream.skip_examples)
  base_key = host_stream_key(stream, input_context)
  files_key, windows_key, augment_key = (_fold(base_key, i) for i in range(3))

  def interleave_shards(file_names):
    records = file_names.interleave(
        lambda path: tf.data.TFRecordDataset(path, buffer_size=read.read_buffer_bytes),
        cycle_length=read.cycle_length, block_length=read.block_length,
        num_parallel_calls=read.num_parallel_reads, deterministic=deterministic)
    return records.shard(host.num_record_shards, host.record_shard_index)

  all_files = tf.data.Dataset.from_tensor_slices(list(host.files))
  cached_records = interleave_shards(all_files).cache() if read.cache else None
  first_position = 0

  if stream.service_epoch:
    # Seeds from the worker's clock and the record (see `service_epoch_records`): no
    # position here, which would give the service a second source to split.
    return service_epoch_records(all_files, interleave_shards, read, base_key).map(
        lambda seed, record: (seed, schema.parse_example(record, read.label_offset)),
        num_parallel_calls=read.num_parallel_calls, deterministic=False)
  if stream.is_training:
    def epoch_records(epoch):
      """This host's encoded records of one epoch, in read order."""
      if cached_records is not None:
        return cached_records
      file_names = all_files
      if read.shuffle_files:
        file_names = tf.data.Dataset.from_tensors(list(host.files)).map(
            lambda names: tf.random.experimental.stateless_shuffle(
                names, seed=_fold(files_key, epoch))).unbatch()
      return interleave_shards(file_names)

    # The window length must not depend on whether this run resumes, so it comes only
    # from the listed counts; counting the records (no dataset_info.json) is done only
    # to resume.
    listed = dataset_info.shard_example_counts(list(host.files))
    per_epoch = examples_of_host(host, listed) if listed else None
    window = shuffle_window_size(per_epoch, read.shuffle_buffer_size)
    skip = stream.skip_examples
    if skip and per_epoch is None:
      per_epoch = examples_per_epoch(host)
    first_epoch, skip_in_epoch = divmod(skip, per_epoch) if skip else (0, 0)
    records = shuffled_epochs(
        epoch_records, first_epoch=first_epoch, window_size=window,
        window_key=lambda epoch, index: _fold(_fold(windows_key, epoch), index),
        skip_windows=skip_in_epoch // window)
    records = records.skip(skip_in_epoch % window)
    first_position = skip
  else:
    records = interleave_shards(all_files)

  # Each record's augmentation seed: a function of its position in the uninterrupted
  # stream, so a resumed run augments each example as the interrupted one would have.
  return records.enumerate(first_position).map(
      lambda position, record: (_fold(augment_key, position),
                                schema.parse_example(record, read.label_offset)),
      num_parallel_calls=read.num_parallel_calls, deterministic=deterministic)


def service_epoch_records(all_files, interleave_shards, read, base_key):
  """One training epoch whose first source is the shard list: (seed, record).

  `all_files` is a dataset of the shards (or of whatever `interleave_shards` opens:
  tfds's (path, skip, take)), `interleave_shards` turns such a dataset into records;
  both the TFRecord and the tfds streams make their service epoch here.

  The tf.data service's "distributed_epoch" mode splits a dataset at its first source
  and hands the splits (here: shards) to its workers as they ask, so every shard is
  read once per pass by some worker. The usual epoch counter on top would make whole
  epochs the splits, and each worker would serve a different epoch at once. The
  shards go out in their sorted order: a shuffle of the shard list would draw every
  split into the first worker that asks (a shuffle or batch reads its whole input).
  Each worker shuffles the records it reads instead, and keys that shuffle and each
  example's augmentation from its clock, read on every pass: the service's order is
  not a function of position anyway, and a fixed key would repeat each epoch's order.
  An example's augmentation key also folds in a hash of its record, not its position:
  `enumerate` would add a second source, which the service would split as well.
  """
  def clock_key(salt):
    micros = tf.cast(tf.timestamp() * 1e6, tf.int64)
    return _fold(_fold(base_key, salt), micros)

  records = (interleave_shards(all_files).batch(read.shuffle_buffer_size)
             .map(lambda block: tf.random.experimental.stateless_shuffle(
                 block, seed=clock_key(1)))
             .prefetch(1).unbatch())
  return records.map(lambda record: (
      _fold(clock_key(2), tf.strings.to_hash_bucket_fast(record, 2**62)), record))


def preprocess_examples(seeded_examples, example_preprocessing, *, skipped_image_counter,
                        num_parallel_calls, deterministic, decode_group_size=32):
  """(seed, example dict) -> (image, label): check, decode, finish; bad images counted.

  Args:
    seeded_examples: dataset of (seed [2], example dict with "image_bytes", "label",
      "filename", "bboxes"), as `tfrecord_stream` and `tfds_stream` make.
    example_preprocessing: a `preprocessing.ExamplePreprocessing`.
    skipped_image_counter: a `SkippedImageCounter` that counts (and logs) records whose
      image is truncated or not an image; they are dropped, never fatal.
    num_parallel_calls, deterministic: parallelism and ordering of the maps.
    decode_group_size: records decoded together under one error guard (see
      `preprocessing.dataset_skipping_errors`): larger spreads the guard's fixed cost
      thinner, smaller keeps fewer images in flight per parallel call.
  """
  def check(seed, example):
    # Count and log here, before decoding: the common corruptions (truncated, empty,
    # not an image) are visible in a few bytes and need no decode attempt.
    valid = tf.cond(preprocessing.is_decodable_image(example["image_bytes"]),
                    lambda: True,
                    lambda: skipped_image_counter.note_skipped(example["filename"]) < 0)
    return seed, example, valid

  def decode(seed, image_bytes, bboxes, label):
    # Only the decoding half runs under the error guard (see decode_group).
    return seed, example_preprocessing.decode(image_bytes, bboxes, seed), label

  def finish(seed, image, label):
    return example_preprocessing.finish(image, seed), label

  def decode_group(seeds, examples, valid):
    """Decodes a group of checked records; counts and drops those the decoder rejects.

    What the cheap check passes can still make libjpeg (or the PNG, GIF, BMP decoder)
    raise: a corrupt header, or a stray marker in the entropy-coded data. Decoding
    under `dataset_skipping_errors` turns that error into a skipped record.
    """
    del valid
    # Padded boxes and their counts: the nested dataset then slices plain tensors.
    # (`ragged_batch` keeps boxes dense when every record has the same static count.)
    boxes = examples["bboxes"]
    if isinstance(boxes, tf.RaggedTensor):
      num_boxes = boxes.row_lengths()
      padded_boxes = boxes.to_tensor(shape=[None, None, 4])
    else:
      num_boxes = tf.fill(tf.shape(boxes, out_type=tf.int64)[:1],
                          tf.shape(boxes, out_type=tf.int64)[1])
      padded_boxes = boxes
    decoded_signature = (tf.TensorSpec([2], seeds.dtype),
                         tf.TensorSpec([None, None, 3], tf.uint8),
                         tf.TensorSpec([], tf.int32))
    return preprocessing.dataset_skipping_errors(
        lambda seed, image_bytes, boxes, count, label: decode(
            seed, image_bytes, boxes[:count], label),
        (seeds, examples["image_bytes"], padded_boxes, num_boxes, examples["label"]),
        decoded_signature,
        lambda index: skipped_image_counter.note_skipped(examples["filename"][index]))

  return (seeded_examples
          .map(check, num_parallel_calls=num_parallel_calls, deterministic=deterministic)
          .filter(lambda seed, example, valid: valid)
          .ragged_batch(decode_group_size)
          # A whole group per turn keeps the records in their order.
          .interleave(decode_group, block_length=decode_group_size,
                      num_parallel_calls=num_parallel_calls, deterministic=deterministic)
          .map(finish, num_parallel_calls=num_parallel_calls,
               deterministic=deterministic))


def batch_and_prefetch(examples, batch, deterministic):
  """(image, label) examples -> prefetched batches, with the pipeline's tf.data options.

  Returns batches of (images, labels), or of (images, labels, weights) with
  `batch.pad_to_batches` (see `batch_with_padding`).
  """
  if batch.pad_to_batches is None:
    batches = examples.batch(batch.batch_size, drop_remainder=batch.drop_remainder)
  else:
    batches = batch_with_padding(examples, batch_size=batch.batch_size,
                                 num_batches=batch.pad_to_batches)
  return batches.prefetch(batch.prefetch_batches).with_options(
      dataset_options(batch, deterministic))


def dataset_options(batch, deterministic):
  """The `tf.data.Options` of a whole pipeline: ordering and the runtime's limits."""
  options = tf.data.Options()
  options.deterministic = deterministic
  options.experimental_optimization.map_parallelization = True
  if batch.private_threadpool_size is not None:
    options.threading.private_threadpool_size = batch.private_threadpool_size
  if batch.max_intra_op_parallelism is not None:
    options.threading.max_intra_op_parallelism = batch.max_intra_op_parallelism
  if batch.autotune_ram_budget_bytes is not None:
    options.autotune.ram_budget = batch.autotune_ram_budget_bytes
  return options


def examples_from_stream(seeded_examples, stream, preprocess, *,
                         num_parallel_calls=AUTOTUNE, skipped_image_counter=None):
  """Any (seed, example dict) stream -> preprocessed (image, label): the second piece.

  The arguments are `batches_from_stream`'s. Apart from it, this is the per-example
  stream that a tf.data service worker makes (see training/data_service.py).
  """
  stream = stream.resolved()
  return preprocess_examples(
      seeded_examples, preprocessing.preprocessing_for(preprocess, stream.is_training),
      skipped_image_counter=skipped_image_counter or SkippedImageCounter(),
      num_parallel_calls=num_parallel_calls, deterministic=stream.deterministic)


def batches_from_stream(seeded_examples, stream, preprocess, batch, *,
                        num_parallel_calls=AUTOTUNE, skipped_image_counter=None):
  """Any (seed, example dict) stream -> batches: the pipeline's second and third pieces.

  The shape of big_vision's `make_for_train(data, preprocess_fn, batch_size)`: the
  preprocessing is built once from `preprocess` (a `preprocessing.PreprocessConfig`)
  for `stream.is_training`, and every source shares the same batching tail.

  Args:
    seeded_examples: as `tfrecord_stream` or `tfds_stream` makes it from `stream`.
    stream: the `StreamOptions` the stream was made with (resolved, so that both see
      the same `deterministic`).
    preprocess: `preprocessing.PreprocessConfig`.
    batch: `BatchOptions`.
    num_parallel_calls: parallelism of the decode.
    skipped_image_counter: a `SkippedImageCounter` (see `preprocess_examples`).
      Default: a private counter, so the skips are still logged with a running count.
  """
  stream = stream.resolved()
  if batch.pad_to_batches is not None and stream.is_training:
    raise ValueError("pad_to_batches applies to evaluation only.")
  images = examples_from_stream(seeded_examples, stream, preprocess,
                                num_parallel_calls=num_parallel_calls,
                                skipped_image_counter=skipped_image_counter)
  return batch_and_prefetch(images, batch, stream.deterministic)


def create_tfrecord_dataset(file_pattern, *, stream, preprocess, batch,
                            read=ReadOptions(), input_context=None,
                            skipped_image_counter=None):
  """ImageNet-schema TFRecords -> batches of (images, labels[, weights]).

  `tfrecord_stream`, then `batches_from_stream`; see them for the arguments.

  Returns:
    A `tf.data.Dataset` of (images [batch_size, image_size, image_size, 3] `dtype`,
    labels [batch_size] int32, 0-based), and weights [batch_size] float32 with
    pad_to_batches.

  Raises:
    DataError: the pattern matches nothing, or a shard cannot be read (named).
  """
  stream = stream.resolved()
  examples = tfrecord_stream(file_pattern, stream, read, input_context)
  return batches_from_stream(examples, stream, preprocess, batch,
                             num_parallel_calls=read.num_parallel_calls,
                             skipped_image_counter=skipped_image_counter)


def device_input_options(device_prefetch_batches=2):
  """`InputOptions` that copy `device_prefetch_batches` batches ahead onto each device.

  Also turns autotuning off in the copy buffers on CPU devices, for the whole process
  (`device_buffers.untune_cpu_device_buffers`): without it, deleting a distributed
  iterator over logical CPU replicas stalls for up to minutes.
  """
  device_buffers.untune_cpu_device_buffers()
  return tf.distribute.InputOptions(
      experimental_fetch_to_device=True,
      experimental_per_replica_buffer_size=device_prefetch_batches)


def distributed_dataset_fn(create_dataset, global_batch_size, *,
                           device_prefetch_batches=2, **dataset_kwargs):
  """A `dataset_fn(input_context)` and the `InputOptions` to distribute it with.

  Usage:
    dataset_fn, options = distributed_dataset_fn(
        functools.partial(create_tfrecord_dataset, pattern, is_training=True,
                          image_size=224), global_batch_size=1024)
    dist_dataset = strategy.distribute_datasets_from_function(dataset_fn, options)

  `dataset_fn` also works as a tf_keras `DatasetCreator` function. Each host builds its
  own pipeline, reading its own shards, with the per-replica batch size; the strategy
  then copies `device_prefetch_batches` batches ahead onto each device, so the step
  never waits for a host-to-device transfer.

  Args:
    create_dataset: one of the dataset builders (or a partial of it); called with
      `batch_size=` and `input_context=`.
    global_batch_size: examples per step over all replicas.
    device_prefetch_batches: per-replica buffer on the device.
    **dataset_kwargs: passed to `create_dataset`.
  """
  def dataset_fn(input_context):
    per_replica_batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    return create_dataset(batch_size=per_replica_batch_size, input_context=input_context,
                          **dataset_kwargs)

  return dataset_fn, device_input_options(device_prefetch_batches)

