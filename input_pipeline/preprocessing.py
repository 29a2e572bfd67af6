"""Per-example image preprocessing: small pure functions, each doing one thing.

Training: sample a crop window from the JPEG header alone, decode only that window
(fused decode-and-crop), resize, flip, normalize. Evaluation: decode a centre window,
resize, normalize. All randomness is stateless and driven by an explicit seed, so an
example's augmentation depends only on (seed, its position in the stream) and not on
how many threads ran the map: that is what lets a resumed run reproduce the original.

Why fused: a random crop keeps on average about half the pixels (area 0.08-1), and
libjpeg can skip the entropy decoding of whole MCU rows outside the window, so decoding
the window costs less than decoding the image and slicing (Ying et al. 2018, sec. 3.2).
Beyond the paper: when the window is at least twice the output size on both sides,
libjpeg can also decode at 1/2, 1/4 or 1/8 scale in the DCT domain, which skips most of
the inverse-DCT work and shrinks the resize.
"""

import dataclasses
from typing import Callable

import tensorflow as tf

# ImageNet per-channel statistics of RGB pixels in [0, 255]; inputs are normalized as
# (pixel - mean) / stddev, the convention of the reference ResNet-50 code.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# The reference evaluation crop: resize-to-256-then-centre-224, as a fraction of the
# shorter side.
EVAL_CROP_FRACTION = 224 / 256

# Area range of the random crop. ImageNet: the Inception range. The digits set: milder,
# because an 8x8 digit upscaled to 32x32 loses its identity when 8% of it is kept.
IMAGENET_AREA_RANGE = (0.08, 1.0)
DIGITS_AREA_RANGE = (0.5, 1.0)

# Each kind of data's training augmentation, as `PreprocessConfig` fields. Digits are
# not flipped: a mirrored 2, 3 or 7 is no digit, and flipping them cost the default
# run several points of top-1 (docs/RESULTS.md, "The default run").
IMAGENET_AUGMENTATION = dict(area_range=IMAGENET_AREA_RANGE, flip=True)
DIGITS_AUGMENTATION = dict(area_range=DIGITS_AREA_RANGE, flip=False)

# Scales libjpeg can decode at directly (1/ratio of each side).
DCT_SCALE_RATIOS = (1, 2, 4, 8)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG"
_GIF_MAGIC = b"GIF8"
_BMP_MAGIC = b"BM"
_JPEG_END_OF_IMAGE = (0xFF, 0xD9)
# How far from the end of a JPEG the end-of-image marker may sit (some writers pad).
_END_MARKER_SEARCH_BYTES = 64


def is_jpeg(image_bytes):
  """True if the bytes start with the JPEG start-of-image marker."""
  return tf.equal(tf.strings.substr(image_bytes, 0, 3), _JPEG_MAGIC)


def _tail_bytes(image_bytes, length):
  """The last `length` bytes (fewer if the string is shorter) as a uint8 vector."""
  size = tf.strings.length(image_bytes)
  start = tf.maximum(size - length, 0)
  return tf.io.decode_raw(tf.strings.substr(image_bytes, start, size - start), tf.uint8)


def has_jpeg_end_marker(image_bytes):
  """True if an end-of-image marker (FF D9) is among the last bytes.

  Inside the entropy-coded data every FF byte is followed by 00 or a restart marker, so
  FF D9 near the end means the stream was not cut short. A truncated JPEG is the common
  corruption (interrupted download or copy); decoding one fails the whole op.
  """
  tail = tf.cast(_tail_bytes(image_bytes, _END_MARKER_SEARCH_BYTES), tf.int32)
  return tf.reduce_any(tf.logical_and(tf.equal(tail[:-1], _JPEG_END_OF_IMAGE[0]),
                                      tf.equal(tail[1:], _JPEG_END_OF_IMAGE[1])))


