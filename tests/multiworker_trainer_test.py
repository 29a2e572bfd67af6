"""The trainer across processes: two MultiWorkerMirroredStrategy workers on loopback.

Two worker processes (`tests/multiworker_trainer_worker.py`), one replica each (a
CPU-only worker is one replica), train the tiny ResNet with the torus aggregator on a
2x1 grid and batch-norm groups of 2, so both the gradient sum and every batch-norm
layer's moments cross the process boundary. The reference is a third process running
the same recipe under MirroredStrategy over 2 logical CPUs: one process, the same 2
replicas (not this process: see the worker's docstring on collective group keys).

Why the data makes the comparison exact in principle: with two workers each host has
its own input pipeline and reads its own shard, while the one-process run has a single
pipeline for both replicas; with an ordinary sharded, shuffled pipeline the replicas
would see different examples and only statistics could be compared. The worker's
`replica_slice_data_source` instead defines every per-replica batch as a function of
(global replica id, step) alone, and each pipeline produces exactly the batches of the
replicas it feeds, in the order tf.distribute hands them out. So replica r sees the
same examples at every step in both runs; with the same initial weights, the two runs
compute the same sums and differ only by float rounding (summation order inside the
collectives). Checking order-independent statistics instead would let a wrong shard
or a doubled sum pass.

The workers are interrupted after `FIRST_STEPS` and resumed to `TOTAL_STEPS` by a new
trainer that starts from other weights and updates by shards (each worker applies the
optimizer to half of the weights and the two halves are all-gathered across the
processes), while the reference trains straight through unsharded, so the final
comparison also checks the sharded update across processes, and resume: the workers must restore the chief's
checkpoint (the other worker reads it from the shared model dir). Only the chief may
write into the model dir: its checkpoints there, the other worker's in a temporary
directory.

Everything is bounded: each collective times out, and the processes are killed at a
deadline, so a bug fails the test instead of hanging it.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from tests import logical_devices

logical_devices.configure_logical_cpus()

# pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

from tests import loopback
from tests import multiworker_trainer_worker as recipe

NUM_WORKERS = 2
DEADLINE_SECONDS = 300
COLLECTIVE_TIMEOUT_SECONDS = 60
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MultiWorkerTrainerTest(tf.test.TestCase):
  """The workers and the one-process reference run once; the tests compare them."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.model_dir = os.path.join(cls.root, "multiworker")
    ports = ",".join(str(p) for p in loopback.free_ports(NUM_WORKERS))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CONFIG", None)
    common = [sys.executable, "-m", "tests.multiworker_trainer_worker",
              f"--timeout_seconds={COLLECTIVE_TIMEOUT_SECONDS}"]
    # Processes 0 and 1 are the workers, the last one the one-process reference.
    commands = [common + [f"--task={i}", f"--ports={ports}",
                          f"--model_dir={cls.model_dir}"]
                for i in range(NUM_WORKERS)]
    commands.append(common + ["--reference",
                              f"--model_dir={os.path.join(cls.root, 'single')}"])
    cls.outputs = [os.path.join(cls.root, f"process_{i}")
                   for i in range(len(commands))]
    cls.log_paths = [path + ".log" for path in cls.outputs]
    logs = [open(path, "w") for path in cls.log_paths]
    cls.processes = [
        subprocess.Popen(command + [f"--output={output}"], cwd=REPO_ROOT, env=env,
                         stdout=log, stderr=subprocess.STDOUT)
        for command, output, log in zip(commands, cls.outputs, logs)]
    deadline = time.monotonic() + DEADLINE_SECONDS
    try:
      for process in cls.processes:
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      pass
    finally:
      for process in cls.processes:
        if process.poll() is None:
          process.kill()
          process.wait()
      for log in logs:
        log.close()

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def _log_tail(self, i):
    with open(self.log_paths[i]) as f:
      return f.read()[-4000:]

  def _report(self, i):
    path = os.path.join(self.outputs[i], "report.json")
    self.assertTrue(os.path.exists(path),
                    f"process {i} failed or timed out (exit code "
                    f"{self.processes[i].returncode}):\n{self._log_tail(i)}")
    with open(path) as f:
      return json.load(f)

  def _weights(self, i, prefix):
    report = self._report(i)
    with np.load(os.path.join(self.outputs[i], "weights.npz")) as saved:
      return [saved[f"{prefix}_{j}"] for j in range(report["num_weights"])]

  def test_workers_ran_multi_worker_with_one_replica_each(self):
    for i in range(NUM_WORKERS):
      report = self._report(i)
      self.assertTrue(report["multi_worker"], report)
      self.assertEqual(report["num_replicas"], NUM_WORKERS)
      self.assertEqual(report["is_chief"], i == 0)
      self.assertEqual(report["steps"], [recipe.FIRST_STEPS, recipe.TOTAL_STEPS])
      self.assertEqual(report["input_pipelines"], NUM_WORKERS)  # one per worker
      self.assertEqual(self.processes[i].returncode, 0, self._log_tail(i))
    reference = self._report(NUM_WORKERS)
    self.assertEqual(reference["strategy"], "MirroredStrategy")
    self.assertEqual(reference["num_replicas"], NUM_WORKERS)
    self.assertEqual(reference["input_pipelines"], 1)
    self.assertEqual(reference["steps"], [recipe.FIRST_STEPS, recipe.TOTAL_STEPS])

  def test_two_workers_match_one_process_with_two_replicas(self):
    single_first = self._weights(NUM_WORKERS, "first")
    single_final = self._weights(NUM_WORKERS, "final")
    moved = max(np.abs(a - b).max() for a, b in zip(single_first, single_final))
    self.assertGreater(moved, 1e-3)  # Training moved the weights: not vacuous.
    for i in range(NUM_WORKERS):
      for prefix, expected in (("first", single_first), ("final", single_final)):
        actual = self._weights(i, prefix)
        self.assertLen(actual, len(expected))
        for j, (want, got) in enumerate(zip(expected, actual)):
          # Measured: at most 4e-6 apart (summation order inside the collectives).
          self.assertAllClose(want, got, rtol=1e-4, atol=1e-5,
                              msg=f"worker {i}, {prefix}, weight {j}")

  def test_two_workers_evaluate_every_example_like_one_process(self):
    reference = self._report(NUM_WORKERS)
    # One pipeline: 61 examples in 4 steps of 16, the last with 3 of padding.
    self.assertEqual(reference["eval_steps"], 4)
    self.assertEqual(reference["evaluation"]["images"], recipe.NUM_EVAL_EXAMPLES)
    for i in range(NUM_WORKERS):
      report = self._report(i)
      # Two pipelines of 31 and 30 examples, 8 per step: 4 steps on both, both padded.
      self.assertEqual(report["eval_steps"], 4)
      evaluation = report["evaluation"]
      self.assertEqual(evaluation["images"], recipe.NUM_EVAL_EXAMPLES)
      # Top-1 is a count over the 61 examples: equal; the loss up to summation order.
      self.assertEqual(evaluation["top1"], reference["evaluation"]["top1"])
      self.assertAllClose(evaluation["loss"], reference["evaluation"]["loss"],
                          rtol=1e-4, atol=1e-5)

  def test_only_the_chief_writes_checkpoints_into_the_model_dir(self):
    chief, other = self._report(0), self._report(1)
    checkpoint_dir = os.path.join(self.model_dir, "checkpoints")
    self.assertEqual(chief["checkpoint_dirs"], [checkpoint_dir] * 2)
    for directory in other["checkpoint_dirs"]:
      # The other worker saves too (saving may need collectives), but into a folder
      # of its own inside the model dir: nothing is written outside it.
      self.assertStartsWith(os.path.abspath(directory),
                            os.path.join(self.model_dir, "workertemp_worker_1"))
      self.assertTrue(tf.io.gfile.exists(os.path.join(directory, "checkpoint")))
    state = tf.train.get_checkpoint_state(checkpoint_dir)
    self.assertEqual([os.path.basename(p) for p in state.all_model_checkpoint_paths],
                     ["ckpt-2", "ckpt-4", "ckpt-6"])
    # Summaries come from the chief only: event file names carry the writer's pid.
    event_files = tf.io.gfile.glob(os.path.join(self.model_dir, "summaries", "*", "*"))
    self.assertNotEmpty(event_files)
    for path in event_files:
      self.assertEqual(os.path.basename(path).split(".")[-3], str(chief["pid"]), path)


if __name__ == "__main__":
  tf.test.main()
