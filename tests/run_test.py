"""The whole wiring, config to summary, on the digits records: what `main.py` runs."""

import glob
import json
import os

from tests import logical_devices

logical_devices.configure_logical_cpus()

import tensorflow as tf  # pylint: disable=g-import-not-at-top
from tensorflow.core.util import event_pb2

from training import config as config_lib
from training import run as run_lib


def _scalar_tags(event_dir):
  tags = set()
  for path in glob.glob(os.path.join(event_dir, "events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      tags |= {value.tag for value in event.summary.value}
  return tags


def _native_thread_count():
  """This process's threads as the kernel counts them (TensorFlow's included)."""
  return len(os.listdir("/proc/self/task"))


class TrainAndEvaluateTest(tf.test.TestCase):

  def test_digits_run_writes_checkpoints_summaries_and_results(self):
    model_dir = self.create_tempdir().full_path
    config = config_lib.build_config(
        "cpu_demo", model_dir=model_dir, resnet_depth=10, resnet_width=8,
        image_size=16, train_steps=12, log_every_steps=4, checkpoint_every_steps=4,
        train_batch_size=32, eval_batch_size=32, bn_group_size=4, eval_every_steps=8)
    threads_before = _native_thread_count()
    results = run_lib.train_and_evaluate(config)
    # A run's threads do not grow with its steps: a timed collective op would park a
    # sleeping thread per execution (hundreds per step here, ~16,000 in 20 steps of
    # the default run) and a long run would abort when none are left.
    self.assertLess(_native_thread_count() - threads_before, 200)

    # Evaluated on all 359 validation digits (12 steps of 32, the last one padded).
    self.assertEqual(results["images"], 359)
    self.assertBetween(results["top1"], 0.0, 1.0)
    self.assertGreaterEqual(results["top5"], results["top1"])
    with open(os.path.join(model_dir, "summary.json")) as f:
      summary = json.load(f)
    self.assertEqual(summary["step"], 12)
    self.assertEqual(summary["config"]["bn_group_size"], 4)
    self.assertAlmostEqual(summary["final"]["top1"], results["top1"])
    # One evaluation during training (eval_every_steps=8) and the final one.
    self.assertEqual([e["step"] for e in summary["evaluations"]], [8, 12])
    self.assertEqual(summary["best_top1"],
                     max(e["top1"] for e in summary["evaluations"]))
    # The digits were written once as ImageNet-schema records under the model dir.
    self.assertNotEmpty(glob.glob(os.path.join(model_dir, "data", "train-*")))
    self.assertEqual(
        os.path.basename(tf.train.latest_checkpoint(
            os.path.join(model_dir, "checkpoints"))), "ckpt-12")
    self.assertContainsSubset(
        {"train/loss", "train/top1", "train/learning_rate", "train/images_per_second"},
        _scalar_tags(os.path.join(model_dir, "summaries", "train")))
    self.assertIn("eval/top1", _scalar_tags(os.path.join(model_dir, "summaries", "eval")))

    # Run again with the same model dir: it resumes, finds the run finished, evaluates.
    with self.assertLogs("absl", level="INFO") as logs:
      again = run_lib.train_and_evaluate(config)
    self.assertAllClose(again["top1"], results["top1"])
    eval_lines = [line for line in logs.output if "eval at step 12" in line]
    self.assertLen(eval_lines, 1)
    self.assertIn("(359 images)", eval_lines[0])


if __name__ == "__main__":
  tf.test.main()