def is_decodable_image(image_bytes):
  """Cheap check, before decoding, that the bytes can be an image the decoders know.

  True for a JPEG with its end marker, a PNG with its IEND chunk, a GIF or a BMP (a PNG
  stored in a "JPEG" field is decoded by the generic decoder, not skipped). This only
  looks at a few bytes at each end; it is the first of two filters, and the second,
  `dataset_skipping_errors` around the decode, catches what it cannot see. What happens to
  each kind of bad record (checked by tests/preprocessing_test.py and
  tests/pipeline_test.py, with the byte strings of tests/bad_images.py):

  Skipped here, before decoding (counted and logged by the pipeline):
    * empty bytes;
    * a format the decoders do not know (WebP, TIFF, HTML, random bytes);
    * a truncated JPEG (no FF D9 near the end) or PNG (no IEND chunk).

  Passed here, then decoded:
    * a JPEG with garbage in its entropy-coded data but no marker in it: libjpeg
      warns ("Corrupt JPEG data: N extraneous bytes") and decodes, the damaged blocks
      smeared. So does garbage in a quantization table.
    * a JPEG with a stray marker (FF followed by anything but 00 or a restart marker)
      in its entropy-coded data, when the crop window stops above the image's last
      rows: libjpeg fills the rest of the scan grey at the marker, and only reads the
      marker itself (and rejects it) after the last rows; the fused crop stops before.

  Passed here, then skipped when the decode op fails (counted and logged the same):
    * that stray marker when the window reaches the last rows ("Bogus Huffman table
      definition", "Unsupported marker type"), as a full decode always does;
    * a JPEG with a corrupt header (SOF, Huffman tables, SOS: "Bogus marker length",
      "Empty JPEG image", "Invalid component ID"), which also fails the shape read;
    * a PNG whose body or CRCs are corrupt but whose IEND chunk is intact;
    * a truncated or garbled GIF or BMP.
  """
  head = tf.strings.substr(image_bytes, 0, 4)
  complete_jpeg = tf.logical_and(is_jpeg(image_bytes), has_jpeg_end_marker(image_bytes))
  # A PNG ends with its 12-byte IEND chunk: length (4), "IEND", CRC (4).
  iend_type = tf.strings.substr(image_bytes,
                                tf.maximum(tf.strings.length(image_bytes) - 8, 0), 4)
  complete_png = tf.logical_and(tf.equal(head, _PNG_MAGIC), tf.equal(iend_type, b"IEND"))
  other = tf.logical_or(tf.equal(head, _GIF_MAGIC),
                        tf.equal(tf.strings.substr(image_bytes, 0, 2), _BMP_MAGIC))
  return tf.logical_or(complete_jpeg, tf.logical_or(complete_png, other))


