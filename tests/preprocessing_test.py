"""Tests for input_pipeline.preprocessing: each op alone, eagerly and inside Dataset.map."""

from tests import logical_devices

logical_devices.configure_logical_cpus()

import io  # pylint: disable=g-import-not-at-top,wrong-import-position

import numpy as np
import tensorflow as tf
import tf_keras
from absl.testing import parameterized
from PIL import Image
from sklearn.datasets import load_sample_images

from input_pipeline import preprocessing
from tests import bad_images
from training import model as model_lib


def _photo():
  """A real 427x640 photograph shipped with scikit-learn."""
  return load_sample_images().images[0]


def _jpeg(pixels, quality=90, subsampling="4:2:0"):
  output = io.BytesIO()
  Image.fromarray(pixels).save(output, format="JPEG", quality=quality,
                               subsampling=subsampling)
  return output.getvalue()


def _png(pixels):
  output = io.BytesIO()
  Image.fromarray(pixels).save(output, format="PNG")
  return output.getvalue()


def _psnr(a, b):
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / mse)


def _in_dataset_map(fn, *args):
  """Runs fn(*args) inside Dataset.map (graph mode, tf.data threads)."""
  dataset = tf.data.Dataset.from_tensors(tuple(args)).map(fn)
  return next(iter(dataset))


class FusedDecodeCropTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(
      ([40, 60, 300, 420],), ([0, 0, 427, 640],), ([17, 33, 100, 101],),
      ([426, 639, 1, 1],), ([16, 32, 300, 416],))
  def test_equals_decode_then_crop_pixel_for_pixel(self, window):
    # 4:4:4 chroma: no upsampling at the window edges, so the fused op must be exact.
    jpeg = _jpeg(_photo(), subsampling="4:4:4")
    reference = tf.io.decode_jpeg(jpeg, channels=3).numpy()[
        window[0]:window[0] + window[2], window[1]:window[1] + window[3]]
    eager = preprocessing.decode_jpeg_window(jpeg, tf.constant(window))
    mapped = _in_dataset_map(
        lambda b, w: preprocessing.decode_jpeg_window(b, w), jpeg, tf.constant(window))
    self.assertAllEqual(eager, reference)
    self.assertAllEqual(mapped, reference)

  def test_chroma_subsampled_differs_only_on_window_edge_columns(self):
    # With 4:2:0, libjpeg's "fancy" chroma upsampling replicates the window's edge
    # instead of reading the neighbour column: the interior must still be exact.
    jpeg = _jpeg(_photo(), subsampling="4:2:0")
    window = [40, 60, 300, 420]
    reference = tf.io.decode_jpeg(jpeg, channels=3).numpy()[40:340, 60:480]
    fused = preprocessing.decode_jpeg_window(jpeg, tf.constant(window)).numpy()
    self.assertAllEqual(fused[:, 1:-1], reference[:, 1:-1])
    self.assertLessEqual(np.abs(fused.astype(int) - reference).max(), 16)


class CropWindowTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(((0.08, 1.0),), ((0.5, 1.0),))
  def test_random_windows_in_bounds_and_ranges(self, area_range):
    aspect_range = (3 / 4, 4 / 3)
    height, width = 375, 500
    shape = tf.constant([height, width, 3])
    center = preprocessing.center_crop_window(shape).numpy()

    def sample(index):
      return preprocessing.random_crop_window(
          shape, tf.zeros([0, 4]), tf.stack([index, 7]), area_range=area_range,
          aspect_ratio_range=aspect_range)

    windows = np.stack(list(tf.data.Dataset.range(500).map(sample).as_numpy_iterator()))
    offset_y, offset_x, crop_h, crop_w = windows.T
    self.assertTrue(np.all(offset_y >= 0) and np.all(offset_x >= 0))
    self.assertTrue(np.all(offset_y + crop_h <= height))
    self.assertTrue(np.all(offset_x + crop_w <= width))
    sampled = ~np.all(windows == center, axis=1)
    self.assertGreater(sampled.mean(), 0.9)
    area = crop_h[sampled] * crop_w[sampled] / (height * width)
    # The sampler rounds to whole pixels: allow a pixel's worth of slack.
    self.assertTrue(np.all(area >= area_range[0] - 0.01), area.min())
    self.assertTrue(np.all(area <= area_range[1]))
    aspect = crop_w[sampled] / crop_h[sampled]
    slack = 1.0 / crop_h[sampled] + 0.01
    self.assertTrue(np.all(aspect >= aspect_range[0] - slack), aspect.min())
    self.assertTrue(np.all(aspect <= aspect_range[1] + slack), aspect.max())
    # Windows really vary: the crop is random, not a few fixed boxes.
    self.assertGreater(len({tuple(w) for w in windows}), 400)

  def test_impossible_constraints_fall_back_to_center_crop(self):
    # A 10:1 panorama cannot hold a 3/4..4/3 window of 90% of its area.
    shape = tf.constant([50, 500, 3])
    window = preprocessing.random_crop_window(shape, tf.zeros([0, 4]), [1, 2],
                                              area_range=(0.9, 1.0))
    self.assertAllEqual(window, [4, 229, 43, 43])  # 224/256 of 50 = 43, centred.

  def test_same_seed_same_window(self):
    shape = tf.constant([375, 500, 3])
    first = preprocessing.random_crop_window(shape, tf.zeros([0, 4]), [3, 4])
    second = _in_dataset_map(
        lambda s: preprocessing.random_crop_window(s, tf.zeros([0, 4]), [3, 4]), shape)
    self.assertAllEqual(first, second)

  def test_window_covers_bounding_box(self):
    shape = tf.constant([400, 400, 3])
    box = tf.constant([[0.5, 0.5, 1.0, 1.0]])  # bottom-right quarter
    for seed in range(20):
      y, x, h, w = preprocessing.random_crop_window(
          shape, box, [seed, 0], area_range=(0.05, 0.3)).numpy()
      covered_h = max(0, min(y + h, 400) - max(y, 200))
      covered_w = max(0, min(x + w, 400) - max(x, 200))
      self.assertGreaterEqual(covered_h * covered_w, 0.1 * 200 * 200 - 400)

  @parameterized.parameters(
      ((300, 420), 224, 1), ((300, 420), 150, 2), ((300, 420), 149, 2),
      ((300, 420), 75, 4), ((300, 420), 37, 8), ((300, 420), 10, 8),
      ((447, 2000), 224, 1), ((448, 448), 224, 2))
  def test_dct_scale_ratio(self, size, output_size, expected):
    window = tf.constant([0, 0, size[0], size[1]])
    self.assertEqual(int(preprocessing.dct_scale_ratio(window, output_size)), expected)


class DctScaledDecodeTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((100, 2), (64, 4), (32, 8))
  def test_close_to_full_scale_decode_crop_resize(self, output_size, expected_ratio):
    window = tf.constant([40, 56, 296, 416])  # multiples of 8: the aligned window
    for photo in load_sample_images().images:
      jpeg = _jpeg(photo)
      ratio = preprocessing.dct_scale_ratio(window, output_size)
      self.assertEqual(int(ratio), expected_ratio)
      scaled = preprocessing.decode_jpeg_window(jpeg, window, ratio)
      self.assertAllEqual(tf.shape(scaled)[:2], [296 // expected_ratio,
                                                 416 // expected_ratio])
      fast = preprocessing.resize_image(scaled, output_size)
      full = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
      # The reference: a full-scale decode, crop and antialiased (alias-free) resize.
      reference = preprocessing.resize_image(full, output_size, antialias=True)
      self.assertGreater(_psnr(np.clip(fast, 0, 255), np.clip(reference, 0, 255)), 30.0)

  def test_unaligned_window_stays_in_bounds(self):
    jpeg = _jpeg(_photo())  # 427 x 640: ceil(427 / 8) = 54 scaled rows
    window = tf.constant([399, 599, 28, 41])  # ends at the bottom-right corner
    for ratio in (2, 4, 8):
      image = preprocessing.decode_jpeg_window(jpeg, window, tf.constant(ratio))
      self.assertAllEqual(tf.shape(image), [28 // ratio, 41 // ratio, 3])


class ImageCheckTest(tf.test.TestCase):

  def test_decodable(self):
    photo = _photo()[:64, :64]
    jpeg = _jpeg(photo)
    cases = {
        jpeg: True,
        jpeg + b"\0" * 10: True,  # padding after the end marker
        jpeg[:len(jpeg) // 2]: False,  # truncated
        _png(photo): True,
        _png(photo)[:-20]: False,
        b"not an image at all": False,
        b"": False,
    }
    for image_bytes, expected in cases.items():
      self.assertEqual(bool(preprocessing.is_decodable_image(image_bytes)), expected)
      self.assertEqual(bool(_in_dataset_map(preprocessing.is_decodable_image,
                                            image_bytes)), expected)


  def test_cheap_check_on_each_kind_of_bad_image(self):
    # Rejected from a few bytes: no decode needed. The rest pass the check and are
    # either decoded or rejected by the decoder (see the pipeline tests).
    rejected_by_check = {"jpeg_truncated", "png_truncated", "empty", "webp", "tiff",
                         "random_bytes"}
    for name, (image_bytes, _) in bad_images.bad_image_cases().items():
      self.assertEqual(bool(preprocessing.is_decodable_image(image_bytes)),
                       name not in rejected_by_check, name)

  def test_decoder_outcome_of_each_kind_passing_the_check(self):
    # What `map_skipping_errors` exists for: these raise inside the decode op.
    for name, (image_bytes, outcome) in bad_images.bad_image_cases().items():
      if not preprocessing.is_decodable_image(image_bytes):
        continue
      decode = lambda b: preprocessing.preprocess_for_eval(b, image_size=16)
      if outcome == "decoded":
        self.assertEqual(decode(image_bytes).shape, (16, 16, 3), name)
      else:
        with self.assertRaises(tf.errors.InvalidArgumentError, msg=name):
          decode(image_bytes)
    # The stray marker is read once the window reaches the last rows.
    marker = bad_images.bad_image_cases()["jpeg_marker_in_scan"][0]
    with self.assertRaises(tf.errors.InvalidArgumentError):
      preprocessing.preprocess_for_eval(marker, image_size=16, crop_fraction=1.0)


class DatasetSkippingErrorsTest(tf.test.TestCase):

  def _decode_all(self, group):
    """(decoded images in order, bit mask of the indices reported as failed)."""
    failed_mask = tf.Variable(0, dtype=tf.int64)

    def note_failure(index):
      return tf.identity(failed_mask.assign_add(
          tf.bitwise.left_shift(tf.constant(1, tf.int64), index)))

    dataset = preprocessing.dataset_skipping_errors(
        lambda b: preprocessing.preprocess_for_eval(b, image_size=8),
        (tf.constant(group),), tf.TensorSpec([8, 8, 3], tf.float32), note_failure)
    images = [image.numpy() for image in dataset]
    return images, int(failed_mask.numpy())

  def test_keeps_the_elements_that_decode_in_order(self):
    good = _jpeg(_photo()[:64, :64])
    cases = bad_images.bad_image_cases()
    group = [good, cases["jpeg_corrupt_huffman_table"][0], good,
             cases["png_corrupt_body"][0], cases["jpeg_noise_in_scan"][0],
             cases["gif_truncated"][0]]
    images, failed_mask = self._decode_all(group)
    self.assertLen(images, 3)
    self.assertEqual(failed_mask, (1 << 1) | (1 << 3) | (1 << 5))
    expected = preprocessing.preprocess_for_eval(good, image_size=8)
    self.assertAllClose(images[0], expected)
    self.assertAllClose(images[1], expected)
    self.assertAllClose(
        images[2], preprocessing.preprocess_for_eval(group[4], image_size=8))

  def test_a_group_that_all_fails_keeps_nothing_and_reports_all(self):
    corrupt = bad_images.bad_image_cases()["jpeg_corrupt_huffman_table"][0]
    images, failed_mask = self._decode_all([corrupt, corrupt])
    self.assertEqual(images, [])
    self.assertEqual(failed_mask, 0b11)


class PreprocessTest(tf.test.TestCase, parameterized.TestCase):

  def test_normalize_matches_numpy(self):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    expected = (pixels - np.array(preprocessing.IMAGENET_MEAN_RGB)) / np.array(
        preprocessing.IMAGENET_STDDEV_RGB)
    self.assertAllClose(preprocessing.normalize_image(pixels), expected, atol=1e-5)
    self.assertAllClose(_in_dataset_map(preprocessing.normalize_image, pixels), expected,
                        atol=1e-5)
    bfloat16 = preprocessing.normalize_image(pixels, dtype=tf.bfloat16)
    self.assertEqual(bfloat16.dtype, tf.bfloat16)
    self.assertAllClose(tf.cast(bfloat16, tf.float32), expected, atol=0.05)

  def test_flip_is_seeded_and_mirrors(self):
    image = tf.reshape(tf.range(2 * 3 * 3, dtype=tf.float32), [2, 3, 3])
    outcomes = set()
    for seed in range(16):
      flipped = preprocessing.random_flip(image, [seed, 0])
      self.assertAllEqual(flipped, preprocessing.random_flip(image, [seed, 0]))
      is_flipped = bool(tf.reduce_all(flipped == image[:, ::-1]))
      self.assertTrue(is_flipped or bool(tf.reduce_all(flipped == image)))
      outcomes.add(is_flipped)
    self.assertEqual(outcomes, {True, False})


  def test_training_finish_flips_only_when_asked(self):
    image = tf.constant(
        np.random.default_rng(1).integers(0, 256, (6, 6, 3)).astype(np.uint8))
    unflipped = preprocessing.normalize_image(image)
    mirrored = preprocessing.normalize_image(image[:, ::-1])
    flips = set()
    for seed in range(16):
      config = preprocessing.PreprocessConfig(
          image_size=6, **preprocessing.DIGITS_AUGMENTATION)
      kept = preprocessing.preprocessing_for(config, is_training=True).finish(
          image, tf.constant([seed, 0]))
      self.assertAllClose(kept, unflipped, atol=1e-5)
      flipped = preprocessing.finish_for_train(image, tf.constant([seed, 0]),
                                               image_size=6, flip=True)
      flips.add(bool(np.allclose(flipped, mirrored, atol=1e-5)))
    self.assertEqual(flips, {True, False})
  def test_eval_is_deterministic_and_same_in_map(self):
    jpeg = _jpeg(_photo())
    run = lambda b: preprocessing.preprocess_for_eval(b, image_size=64)
    eager = run(jpeg)
    self.assertEqual(eager.shape, (64, 64, 3))
    self.assertAllEqual(eager, run(jpeg))
    self.assertAllClose(eager, _in_dataset_map(run, jpeg), atol=1e-5)

  def test_eval_matches_numpy_center_crop(self):
    jpeg = _jpeg(_photo(), subsampling="4:4:4")
    decoded = tf.io.decode_jpeg(jpeg, channels=3).numpy()  # 427 x 640
    side = int(427 * 224 / 256)
    top, left = (427 - side + 1) // 2, (640 - side + 1) // 2
    crop = decoded[top:top + side, left:left + side]
    expected = preprocessing.normalize_image(tf.image.resize(crop, [64, 64]))
    self.assertAllClose(preprocessing.preprocess_for_eval(jpeg, image_size=64), expected,
                        atol=1e-4)

  @parameterized.parameters(False, True)
  def test_train_is_function_of_seed(self, use_dct_scaling):
    jpeg = _jpeg(_photo())
    run = lambda b, s: preprocessing.preprocess_for_train(
        b, tf.zeros([0, 4]), s, image_size=48, use_dct_scaling=use_dct_scaling)
    first = run(jpeg, tf.constant([1, 2]))
    self.assertEqual(first.shape, (48, 48, 3))
    self.assertAllClose(first, _in_dataset_map(run, jpeg, tf.constant([1, 2])),
                        atol=1e-5)
    self.assertNotAllClose(first, run(jpeg, tf.constant([1, 3])))

  def test_png_in_jpeg_field_uses_generic_decoder(self):
    photo = _photo()[:120, :160]
    png = _png(photo)
    eval_image = preprocessing.preprocess_for_eval(png, image_size=32)
    expected = preprocessing.preprocess_for_eval(_jpeg(photo, quality=100,
                                                       subsampling="4:4:4"),
                                                 image_size=32)
    self.assertAllClose(eval_image, expected, atol=0.2)  # only JPEG's rounding differs
    train = _in_dataset_map(
        lambda b: preprocessing.preprocess_for_train(b, tf.zeros([0, 4]), [1, 1],
                                                     image_size=32), png)
    self.assertEqual(train.shape, (32, 32, 3))


# Rounding to a pixel level moves a value by at most half a level: in normalised units
# 0.5 / stddev, largest for the smallest stddev (green's, 0.224 * 255).
_ROUNDING_BOUND = 0.5 / min(preprocessing.IMAGENET_STDDEV_RGB) + 1e-5


class PixelOutputTest(tf.test.TestCase, parameterized.TestCase):
  """uint8 pixels out of the host, normalised on the device by the model."""

  def _host_and_pixels(self, is_training, resize_method="bilinear"):
    jpeg = _jpeg(_photo())
    config = lambda dtype: preprocessing.PreprocessConfig(
        image_size=56, resize_method=resize_method, dtype=dtype)
    def run(image_bytes, dtype):
      example = preprocessing.preprocessing_for(config(dtype), is_training)
      seed = tf.constant([3, 4], tf.int64)
      return example.finish(example.decode(image_bytes, tf.zeros([0, 4]), seed), seed)
    return (run(jpeg, tf.float32), run(jpeg, tf.uint8),
            _in_dataset_map(lambda image_bytes: run(image_bytes, tf.uint8), jpeg))

  @parameterized.parameters(True, False)
  def test_pixels_are_the_host_images_before_normalising_rounded(self, is_training):
    host, pixels, in_map = self._host_and_pixels(is_training)
    self.assertEqual(pixels.dtype, tf.uint8)
    self.assertEqual(pixels.shape, (56, 56, 3))
    self.assertAllEqual(pixels, in_map)
    # The same crop, resize and flip: the host's values, un-normalised, are within
    # half a level of the pixels (and not all on one level: a real photograph).
    unnormalised = (host.numpy() * np.array(preprocessing.IMAGENET_STDDEV_RGB)
                    + np.array(preprocessing.IMAGENET_MEAN_RGB))
    self.assertAllLessEqual(np.abs(pixels.numpy() - unnormalised), 0.5 + 1e-3)
    self.assertGreater(len(np.unique(pixels.numpy())), 100)
    self.assertAllClose(preprocessing.normalize_image(pixels), host, rtol=0,
                        atol=_ROUNDING_BOUND)

  def test_overshooting_resize_is_clipped(self):
    _, pixels, _ = self._host_and_pixels(True, resize_method="lanczos3")
    self.assertEqual(pixels.dtype, tf.uint8)
    overshoot = preprocessing.to_pixels(tf.constant([-3.2, 0.4, 254.6, 260.0]),
                                        "lanczos3")
    self.assertAllEqual(overshoot, [0, 0, 255, 255])

  def test_model_normalises_pixels_as_the_host_would(self):
    identity = tf_keras.Sequential([tf_keras.layers.Lambda(lambda images: images)])
    classifier = model_lib.ImageClassifier(identity, global_batch_size=2, num_classes=3)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3)).astype(np.uint8)
    on_device = tf.function(lambda images: classifier(images, training=True))
    host = preprocessing.normalize_image(pixels)
    self.assertAllClose(on_device(tf.constant(pixels)), host, rtol=0, atol=1e-6)
    self.assertAllClose(classifier(tf.constant(pixels), training=False), host, rtol=0,
                        atol=1e-6)
    # Float inputs (synthetic data, host-normalised images) go in unchanged.
    self.assertAllEqual(classifier(host), host)


if __name__ == "__main__":
  tf.test.main()
