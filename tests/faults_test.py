"""Faults a real run meets, through `main.py` as a user runs it (docs/RELIABILITY.md).

Every test starts `main.py` in subprocesses (one process with 2 logical CPU replicas,
or two MultiWorkerMirroredStrategy workers on loopback) on a tiny ResNet at 16x16, and
checks what the user sees: the exit code, the last line on stderr, the files in the
data folder and the model dir, and that a rerun of the same command finishes where an
uninterrupted run does, with the same evaluation.
"""

import glob
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tests import logical_devices

logical_devices.configure_logical_cpus()

# pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf
from PIL import Image

import input_pipeline
from input_pipeline import schema
from resnet import resnet_model
from tests import loopback
from tests import toy_images
from training import specs
from training import trainer as trainer_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_SECONDS = 240
COLLECTIVE_TIMEOUT_SECONDS = 30
STEPS = 40
# A tiny recipe, the same in every run, so that runs can be compared.
TINY = ["--resnet_depth=10", "--resnet_width=8", "--image_size=16",
        "--train_batch_size=32", "--eval_batch_size=32", "--log_every_steps=4",
        "--checkpoint_every_steps=8", f"--train_steps={STEPS}"]
ONE_PROCESS = ["--num_cpu_devices=2", "--torus_shape=1x2", "--bn_group_size=2"]
# The runs that are compared by their final weights skip evaluation: it would add a
# trace and a pass over the 359 digits to every run, and equal weights say more.
TRAIN_ONLY = ["--mode=train"]
# Two workers of one replica each: the torus row and the batch-norm group cross them.
TWO_WORKERS = ["--torus_shape=1x2", "--bn_group_size=2",
               f"--collective_timeout_seconds={COLLECTIVE_TIMEOUT_SECONDS}"]


def _env(tf_config=None):
  # Level 1 as main.py sets it: the pipeline reports each skipped image as a warning.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="1", CUDA_VISIBLE_DEVICES="",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("TF_CONFIG", None)
  if tf_config:
    env["TF_CONFIG"] = json.dumps(tf_config)
  return env


