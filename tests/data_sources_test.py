"""Tests for training.data_sources: the config's input settings reach the pipeline."""

import tensorflow as tf

from training import config as config_lib
from training import data_sources


def _context(num_hosts, host):
  return tf.distribute.InputContext(num_input_pipelines=num_hosts,
                                    input_pipeline_id=host,
                                    num_replicas_in_sync=num_hosts)


def _settings(**overrides):
  config = config_lib.build_config("cpu_demo", **overrides)
  return data_sources.SourceSettings(config.data, config.loop)


class InputSettingsTest(tf.test.TestCase):

  def test_training_stream_is_deterministic_by_default_and_positioned(self):
    settings = _settings(train_batch_size=64)
    self.assertTrue(settings.data.deterministic_input)
    stream = data_sources.train_stream_options(settings, _context(2, 1), start_step=3)
    self.assertTrue(stream.deterministic)
    self.assertTrue(stream.resolved().deterministic)
    self.assertEqual(stream.skip_examples, 96)  # 3 steps of 32 per host
    self.assertEqual(stream.shuffle_seed, settings.loop.seed)

  def test_nondeterministic_input_says_resume_is_approximate(self):
    settings = _settings(deterministic_input=False)
    with self.assertLogs("absl", level="WARNING") as logs:
      stream = data_sources.train_stream_options(settings, _context(1, 0), start_step=5)
    self.assertFalse(stream.resolved().deterministic)
    self.assertIn("resume is approximate", "\n".join(logs.output))

  def test_runtime_limits_become_batch_options(self):
    batch = data_sources.batch_options(
        _settings(input_threadpool_size=6, input_max_intra_op_parallelism=1,
                  input_ram_budget_mb=512), 8)
    self.assertEqual((batch.batch_size, batch.private_threadpool_size,
                      batch.max_intra_op_parallelism, batch.autotune_ram_budget_bytes),
                     (8, 6, 1, 512 << 20))
    default = data_sources.batch_options(_settings(), 8)
    self.assertIsNone(default.private_threadpool_size)
    self.assertIsNone(default.max_intra_op_parallelism)
    self.assertIsNone(default.autotune_ram_budget_bytes)

  def test_train_and_eval_datasets_carry_the_settings(self):
    config = config_lib.build_config(
        "cpu_demo", deterministic_input=False, input_threadpool_size=3,
        input_max_intra_op_parallelism=1, input_ram_budget_mb=256)
    source = data_sources.data_source_for(config.data, config.loop,
                                          scratch_dir=self.get_temp_dir())
    train = source.make_train_dataset(_context(1, 0), 0).options()
    evaluation = source.make_eval_dataset(_context(1, 0)).options()
    self.assertFalse(train.deterministic)
    self.assertTrue(evaluation.deterministic)  # one pass in file order, always
    for options in (train, evaluation):
      self.assertEqual(options.threading.private_threadpool_size, 3)
      self.assertEqual(options.threading.max_intra_op_parallelism, 1)
      self.assertEqual(options.autotune.ram_budget, 256 << 20)


if __name__ == "__main__":
  tf.test.main()
