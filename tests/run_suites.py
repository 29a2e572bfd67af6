"""Runs every test file in its own process, two at a time, and totals the results.

Each suite gets a fresh TensorFlow runtime, as each Bazel py_test does: the logical CPU
split is fixed per process, and tf.distribute numbers every strategy's collective
groups and instances from the same start, so strategies of different sizes made by
different suites would otherwise collide in one process. Two at a time because tracing
is single-threaded Python while the other core computes.

  python tests/run_suites.py                 # all of tests/*_test.py
  python tests/run_suites.py tests/x_test.py -k name   # pytest arguments pass through
"""

import concurrent.futures
import glob
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PARALLEL_SUITES = 2
# Started first, in this order (longest first, from the last full runs), so that the
# two-at-a-time schedule does not end on one long suite.
_LONGEST_SUITES = ("faults_test.py", "sharded_update_test.py", "trainer_test.py",
                   "data_service_test.py", "pipeline_test.py", "run_test.py",
                   "multiworker_trainer_test.py", "config_test.py",
                   "cost_model_check_test.py", "torus_aggregator_test.py",
                   "recipe_test.py", "group_batch_norm_test.py")


def _run_suite(path, extra_args, report_dir):
  report = os.path.join(report_dir, os.path.basename(path) + ".xml")
  start = time.time()
  result = subprocess.run(
      [sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider",
       f"--junitxml={report}"] + extra_args,
      cwd=_REPO, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=_REPO, TF_CPP_MIN_LOG_LEVEL="2"))
  counts = dict(passed=0, failed=0, skipped=0)
  if os.path.exists(report):
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total = int(suite.get("tests", 0))
    counts["failed"] = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    counts["skipped"] = int(suite.get("skipped", 0))
    counts["passed"] = total - counts["failed"] - counts["skipped"]
  elif result.returncode:
    counts["failed"] = 1  # pytest could not even start: count the suite as failed.
  # pytest exits 5 when a -k filter selects nothing in this file: not a failure.
  ok = result.returncode in (0, 5) and not counts["failed"]
  return path, ok, counts, time.time() - start, result.stdout + result.stderr


def _start_order(path):
  name = os.path.basename(path)
  if name in _LONGEST_SUITES:
    return (_LONGEST_SUITES.index(name), name)
  return (len(_LONGEST_SUITES), name)


def main(argv):
  paths = [a for a in argv if a.endswith("_test.py")]
  extra_args = [a for a in argv if not a.endswith("_test.py")]
  paths = paths or sorted(
      glob.glob(os.path.join(_REPO, "tests", "*_test.py")),
      key=_start_order)
  totals = dict(passed=0, failed=0, skipped=0)
  failed_suites = []
  start = time.time()
  with tempfile.TemporaryDirectory() as report_dir, \
      concurrent.futures.ThreadPoolExecutor(_PARALLEL_SUITES) as pool:
    futures = [pool.submit(_run_suite, p, extra_args, report_dir) for p in paths]
    for future in concurrent.futures.as_completed(futures):
      path, ok, counts, seconds, output = future.result()
      name = os.path.relpath(path, _REPO)
      print(f"{'ok  ' if ok else 'FAIL'} {name:42s} {counts['passed']:4d} passed "
            f"{counts['failed']:3d} failed {counts['skipped']:3d} skipped "
            f"{seconds:7.1f} s", flush=True)
      if not ok:
        failed_suites.append(name)
        print(output[-20000:], flush=True)
      for key in totals:
        totals[key] += counts[key]
  print(f"{len(paths)} suites in {time.time() - start:.0f} s"
        + (f"; failed: {', '.join(failed_suites)}" if failed_suites else ""))
  print(f"{totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['skipped']} skipped")
  return 1 if failed_suites or not totals["passed"] else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
