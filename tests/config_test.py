"""Configuration: presets, overrides, and one clear error per bad value."""

import os
import subprocess
import sys

from tests import logical_devices

logical_devices.configure_logical_cpus()

import tensorflow as tf  # pylint: disable=g-import-not-at-top
from absl.testing import parameterized

from training import config as config_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BuildConfigTest(tf.test.TestCase, parameterized.TestCase):

  def test_default_is_the_cpu_demo_preset(self):
    config = config_lib.build_config()
    self.assertEqual(config.preset, "cpu_demo")
    self.assertEqual(config.data.dataset, "digits")
    self.assertEqual(config.distribution.torus_shape, (2, 4))
    self.assertEqual(config.distribution.num_cpu_devices, 8)

  def test_overrides_win_over_the_preset(self):
    config = config_lib.build_config("cpu_demo", train_batch_size=128, bn_group_size=4)
    self.assertEqual(config.loop.train_batch_size, 128)
    self.assertEqual(config.model.bn_group_size, 4)
    # Peak rate is the per-256 base scaled with the batch.
    self.assertAlmostEqual(config.learning_rate, 0.4 * 128 / 256)

  def test_explicit_steps_replace_preset_epochs(self):
    config = config_lib.build_config("cpu_demo", train_steps=30)
    self.assertIsNone(config.loop.train_epochs)
    self.assertEqual(config.loop.steps_for(num_train_examples=10_000), 30)

  def test_epochs_convert_to_steps_rounding_up(self):
    config = config_lib.build_config("cpu_demo", train_epochs=2.0, train_batch_size=64)
    # 2 * 1438 examples / 64 = 44.94 -> 45 steps.
    self.assertEqual(config.loop.steps_for(num_train_examples=1438), 45)

  @parameterized.named_parameters(
      ("unknown_dataset", dict(dataset="cifar"), "dataset", "unknown dataset"),
      ("missing_data_dir", dict(dataset="imagenet"), "data_dir", "needs --data_dir"),
      ("absent_data_dir", dict(dataset="imagenet", data_dir="/no/such/dir"),
       "data_dir", "does not exist"),
      ("zero_steps", dict(train_steps=0), "train_steps", "positive"),
      ("negative_epochs", dict(train_epochs=-1.0), "train_epochs", "positive"),
      ("bad_depth", dict(resnet_depth=42), "resnet_depth", "unsupported depth"),
      ("zero_batch", dict(train_batch_size=0), "train_batch_size", "positive"),
      ("loop_cadence", dict(log_every_steps=7, checkpoint_every_steps=20),
       "checkpoint_every_steps", "multiple of --log_every_steps"),
      ("execution_cadence", dict(steps_per_execution=4, log_every_steps=6),
       "log_every_steps", "multiple of --steps_per_execution"),
      ("bad_allreduce", dict(allreduce="ring"), "allreduce", "choose one of"),
      ("bad_smoothing", dict(label_smoothing=1.5), "label_smoothing", r"\[0, 1\)"),
      ("digits_with_a_data_dir", dict(data_dir="/tmp"), "data_dir",
       "reads no --data_dir.*--preset=imagenet"),
      ("synthetic_with_a_data_dir", dict(dataset="synthetic", data_dir="/tmp"),
       "data_dir", "reads no --data_dir"),
      ("negative_timeout", dict(collective_timeout_seconds=-1.0),
       "collective_timeout_seconds", "must not be negative"),
      ("zero_ram_budget", dict(input_ram_budget_mb=0), "input_ram_budget_mb",
       "positive"),
      ("zero_intra_op_threads", dict(input_max_intra_op_parallelism=0),
       "input_max_intra_op_parallelism", "positive"),
      ("negative_input_threads", dict(input_threadpool_size=-1),
       "input_threadpool_size", "must not be negative"),
      ("bad_shard_layout", dict(shard_weight_update="y"), "shard_weight_update",
       "choose one of auto, off, x, xy"),
      ("sharding_without_the_torus",
       dict(shard_weight_update="xy", allreduce="strategy"), "shard_weight_update",
       "use --allreduce=torus"),
  )
  def test_bad_values_name_their_flag(self, overrides, flag, message):
    with self.assertRaisesRegex(config_lib.ConfigError, f"--{flag}: .*{message}"):
      config_lib.build_config("cpu_demo", **overrides)

  def test_weight_update_sharding_auto_resolves_by_all_reduce(self):
    def shards(**overrides):
      return config_lib.build_config(
          "cpu_demo", **overrides).distribution.weight_update_shards
    self.assertEqual(shards(), "xy")
    self.assertEqual(shards(allreduce="strategy"), "off")
    self.assertEqual(shards(shard_weight_update="x"), "x")
    self.assertEqual(shards(shard_weight_update="off"), "off")
    # On TPU as well (tests/sharded_update_test.py, TpuShardedStepTest).
    self.assertEqual(config_lib.DistributionConfig(tpu="local").weight_update_shards,
                     "xy")
    self.assertEqual(config_lib.DistributionConfig(
        tpu="local", allreduce="strategy").weight_update_shards, "off")
    self.assertEqual(config_lib.DistributionConfig(
        tpu="local", shard_weight_update="x").weight_update_shards, "x")

  def test_input_settings_are_data_flags_with_tensorflow_defaults(self):
    data_flags = {field.name: field for name, field in config_lib.setting_fields()
                  if name == "data"}
    self.assertIs(data_flags["deterministic_input"].default, True)
    for name in ("input_threadpool_size", "input_max_intra_op_parallelism",
                 "input_ram_budget_mb"):
      self.assertIsNone(data_flags[name].default)
    config = config_lib.build_config("cpu_demo", deterministic_input=False,
                                     input_ram_budget_mb=512)
    self.assertFalse(config.data.deterministic_input)
    self.assertEqual(config.data.input_ram_budget_mb, 512)

  def test_unknown_preset(self):
    with self.assertRaisesRegex(config_lib.ConfigError, "--preset: unknown preset"):
      config_lib.build_config("paper_1m")

  @parameterized.named_parameters(
      ("batch", dict(train_batch_size=60), 8, "train_batch_size",
       "does not divide over 8 replicas; use a multiple of 8, e.g. 64"),
      ("eval_batch", dict(eval_batch_size=12), 8, "eval_batch_size", "multiple of 8"),
      ("torus", dict(torus_shape=(3, 3)), 8, "torus_shape", "holds 9 replicas"),
      ("bn_divides", dict(bn_group_size=3), 8, "bn_group_size", "must divide"),
      ("bn_tiles", dict(bn_group_size=2, torus_shape=(3, 2), train_batch_size=60,
                        eval_batch_size=60), 6, "bn_group_size", "does not tile"),
  )
  def test_replica_checks_name_their_flag(self, overrides, replicas, flag, message):
    config = config_lib.build_config("cpu_demo", **overrides)
    with self.assertRaisesRegex(config_lib.ConfigError, f"--{flag}: .*{message}"):
      config_lib.check_against_replicas(config, replicas)

  def test_good_config_passes_replica_checks(self):
    config = config_lib.build_config("cpu_demo", bn_group_size=4, torus_shape=(4, 2))
    config_lib.check_against_replicas(config, 8)
    self.assertEqual(config.grid(8).block_groups(4), [[0, 1, 2, 3], [4, 5, 6, 7]])


