"""The torus aggregator across processes: MultiWorkerMirroredStrategy on loopback.

Four worker processes, one replica each (MultiWorkerMirroredStrategy gives a CPU-only
worker one device), make a 2x2 grid whose every row and column crosses processes; the
workers also run the 1x4 and 4x1 grids and the strategy's own all-reduce. Each worker
checks its sums against NumPy and reports; the whole run is bounded in time.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import tensorflow as tf

from tests import loopback

NUM_WORKERS = 4
DEADLINE_SECONDS = 240
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MultiWorkerAllReduceTest(tf.test.TestCase):

  def test_torus_sum_across_processes(self):
    ports = ",".join(str(p) for p in loopback.free_ports(NUM_WORKERS))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CONFIG", None)
    with tempfile.TemporaryDirectory() as workdir:
      outputs = [os.path.join(workdir, f"worker_{i}.json") for i in range(NUM_WORKERS)]
      logs = [open(os.path.join(workdir, f"worker_{i}.log"), "w")
              for i in range(NUM_WORKERS)]
      workers = [
          subprocess.Popen(
              [sys.executable, "-m", "tests.multiworker_allreduce_worker",
               f"--task={i}", f"--ports={ports}", f"--output={outputs[i]}"],
              cwd=REPO_ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
          for i in range(NUM_WORKERS)]
      deadline = time.monotonic() + DEADLINE_SECONDS
      try:
        for worker in workers:
          worker.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
      finally:
        for worker in workers:
          if worker.poll() is None:
            worker.kill()
            worker.wait()
        for log in logs:
          log.close()

      def log_tail(i):
        with open(os.path.join(workdir, f"worker_{i}.log")) as f:
          return f.read()[-3000:]

      for i, worker in enumerate(workers):
        self.assertTrue(os.path.exists(outputs[i]),
                        f"worker {i} failed or timed out:\n{log_tail(i)}")
        with open(outputs[i]) as f:
          report = json.load(f)
        self.assertEqual(report["num_replicas"], NUM_WORKERS)
        checks = report["checks"]
        for grid in ("2x2", "1x4", "4x1", "strategy"):
          for kind in ("integers", "random"):
            self.assertTrue(checks[f"{grid}/{kind}"]["ok"], (grid, kind, report))
          self.assertEqual(checks[f"{grid}/integers"]["max_error"], 0.0)
        self.assertTrue(report["ok"], report)
        self.assertEqual(worker.returncode, 0, log_tail(i))


if __name__ == "__main__":
  tf.test.main()