def dataset_skipping_errors(fn, elements, output_signature, note_failure):
  """A dataset of `fn` over a group's elements, leaving out those whose ops raise.

  A decoder that rejects its input raises an error, and inside a tf.data map an error
  ends the whole input stream, and with it the run. tf.data's `ignore_errors` is the one
  public way to survive an op error inside a graph, but as a dataset transformation
  that drops silently; so the group becomes a small dataset of its own (for
  `Dataset.interleave`), and a scan over the indices that come through calls
  `note_failure` for each one that did not, to count and name it. One nested dataset
  per group, not per element: building one has a fixed cost comparable to a small
  image's decode, which a group of a few dozen images spreads thin. Keep `fn` to the
  ops that can fail (the decode): a function run inside a nested dataset was measured
  slower than the same one in a top-level map (docs/RESULTS.md), so the rest of the
  preprocessing belongs in a map after it.

  Args:
    fn: (*element) -> outputs matching `output_signature`.
    elements: a tuple of tensors sharing their first dimension (the group).
    output_signature: a nest of `tf.TensorSpec` for one element's outputs.
    note_failure: (int64 index of a failed element) -> an int64 scalar tensor.

  Returns:
    A dataset of `fn`'s outputs, in the group's order, for the elements it succeeded
    on; `note_failure` has run for the others once the dataset is exhausted.
  """
  size = tf.shape(elements[0], out_type=tf.int64)[0]
  outputs = (tf.data.Dataset.from_tensor_slices((tf.range(size),) + tuple(elements))
             .map(lambda index, *element: (index, fn(*element)))
             .ignore_errors(log_warning=True))  # the op's own message, with its reason
  # An end marker with index `size`, so failures at the end of the group are seen too.
  end = tf.data.Dataset.from_tensors((size, tf.nest.map_structure(
      lambda spec: tf.zeros([0 if d is None else d for d in spec.shape.as_list()],
                            spec.dtype), output_signature)))

  def note_failures_before(next_index, indexed_output):
    index, output = indexed_output
    # A cond first: the loop's setup is not free, and almost every gap is empty.
    noted = tf.cond(
        index > next_index,
        lambda: tf.reduce_max(tf.map_fn(note_failure, tf.range(next_index, index),
                                        fn_output_signature=tf.int64)),
        lambda: tf.constant(0, tf.int64))
    with tf.control_dependencies([noted]):
      is_output = tf.less(index, size)
    return index + 1, (output, is_output)

  return (outputs.concatenate(end)
          .scan(tf.constant(0, tf.int64), note_failures_before)
          .filter(lambda output, is_output: is_output)
          .map(lambda output, is_output: output))


