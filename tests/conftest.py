"""pytest runs the tf.test suites without absl's main, so absl flags (which
absltest's create_tempdir reads) are marked parsed with their defaults here."""

from absl import flags

flags.FLAGS.mark_as_parsed()