class CommandLineErrorTest(tf.test.TestCase, parameterized.TestCase):
  """main.py exits non-zero with one line naming the flag, and no traceback."""

  @parameterized.named_parameters(
      ("batch_not_divisible", ["--train_batch_size=60"], "--train_batch_size"),
      ("torus_mismatch", ["--torus_shape=3x3"], "--torus_shape"),
      ("torus_unparsable", ["--torus_shape=2by4"], "--torus_shape"),
      ("unknown_dataset", ["--dataset=cifar"], "--dataset"),
      ("missing_data_dir", ["--dataset=imagenet", "--data_dir=/no/such/dir"],
       "--data_dir"),
      ("non_positive_steps", ["--train_steps=0"], "--train_steps"),
  )
  def test_bad_flag(self, args, flag):
    result = subprocess.run(
        [sys.executable, os.path.join(_REPO, "main.py"),
         f"--model_dir={self.get_temp_dir()}/run"] + args,
        capture_output=True, text=True, timeout=300, cwd=_REPO,
        env=dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="3"))
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertNotIn("Traceback", result.stderr)
    error_lines = [l for l in result.stderr.splitlines()
                   if l.startswith("main.py: error:")]
    self.assertLen(error_lines, 1, result.stderr[-2000:])
    self.assertIn(flag, error_lines[0])

  def test_empty_data_dir_is_a_clear_error(self):
    empty = self.create_tempdir().full_path
    result = subprocess.run(
        [sys.executable, os.path.join(_REPO, "main.py"), "--dataset=imagenet",
         f"--data_dir={empty}", f"--model_dir={self.get_temp_dir()}/run2",
         "--train_steps=10", "--log_every_steps=5", "--checkpoint_every_steps=5"],
        capture_output=True, text=True, timeout=300, cwd=_REPO,
        env=dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="3"))
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertNotIn("Traceback", result.stderr)
    self.assertRegex(result.stderr, f"main.py: error: .*{empty}")


if __name__ == "__main__":
  tf.test.main()