def center_crop_window(image_shape, crop_fraction=EVAL_CROP_FRACTION):
  """A centred square window, `crop_fraction` of the shorter side.

  Returns:
    int32 [4]: offset_y, offset_x, height, width.
  """
  height, width = image_shape[0], image_shape[1]
  side = tf.cast(crop_fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def random_crop_window(image_shape, bboxes, seed, *, area_range=(0.08, 1.0),
                       aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10,
                       min_object_covered=0.1, fallback_crop_fraction=EVAL_CROP_FRACTION):
  """Samples the Inception-style random crop window, from the image shape alone.

  Tries `max_attempts` windows with area in `area_range` (fraction of the image) and
  width/height in `aspect_ratio_range` covering at least `min_object_covered` of a
  bounding box (the whole image when there are none). If all fail, falls back to the
  centre crop, as the reference ResNet code does.

  Args:
    image_shape: int32 [3] (height, width, channels).
    bboxes: float32 [num_boxes, 4] (ymin, xmin, ymax, xmax) in [0, 1]; may be empty.
    seed: int32/int64 [2] seed for the stateless sampler.

  Returns:
    int32 [4]: offset_y, offset_x, height, width.
  """
  image_shape = tf.cast(image_shape, tf.int32)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=tf.reshape(tf.cast(bboxes, tf.float32), [1, -1, 4]),
      seed=seed,
      min_object_covered=min_object_covered,
      aspect_ratio_range=aspect_ratio_range,
      area_range=area_range,
      max_attempts=max_attempts,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  # The sampler returns the whole image when every attempt failed.
  failed = tf.reduce_all(tf.equal(window[2:], image_shape[:2]))
  return tf.cond(failed, lambda: center_crop_window(image_shape, fallback_crop_fraction),
                 lambda: window)


def dct_scale_ratio(window, output_size, max_ratio=8):
  """The largest of 1, 2, 4, 8 (<= max_ratio) leaving the window >= output_size a side.

  Decoding at 1/ratio scale is then followed by a resize that still shrinks (or keeps)
  the window, so no detail the output could show is thrown away.
  """
  shorter_side = tf.minimum(window[2], window[3])
  ratio = tf.constant(1, tf.int32)
  for candidate in DCT_SCALE_RATIOS[1:]:
    if candidate <= max_ratio:
      ratio = tf.where(shorter_side >= candidate * output_size, candidate, ratio)
  return ratio


def scale_crop_window(window, ratio):
  """The window in the coordinates of an image decoded at 1/ratio scale.

  libjpeg's scaled image is ceil(side / ratio) pixels; flooring both offset and size
  keeps the scaled window inside it. In full-scale pixels the crop is then the window
  with offset and size rounded down to multiples of `ratio` (`window // r * r`): a
  shift of under `ratio` pixels, as random as the window itself. (Compare a scaled
  decode with a full-scale crop of that aligned window, not of the original: half a
  scaled pixel of misalignment alone costs about 8 dB of PSNR at ratio 8.)
  """
  return window // ratio


def decode_jpeg_window(image_bytes, window, ratio=None):
  """Fused decode-and-crop of a JPEG; with `ratio` (int32 scalar), at 1/ratio scale.

  `ratio` is an attribute of the decode op, not an input, so each scale is its own
  branch of a `switch_case`; only the selected branch runs.
  """
  if ratio is None:
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
  branches = [
      lambda r=r: tf.image.decode_and_crop_jpeg(
          image_bytes, scale_crop_window(window, r), channels=3, ratio=r)
      for r in DCT_SCALE_RATIOS
  ]
  index = tf.cast(tf.math.log(tf.cast(ratio, tf.float32)) / tf.math.log(2.0) + 0.5,
                  tf.int32)
  return tf.switch_case(index, branches)


def crop_window(image, window):
  """Slices `window` (offset_y, offset_x, height, width) out of a decoded image."""
  return tf.slice(image, tf.stack([window[0], window[1], 0]),
                  tf.stack([window[2], window[3], -1]))


def _decode_and_crop(image_bytes, choose_window, output_size, use_dct_scaling):
  """Decodes the window `choose_window(image_shape)` picks; JPEG fused, others generic."""
  def jpeg():
    window = choose_window(tf.image.extract_jpeg_shape(image_bytes))
    ratio = dct_scale_ratio(window, output_size) if use_dct_scaling else None
    return decode_jpeg_window(image_bytes, window, ratio)

  def generic():  # PNG, GIF or BMP, e.g. a PNG in a "JPEG" record: decode, then slice.
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    return crop_window(image, choose_window(tf.shape(image)))

  image = tf.cond(is_jpeg(image_bytes), jpeg, generic)
  image.set_shape([None, None, 3])
  return image


def decode_and_random_crop(image_bytes, bboxes, seed, *, output_size,
                           use_dct_scaling=False, **window_kwargs):
  """Decodes only a random crop window of the image (uint8 [h, w, 3]).

  `window_kwargs` go to `random_crop_window` (area_range, aspect_ratio_range, ...);
  `output_size` is only used to choose the DCT scale.
  """
  return _decode_and_crop(
      image_bytes, lambda shape: random_crop_window(shape, bboxes, seed, **window_kwargs),
      output_size, use_dct_scaling)


def decode_and_center_crop(image_bytes, *, output_size, crop_fraction=EVAL_CROP_FRACTION,
                           use_dct_scaling=False):
  """Decodes only the centre window (`crop_fraction` of the shorter side)."""
  return _decode_and_crop(
      image_bytes, lambda shape: center_crop_window(shape, crop_fraction), output_size,
      use_dct_scaling)


def resize_image(image, output_size, method="bilinear", antialias=False):
  """Resizes to output_size x output_size; float32 in [0, 255]."""
  image = tf.image.resize(image, [output_size, output_size], method=method,
                          antialias=antialias)
  image.set_shape([output_size, output_size, 3])
  return image


def random_flip(image, seed):
  """Left-right flip with probability 1/2, decided by `seed`."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def normalize_image(image, mean=IMAGENET_MEAN_RGB, stddev=IMAGENET_STDDEV_RGB,
                    dtype=tf.float32):
  """(pixel - mean) / stddev per channel, then cast (bfloat16 for TPUs).

  On the host for float outputs; on the device for uint8 pixels
  (`training.model.ImageClassifier` calls it in its forward pass).
  """
  image = (tf.cast(image, tf.float32) - tf.constant(mean, tf.float32)) / tf.constant(
      stddev, tf.float32)
  return tf.cast(image, dtype)


# Resize methods whose kernels have negative lobes: their output can leave [0, 255].
_OVERSHOOTING_RESIZE_METHODS = ("bicubic", "lanczos3", "lanczos5", "mitchellcubic")


def to_pixels(image, resize_method="bilinear"):
  """A resized float image -> uint8, rounded to the nearest level.

  Bilinear, area and nearest-neighbour resizes average pixels with non-negative
  weights, so their output stays in [0, 255] and needs no clipping (a clip per pixel
  is one more op over the whole image, docs/RESULTS.md); the other methods' outputs
  are clipped.

  The host's output when the device normalises: a quarter of float32's bytes to
  batch and copy, and no float arithmetic per pixel on the host (the divide and
  subtract of `normalize_image` took more host time than the JPEG decode:
  docs/RESULTS.md). Rounding moves a pixel by at most half a level, 0.5 / 57 (the
  smallest stddev) in normalised units.
  """
  if resize_method in _OVERSHOOTING_RESIZE_METHODS:
    return tf.saturate_cast(tf.round(image), tf.uint8)
  return tf.cast(tf.round(image), tf.uint8)


def _finish(image, *, dtype, resize_method, flip=None):
  """Pixels, or normalised `dtype` values, of a resized image; flipped by `flip`."""
  if dtype == tf.uint8:
    image = to_pixels(image, resize_method)  # flipped after: a quarter of the bytes
    return flip(image) if flip else image
  image = flip(image) if flip else image
  return normalize_image(image, dtype=dtype)


def decode_for_train(image_bytes, bboxes, seed, *, image_size, area_range=(0.08, 1.0),
                     aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10,
                     use_dct_scaling=False):
  """The decoding half of `preprocess_for_train`: the random crop window, decoded.

  The only half whose ops can fail on bad bytes; the pipeline runs it under
  `dataset_skipping_errors` and `finish_for_train` outside it.
  """
  crop_seed, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  return decode_and_random_crop(
      image_bytes, bboxes, crop_seed, output_size=image_size,
      use_dct_scaling=use_dct_scaling, area_range=area_range,
      aspect_ratio_range=aspect_ratio_range, max_attempts=max_attempts)


def finish_for_train(image, seed, *, image_size, resize_method="bilinear", flip=True,
                     dtype=tf.float32):
  """The rest of `preprocess_for_train`: resize, flip (seeded, unless `flip` is
  False), normalize (or, for uint8, round to pixels)."""
  _, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = resize_image(image, image_size, method=resize_method)
  return _finish(image, dtype=dtype, resize_method=resize_method,
                 flip=(lambda pixels: random_flip(pixels, flip_seed)) if flip else None)


def preprocess_for_train(image_bytes, bboxes, seed, *, image_size, area_range=(0.08, 1.0),
                         aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10,
                         use_dct_scaling=False, resize_method="bilinear",
                         dtype=tf.float32):
  """Encoded image -> augmented, normalized [image_size, image_size, 3] `dtype`."""
  image = decode_for_train(image_bytes, bboxes, seed, image_size=image_size,
                           area_range=area_range, aspect_ratio_range=aspect_ratio_range,
                           max_attempts=max_attempts, use_dct_scaling=use_dct_scaling)
  return finish_for_train(image, seed, image_size=image_size,
                          resize_method=resize_method, dtype=dtype)


def finish_for_eval(image, *, image_size, resize_method="bilinear", dtype=tf.float32):
  """The rest of `preprocess_for_eval` after `decode_and_center_crop`."""
  return _finish(resize_image(image, image_size, method=resize_method), dtype=dtype,
                 resize_method=resize_method)


def preprocess_for_eval(image_bytes, *, image_size, crop_fraction=EVAL_CROP_FRACTION,
                        use_dct_scaling=False, resize_method="bilinear",
                        dtype=tf.float32):
  """Encoded image -> centre-cropped, normalized [image_size, image_size, 3] `dtype`."""
  image = decode_and_center_crop(image_bytes, output_size=image_size,
                                 crop_fraction=crop_fraction,
                                 use_dct_scaling=use_dct_scaling)
  return finish_for_eval(image, image_size=image_size, resize_method=resize_method,
                         dtype=dtype)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """How an encoded image becomes a model input; the same for every example.

  image_size: side of the square output images.
  area_range, aspect_ratio_range, max_crop_attempts: the random crop of training. Use
    IMAGENET_AREA_RANGE for ImageNet and DIGITS_AREA_RANGE for the embedded digits.
  eval_crop_fraction: the centre crop of evaluation, as a fraction of the shorter side.
  use_dct_scaling: decode at 1/2, 1/4 or 1/8 scale when the crop window is at least
    that many times the output size (see `dct_scale_ratio`). Off by default: the
    images match a full-scale decode closely (tested), but at 224 px an ImageNet-sized
    photo rarely has a window twice the output on both sides, so it only matters for
    smaller outputs or larger photos (benchmarks/input_pipeline.py measures it).
  resize_method: `tf.image.resize` method.
  flip: random left-right flips in training (see IMAGENET_AUGMENTATION and
    DIGITS_AUGMENTATION).
  dtype: output image dtype: tf.uint8 for pixels that the model normalises on the
    device (what the trainer's sources use, see `to_pixels`), else normalised values
    (tf.float32, or tf.bfloat16 for TPUs).
  """
  image_size: int
  area_range: tuple = IMAGENET_AREA_RANGE
  aspect_ratio_range: tuple = (3 / 4, 4 / 3)
  max_crop_attempts: int = 10
  eval_crop_fraction: float = EVAL_CROP_FRACTION
  use_dct_scaling: bool = False
  resize_method: str = "bilinear"
  flip: bool = True
  dtype: tf.dtypes.DType = tf.float32


@dataclasses.dataclass(frozen=True)
class ExamplePreprocessing:
  """One example's preprocessing, split where a damaged image can make it fail.

  decode(image_bytes, bboxes, seed) -> uint8 [height, width, 3]: the crop window,
    decoded. Its ops can raise on bad bytes, so the pipeline runs it under an error
    guard (`dataset_skipping_errors`).
  finish(image, seed) -> [image_size, image_size, 3] `dtype`: resize, (flip),
    normalize. It cannot fail, and runs outside the guard.
  """
  decode: Callable
  finish: Callable


def preprocessing_for(config, is_training):
  """The training (random crop, flip) or evaluation (centre crop) preprocessing."""
  if is_training:
    def decode(image_bytes, bboxes, seed):
      return decode_for_train(
          image_bytes, bboxes, seed, image_size=config.image_size,
          area_range=config.area_range, aspect_ratio_range=config.aspect_ratio_range,
          max_attempts=config.max_crop_attempts, use_dct_scaling=config.use_dct_scaling)

    def finish(image, seed):
      return finish_for_train(image, seed, image_size=config.image_size,
                              resize_method=config.resize_method, flip=config.flip,
                              dtype=config.dtype)
  else:
    def decode(image_bytes, bboxes, seed):
      del bboxes, seed  # The centre crop is the same every time.
      return decode_and_center_crop(
          image_bytes, output_size=config.image_size,
          crop_fraction=config.eval_crop_fraction,
          use_dct_scaling=config.use_dct_scaling)

    def finish(image, seed):
      del seed
      return finish_for_eval(image, image_size=config.image_size,
                             resize_method=config.resize_method, dtype=config.dtype)
  return ExamplePreprocessing(decode, finish)
