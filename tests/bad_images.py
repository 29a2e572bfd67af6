"""Broken image records, as a pipeline meets them: byte strings for tests to feed it.

Each function takes a good encoded image (or nothing) and returns bytes damaged in one
known way. `bad_image_cases` gathers them with what an evaluation pass (centre crop)
must do with each: "decoded" (the decoder recovers) or "skipped" (dropped and counted,
never fatal). See `input_pipeline.preprocessing.is_decodable_image` for why.
"""

import io
import struct

import numpy as np
from PIL import Image

_START_OF_SCAN = 0xDA


def noise_image(seed, height=48, width=64):
  """uint8 [height, width, 3] of smooth noise (compresses like a photo, not like static)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), np.uint8)
  return np.kron(coarse, np.ones((8, 8, 1), np.uint8))[:height, :width]


def encode(pixels, image_format="JPEG", **options):
  output = io.BytesIO()
  Image.fromarray(pixels).save(output, format=image_format, **options)
  return output.getvalue()


def scan_data_offset(jpeg):
  """Offset of the first entropy-coded byte: just past the first start-of-scan header."""
  offset = 2  # past the start-of-image marker
  while offset + 4 <= len(jpeg):
    if jpeg[offset] != 0xFF:
      raise ValueError(f"no marker at offset {offset}: not a well-formed JPEG header")
    marker = jpeg[offset + 1]
    (length,) = struct.unpack(">H", jpeg[offset + 2:offset + 4])
    offset += 2 + length
    if marker == _START_OF_SCAN:
      return offset
  raise ValueError("no start-of-scan marker")


def _overwrite(data, offset, replacement):
  damaged = bytearray(data)
  damaged[offset:offset + len(replacement)] = replacement
  return bytes(damaged)


def _middle_of_scan(jpeg):
  start = scan_data_offset(jpeg)
  return start + (len(jpeg) - start) // 2


def jpeg_with_noise_in_scan(jpeg, length=64, seed=0):
  """Random bytes (none of them FF, so no marker) over the middle of the scan data.

  libjpeg loses sync, warns, and decodes the rest: a recoverable corruption.
  """
  noise = np.random.default_rng(seed).integers(0, 255, length, np.uint8).tobytes()
  return _overwrite(jpeg, _middle_of_scan(jpeg), noise)


def jpeg_with_marker_in_scan(jpeg):
  """A Huffman-table marker (FF C4) in the middle of the scan data, its "table" the
  scan bytes that follow; header and end marker intact.

  libjpeg fills the rest of the scan grey at the marker and reads the marker (and
  rejects it) only after the image's last rows: a decode whose crop window reaches
  them raises, one that stops above them (the centre crop) does not.
  """
  return _overwrite(jpeg, _middle_of_scan(jpeg), b"\xff\xc4")


def jpeg_with_corrupt_huffman_table(jpeg):
  """Garbage over the first Huffman table (DHT): the header itself is rejected."""
  offset = jpeg.index(b"\xff\xc4")
  return _overwrite(jpeg, offset + 5, b"\xff" * 16)


def truncated(data):
  """The first half: an interrupted download or copy."""
  return data[:len(data) // 2]


def png_with_corrupt_body(png, seed=0):
  """Random bytes over the compressed pixels (IDAT), IEND and signature intact."""
  start = png.index(b"IDAT") + 8
  noise = np.random.default_rng(seed).integers(0, 256, 32, np.uint8).tobytes()
  return _overwrite(png, start, noise)


def empty():
  return b""


def webp_header():
  """The start of a WebP file: a format TensorFlow's decoders do not read."""
  return b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(40)


def tiff_header():
  return b"II*\x00" + bytes(100)


def random_bytes(length=500, seed=0):
  return np.random.default_rng(seed).integers(0, 256, length, np.uint8).tobytes()


# Cases whose outcome depends on the crop window: "skipped" instead of "decoded" when
# the window reaches the image's last rows (e.g. `eval_crop_fraction=1.0`).
SKIPPED_WHEN_WINDOW_REACHES_LAST_ROWS = ("jpeg_marker_in_scan",)


def bad_image_cases(seed=0):
  """{name: (image bytes, "decoded" or "skipped")} for an evaluation (centre-crop) pass.

  Built from a noise image of 48x64 pixels; the decoded ones come out as images of
  that size, damaged where the bytes were.
  """
  pixels = noise_image(seed)
  jpeg = encode(pixels, quality=90)
  png = encode(pixels, "PNG")
  gif = encode(pixels, "GIF")
  return {
      "jpeg_noise_in_scan": (jpeg_with_noise_in_scan(jpeg, seed=seed), "decoded"),
      "jpeg_marker_in_scan": (jpeg_with_marker_in_scan(jpeg), "decoded"),
      "jpeg_corrupt_huffman_table": (jpeg_with_corrupt_huffman_table(jpeg), "skipped"),
      "jpeg_truncated": (truncated(jpeg), "skipped"),
      "png_corrupt_body": (png_with_corrupt_body(png, seed=seed), "skipped"),
      "png_truncated": (truncated(png), "skipped"),
      "gif_truncated": (truncated(gif), "skipped"),
      "empty": (empty(), "skipped"),
      "webp": (webp_header(), "skipped"),
      "tiff": (tiff_header(), "skipped"),
      "random_bytes": (random_bytes(seed=seed), "skipped"),
  }