class MainProcess:
  """One `main.py` process, its output in a log file that the test can watch."""

  def __init__(self, args, log_path, tf_config=None):
    self.log_path = log_path
    self._log = open(log_path, "w")
    self.process = subprocess.Popen(
        [sys.executable, os.path.join(REPO_ROOT, "main.py")] + list(args),
        cwd=REPO_ROOT, env=_env(tf_config), stdout=self._log,
        stderr=subprocess.STDOUT, start_new_session=True)

  def output(self):
    with open(self.log_path) as f:
      return f.read()

  def wait_for_line(self, pattern, deadline=DEADLINE_SECONDS):
    start = time.monotonic()
    while time.monotonic() - start < deadline:
      if re.search(pattern, self.output()):
        return
      if self.process.poll() is not None:
        raise AssertionError(f"exited {self.process.returncode} before {pattern!r}:\n"
                             + self.output()[-4000:])
      time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} within {deadline} s:\n{self.output()[-4000:]}")

  def wait(self, deadline=DEADLINE_SECONDS):
    try:
      code = self.process.wait(deadline)
    except subprocess.TimeoutExpired:
      os.killpg(self.process.pid, signal.SIGKILL)
      raise AssertionError(f"still running after {deadline} s:\n"
                           + self.output()[-4000:]) from None
    finally:
      self._log.close()
    return code

  def kill(self, signum):
    os.kill(self.process.pid, signum)

  def last_line(self):
    lines = [line for line in self.output().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_main(args, log_path):
  process = MainProcess(args, log_path)
  return process.wait(), process


def start_workers(args, log_prefix):
  ports = loopback.free_ports(2)
  cluster = {"worker": [f"localhost:{port}" for port in ports]}
  return [MainProcess(args, f"{log_prefix}.worker{i}.log",
                      tf_config={"cluster": cluster,
                                 "task": {"type": "worker", "index": i}})
          for i in range(2)]


def final_evaluation(model_dir):
  with open(os.path.join(model_dir, "summary.json")) as f:
    summary = json.load(f)
  return summary["step"], summary["final"]


def final_weights(model_dir):
  """(step, {name: value}) of every float variable in the run's latest checkpoint:
  weights, batch-norm statistics and optimizer slots."""
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  reader = tf.train.load_checkpoint(path)
  values = {name: reader.get_tensor(name)
            for name, dtype in reader.get_variable_to_dtype_map().items()
            if dtype.is_floating}
  return int(path.rsplit("-", 1)[1]), values


def assert_same_weights(test, got, want):
  """`got` and `want`, two `final_weights`, hold the same step and variables."""
  test.assertEqual(got[0], want[0])
  test.assertEqual(sorted(got[1]), sorted(want[1]))
  for name, value in want[1].items():
    test.assertAllClose(got[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def checkpoint_steps(model_dir):
  state = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
  return sorted(int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths)


def assert_finite_checkpoint(test, path):
  reader = tf.train.load_checkpoint(path)
  for name, dtype in reader.get_variable_to_dtype_map().items():
    if dtype.is_floating:
      test.assertTrue(np.all(np.isfinite(reader.get_tensor(name))), f"{path}: {name}")


def folder_digest(folder):
  """Every file under `folder` with its size, mtime and content hash."""
  digest = {}
  for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
    stat = os.stat(path)
    entry = (stat.st_mtime_ns,)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        entry += (stat.st_size, hashlib.sha256(f.read()).hexdigest())
    digest[os.path.relpath(path, folder)] = entry
  return digest


def _jpeg(seed, size=24):
  pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=90)
  return out.getvalue()


def bad_image_examples():
  """(name, image bytes): each kind of damage a real data set holds."""
  good = _jpeg(0)
  middle = len(good) // 2
  corrupt_middle = good[:middle] + bytes(range(200)) + good[middle + 200:]
  return [("truncated.jpg", good[:len(good) // 2]),
          ("corrupt_middle.jpg", corrupt_middle),
          ("empty.jpg", b""),
          ("unknown_format.webp", b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(64))]


def write_user_records(folder):
  """A user's data folder: digits shards plus a validation shard of damaged images
  (evaluation reads every record, so each one meets the check)."""
  input_pipeline.prepare_digits_records(folder, image_size=16, num_train_shards=2,
                                        num_validation_shards=1)
  os.remove(os.path.join(folder, "digits_records_complete.json"))
  with tf.io.TFRecordWriter(os.path.join(folder, "validation-damaged")) as writer:
    for name, image in bad_image_examples():
      writer.write(schema.make_example(image, 3, 24, 24, filename=name)
                   .SerializeToString())


class DataFolderTest(tf.test.TestCase):
  """The user's files are input: never deleted, rewritten or added to."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.user_data = os.path.join(cls.root, "imagenet")
    write_user_records(cls.user_data)

  def test_digits_preset_with_a_data_dir_is_refused_and_touches_nothing(self):
    before = folder_digest(self.user_data)
    code, process = run_main([f"--data_dir={self.user_data}",
                              f"--model_dir={self.root}/forgot_preset"],
                             f"{self.root}/forgot_preset.log")
    self.assertEqual(code, 2, process.output()[-3000:])
    self.assertStartsWith(process.last_line(), "main.py: error: --data_dir: ")
    self.assertIn("--dataset=imagenet", process.last_line())
    self.assertIn("--preset=imagenet", process.last_line())
    self.assertEqual(folder_digest(self.user_data), before)

  def test_training_reads_the_folder_skips_bad_images_and_leaves_it_unchanged(self):
    before = folder_digest(self.user_data)
    model_dir = f"{self.root}/imagenet_run"
    code, process = run_main(
        ["--dataset=imagenet", f"--data_dir={self.user_data}", "--num_classes=10",
         f"--model_dir={model_dir}"] + TINY + ONE_PROCESS + ["--train_steps=8"],
        f"{model_dir}.log")
    self.assertEqual(code, 0, process.output()[-3000:])
    self.assertEqual(folder_digest(self.user_data), before)
    output = process.output()
    # Each damaged image is skipped and counted, none ends the run (libjpeg recovers
    # from some mid-stream damage: such an image is decoded instead of skipped).
    skipped = {name for name, _ in bad_image_examples() if name in output}
    self.assertContainsSubset({"truncated.jpg", "empty.jpg", "unknown_format.webp"},
                              skipped)
    self.assertIn("Final evaluation at step 8", output)
    scored = int(re.search(r"eval at step 8: .*\((\d+) images\)", output).group(1))
    self.assertEqual(scored, 359 + len(bad_image_examples()) - len(skipped))


class LabelCheckTest(tf.test.TestCase):
  """A label outside [0, --num_classes) stops the run with one line naming the flag."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.with_info = os.path.join(cls.root, "with_info")
    input_pipeline.prepare_digits_records(cls.with_info, image_size=16,
                                          num_train_shards=2, num_validation_shards=1)
    # The same records without the class count beside them: checked in the stream.
    cls.without_info = os.path.join(cls.root, "without_info")
    os.makedirs(cls.without_info)
    for path in glob.glob(os.path.join(cls.with_info, "*-of-*")):
      shutil.copy(path, cls.without_info)

  def test_class_count_from_dataset_info(self):
    code, process = run_main(
        ["--dataset=imagenet", f"--data_dir={self.with_info}", "--num_classes=5",
         f"--model_dir={self.root}/info_run"] + TINY + ONE_PROCESS,
        f"{self.root}/info_run.log")
    self.assertEqual(code, 2, process.output()[-3000:])
    self.assertStartsWith(process.last_line(), "main.py: error: --num_classes: ")
    self.assertIn("10 classes", process.last_line())
    self.assertIn("--num_classes=10", process.last_line())

  def test_label_seen_in_the_stream(self):
    code, process = run_main(
        ["--dataset=imagenet", f"--data_dir={self.without_info}", "--num_classes=5",
         f"--model_dir={self.root}/stream_run"] + TINY + ONE_PROCESS,
        f"{self.root}/stream_run.log")
    self.assertEqual(code, 2, process.output()[-3000:])
    line = process.last_line()
    self.assertStartsWith(line, "main.py: error: --num_classes: ")
    seen = [int(v) for v in re.findall(r"\d+", line.split("labels seen:")[1])]
    self.assertTrue(any(label >= 5 for label in seen), line)
    self.assertEmpty(glob.glob(f"{self.root}/stream_run/checkpoints/ckpt-*"))


class DivergenceTest(tf.test.TestCase):

  def test_nonfinite_loss_stops_the_run_and_the_last_good_checkpoint_stays(self):
    model_dir = os.path.join(tempfile.mkdtemp(), "diverging")
    code, process = run_main([f"--model_dir={model_dir}"] + TINY + ONE_PROCESS
                             + TRAIN_ONLY + ["--train_steps=8"], f"{model_dir}.log")
    self.assertEqual(code, 0, process.output()[-3000:])
    # Resumed with a rate that blows the weights up at once.
    code, process = run_main(
        [f"--model_dir={model_dir}", "--base_learning_rate=100000",
         "--warmup_epochs=0"] + TINY + ONE_PROCESS, f"{model_dir}.resumed.log")
    self.assertEqual(code, 3, process.output()[-3000:])
    line = process.last_line()
    match = re.match(r"main\.py: error: the loss or its gradients are not finite at "
                     r"step (\d+); lower --base_learning_rate", line)
    self.assertIsNotNone(match, line)
    self.assertBetween(int(match.group(1)), 9, STEPS - 1)
    self.assertEqual(checkpoint_steps(model_dir), [8])
    for path in glob.glob(os.path.join(model_dir, "checkpoints", "ckpt-*.index")):
      assert_finite_checkpoint(self, path[:-len(".index")])


def _poisoned_data_source(poisoned_step, per_replica_batch=4, image_size=16):
  """Toy batches; at `poisoned_step` (1-based) the last replica's images are NaN."""
  images, labels = toy_images.quadrant_images(64, image_size)

  def make_train_dataset(input_context, start_step):
    del start_step
    replicas = input_context.num_replicas_in_sync
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(
        per_replica_batch, drop_remainder=True)

    def poison(index, batch):
      step, replica = index // replicas + 1, index % replicas
      nan = tf.fill(tf.shape(batch[0]), float("nan"))
      bad = tf.logical_and(tf.equal(step, poisoned_step),
                           tf.equal(replica, replicas - 1))
      return tf.where(bad, nan, batch[0]), batch[1]

    return batches.enumerate().map(poison)

  return specs.DataSource(
      make_train_dataset, lambda context: None, num_train_examples=64,
      num_eval_examples=0, eval_steps=lambda context: 0)


class DivergenceStepTest(tf.test.TestCase):
  """In process: the step named is the one whose loss first went non-finite, even
  when only one replica's loss did, and no checkpoint from it on exists."""

  def test_the_poisoned_step_is_named_and_nothing_after_it_is_saved(self):
    strategy = logical_devices.cpu_mirrored_strategy(2)
    model_dir = tempfile.mkdtemp()
    trainer = trainer_lib.Trainer(
        strategy=strategy, model_dir=model_dir,
        build_backbone=lambda: resnet_model.build_resnet_for_depth(
            10, num_classes=4, image_size=16, width=8),
        data=_poisoned_data_source(poisoned_step=5),
        recipe=specs.Recipe(num_classes=4, learning_rate=0.05),
        cadence=specs.Cadence(total_steps=12, global_batch_size=8,
                                    eval_batch_size=8, log_every_steps=2,
                                    checkpoint_every_steps=2))
    with self.assertRaises(trainer_lib.TrainingDiverged) as raised:
      trainer.train()
    self.assertEqual(raised.exception.step, 5)
    self.assertEqual(checkpoint_steps(model_dir), [2, 4])


class OneProcessInterruptionTest(tf.test.TestCase):
  """SIGTERM saves the last finished step, kill -9 loses at most the steps since the
  last checkpoint; a rerun of the same command ends where an uninterrupted run does."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.reference_dir = os.path.join(cls.root, "straight")
    code, process = run_main([f"--model_dir={cls.reference_dir}"] + cls.ARGS,
                             f"{cls.reference_dir}.log")
    assert code == 0, process.output()[-3000:]
    cls.reference = final_weights(cls.reference_dir)

  ARGS = TINY + ONE_PROCESS + TRAIN_ONLY

  def _rerun_matches_reference(self, model_dir):
    code, process = run_main([f"--model_dir={model_dir}"] + self.ARGS,
                             f"{model_dir}.rerun.log")
    self.assertEqual(code, 0, process.output()[-3000:])
    assert_same_weights(self, final_weights(model_dir), self.reference)
    return process

  def test_sigterm_saves_and_the_rerun_resumes_exactly(self):
    model_dir = os.path.join(self.root, "sigterm")
    process = MainProcess([f"--model_dir={model_dir}"] + self.ARGS,
                          f"{model_dir}.log")
    process.wait_for_line(rf"step 4/{STEPS} ")
    process.kill(signal.SIGTERM)
    self.assertEqual(process.wait(), 143, process.output()[-3000:])
    match = re.match(r"main\.py: preempted \(SIGTERM\): saved a checkpoint at step "
                     r"(\d+); run the same command again to resume\.",
                     process.last_line())
    self.assertIsNotNone(match, process.last_line())
    step = int(match.group(1))
    self.assertBetween(step, 5, STEPS - 1)
    self.assertEqual(checkpoint_steps(model_dir)[-1], step)
    rerun = self._rerun_matches_reference(model_dir)
    self.assertIn(f"Resumed from {model_dir}/checkpoints/ckpt-{step} at step {step}",
                  rerun.output())

  def test_kill_loses_only_the_steps_since_the_last_checkpoint(self):
    model_dir = os.path.join(self.root, "killed")
    process = MainProcess([f"--model_dir={model_dir}"] + self.ARGS,
                          f"{model_dir}.log")
    process.wait_for_line(rf"step 12/{STEPS} ")
    process.kill(signal.SIGKILL)
    process.wait()
    saved = checkpoint_steps(model_dir)[-1]
    self.assertGreaterEqual(saved, 8)  # the checkpoint before step 12 survived
    rerun = self._rerun_matches_reference(model_dir)
    self.assertIn(f"at step {saved}.", rerun.output())

  def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(self):
    model_dir = os.path.join(self.root, "corrupt")
    shutil.copytree(self.reference_dir, model_dir)
    os.remove(os.path.join(model_dir, "summary.json"))
    steps = checkpoint_steps(model_dir)
    latest = os.path.join(model_dir, "checkpoints", f"ckpt-{steps[-1]}")
    with open(latest + ".data-00000-of-00001", "r+b") as f:
      f.truncate(100)
    rerun = self._rerun_matches_reference(model_dir)
    self.assertIn(f"Checkpoint {latest} cannot be read", rerun.output())
    self.assertIn(f"Resumed from {model_dir}/checkpoints/ckpt-{steps[-2]}",
                  rerun.output())

  def test_a_relative_model_dir_resumes(self):
    # The default run's --model_dir (runs/cpu_demo) is relative.
    model_dir = os.path.join(self.root, "relative")
    shutil.copytree(self.reference_dir, model_dir)
    os.remove(os.path.join(model_dir, "summary.json"))
    relative = os.path.relpath(model_dir, REPO_ROOT)  # main.py runs in REPO_ROOT
    code, process = run_main([f"--model_dir={relative}"] + self.ARGS,
                             f"{model_dir}.rerun.log")
    self.assertEqual(code, 0, process.output()[-3000:])
    self.assertNotIn("cannot be read", process.output())
    self.assertIn(f"Resumed from {relative}/checkpoints/ckpt-{self.reference[0]} ",
                  process.output())
    self.assertEqual(final_evaluation(model_dir)[0], self.reference[0])

  def test_checkpoint_of_another_model_is_refused(self):
    for flag, value in [("resnet_depth", 18), ("resnet_width", 16),
                        ("num_classes", 12), ("optimizer", "lars")]:
      with self.subTest(flag=flag):
        model_dir = os.path.join(self.root, f"other_{flag}")
        shutil.copytree(self.reference_dir, model_dir)
        args = [a for a in TINY if not a.startswith(f"--{flag}=")]
        code, process = run_main(
            [f"--model_dir={model_dir}", f"--{flag}={value}"] + args + ONE_PROCESS,
            f"{model_dir}.log")
        self.assertEqual(code, 2, process.output()[-3000:])
        self.assertStartsWith(process.last_line(), f"main.py: error: --{flag}: "
                              f"--model_dir={model_dir} holds checkpoints")

  def test_checkpoint_without_its_settings_file_is_still_checked_whole(self):
    model_dir = os.path.join(self.root, "no_settings_file")
    shutil.copytree(self.reference_dir, model_dir)
    os.remove(os.path.join(model_dir, "checkpoints", "checkpoint_config.json"))
    args = [a for a in TINY if not a.startswith("--resnet_width=")]
    code, process = run_main(
        [f"--model_dir={model_dir}", "--resnet_width=16"] + args + ONE_PROCESS,
        f"{model_dir}.log")
    self.assertEqual(code, 2, process.output()[-3000:])
    self.assertStartsWith(process.last_line(),
                          f"main.py: error: --model_dir: {model_dir}: checkpoint ")
    self.assertIn("does not fit the model being built", process.last_line())


class TwoWorkerFaultsTest(tf.test.TestCase):
  """MultiWorkerMirroredStrategy on loopback: a lost worker and a preempted one."""

  def test_killed_worker_makes_the_survivor_exit_within_the_timeout(self):
    root = tempfile.mkdtemp()
    workers = start_workers([f"--model_dir={root}/run"] + TINY + TWO_WORKERS,
                            f"{root}/run")
    workers[0].wait_for_line(rf"step 4/{STEPS} ")
    workers[1].kill(signal.SIGKILL)
    killed_at = time.monotonic()
    code = workers[0].wait(deadline=COLLECTIVE_TIMEOUT_SECONDS + 60)
    workers[1].wait()
    self.assertLess(time.monotonic() - killed_at, COLLECTIVE_TIMEOUT_SECONDS + 30)
    self.assertEqual(code, 4, workers[0].output()[-3000:])
    line = workers[0].last_line()
    self.assertStartsWith(line, "main.py: error: a collective across workers failed")
    self.assertIn(f"--collective_timeout_seconds={COLLECTIVE_TIMEOUT_SECONDS}", line)
    self.assertRegex(line, r"task:1|unhealthy|Connection refused|timed out")

  def test_sigterm_on_one_worker_saves_both_at_one_step_and_the_rerun_resumes(self):
    root = tempfile.mkdtemp()
    reference = start_workers(
        [f"--model_dir={root}/straight"] + TINY + TWO_WORKERS + TRAIN_ONLY,
        f"{root}/straight")
    self.assertEqual([w.wait() for w in reference], [0, 0],
                     reference[0].output()[-3000:])

    args = [f"--model_dir={root}/preempted"] + TINY + TWO_WORKERS + TRAIN_ONLY
    workers = start_workers(args, f"{root}/preempted")
    workers[1].wait_for_line(rf"step 4/{STEPS} ")
    workers[1].kill(signal.SIGTERM)
    self.assertEqual([w.wait() for w in workers], [143, 143],
                     workers[0].output()[-3000:])
    steps = {int(re.search(r"at step (\d+);", w.last_line()).group(1))
             for w in workers}
    self.assertLen(steps, 1)
    step = steps.pop()
    self.assertBetween(step, 5, STEPS - 1)
    self.assertEqual(checkpoint_steps(f"{root}/preempted")[-1], step)

    rerun = start_workers(args, f"{root}/preempted.rerun")
    self.assertEqual([w.wait() for w in rerun], [0, 0], rerun[0].output()[-3000:])
    self.assertIn(f"at step {step}.", rerun[0].output())
    assert_same_weights(self, final_weights(f"{root}/preempted"),
                        final_weights(f"{root}/straight"))


if __name__ == "__main__":
  tf.test.main()
