"""The ImageNet TFRecord schema: building `tf.train.Example`s and parsing them back.

These are the feature keys that the public ImageNet-to-TFRecord converters write, so
records made by them and by `write_tfrecords` are interchangeable. Labels on disk are
1-based (0 was reserved for "background" in the original converter); the parser turns
them into 0-based class indices.
"""

import tensorflow as tf

ENCODED_IMAGE = "image/encoded"
LABEL = "image/class/label"
CLASS_TEXT = "image/class/text"
HEIGHT = "image/height"
WIDTH = "image/width"
FORMAT = "image/format"
FILENAME = "image/filename"
CHANNELS = "image/channels"
COLORSPACE = "image/colorspace"
BBOX_XMIN = "image/object/bbox/xmin"
BBOX_YMIN = "image/object/bbox/ymin"
BBOX_XMAX = "image/object/bbox/xmax"
BBOX_YMAX = "image/object/bbox/ymax"
BBOX_LABEL = "image/object/bbox/label"

# The label stored on disk is the class index plus this offset.
LABEL_OFFSET_ON_DISK = 1


def _bytes_feature(value):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(values):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def _float_feature(values):
  return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def make_example(encoded_image, class_index, height, width, *, image_format="JPEG",
                 filename="", class_text="", bboxes=()):
  """Builds one ImageNet-schema `tf.train.Example`.

  Args:
    encoded_image: the encoded image bytes (JPEG for the fused decode-and-crop path).
    class_index: 0-based class index; stored as `class_index + 1`.
    height, width: image size in pixels.
    image_format: value of `image/format`, e.g. "JPEG".
    filename: original file name, kept so a skipped record can be named in the log.
    class_text: human-readable class name.
    bboxes: sequence of (ymin, xmin, ymax, xmax) boxes, coordinates in [0, 1].
  """
  def text(value):
    return value.encode("utf-8") if isinstance(value, str) else value

  bboxes = list(bboxes)
  feature = {
      ENCODED_IMAGE: _bytes_feature(encoded_image),
      LABEL: _int64_feature([class_index + LABEL_OFFSET_ON_DISK]),
      CLASS_TEXT: _bytes_feature(text(class_text)),
      HEIGHT: _int64_feature([height]),
      WIDTH: _int64_feature([width]),
      CHANNELS: _int64_feature([3]),
      COLORSPACE: _bytes_feature(b"RGB"),
      FORMAT: _bytes_feature(text(image_format)),
      FILENAME: _bytes_feature(text(filename)),
      BBOX_YMIN: _float_feature(b[0] for b in bboxes),
      BBOX_XMIN: _float_feature(b[1] for b in bboxes),
      BBOX_YMAX: _float_feature(b[2] for b in bboxes),
      BBOX_XMAX: _float_feature(b[3] for b in bboxes),
      BBOX_LABEL: _int64_feature([class_index + LABEL_OFFSET_ON_DISK] * len(bboxes)),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature))


_FEATURES = {
    ENCODED_IMAGE: tf.io.FixedLenFeature([], tf.string),
    LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    FILENAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
    BBOX_YMIN: tf.io.VarLenFeature(tf.float32),
    BBOX_XMIN: tf.io.VarLenFeature(tf.float32),
    BBOX_YMAX: tf.io.VarLenFeature(tf.float32),
    BBOX_XMAX: tf.io.VarLenFeature(tf.float32),
}


def parse_example(serialized, label_offset=LABEL_OFFSET_ON_DISK):
  """Parses one serialized ImageNet-schema example.

  Only the features the pipeline uses are parsed (height, width and format are not:
  the JPEG header is the authority on the size, and the bytes' magic number on the
  format, which is how a PNG stored in a "JPEG" record is still decoded).

  Args:
    serialized: scalar string tensor.
    label_offset: subtracted from the stored label; 1 for the ImageNet converters.

  Returns:
    dict with "image_bytes" (string), "label" (int32, 0-based), "filename" (string) and
    "bboxes" (float32 [num_boxes, 4] as ymin, xmin, ymax, xmax; possibly empty).
  """
  parsed = tf.io.parse_single_example(serialized, _FEATURES)

  def coordinate(key):
    return tf.sparse.to_dense(parsed[key])

  bboxes = tf.stack([coordinate(BBOX_YMIN), coordinate(BBOX_XMIN),
                     coordinate(BBOX_YMAX), coordinate(BBOX_XMAX)], axis=-1)
  return {
      "image_bytes": parsed[ENCODED_IMAGE],
      "label": tf.cast(parsed[LABEL] - label_offset, tf.int32),
      "filename": parsed[FILENAME],
      "bboxes": tf.reshape(bboxes, [-1, 4]),
  }
