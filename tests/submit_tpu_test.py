"""Tests for tools/submit_tpu.py: the gcloud plan, quoting, bad input, the runner."""

import io
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile

from absl import flags
from absl.testing import parameterized
import tensorflow as tf

from tests import logical_devices

logical_devices.configure_logical_cpus()

from tools import submit_tpu  # pylint: disable=g-import-not-at-top

ARCHIVE = "/tmp/pack/torus-resnet.tar.gz"
GCLOUD = "gcloud compute tpus tpu-vm"
WHERE = "--zone=europe-west4-a --project=my-project"


def _job(**overrides):
  values = dict(tpu_name="r50", zone="europe-west4-a", project="my-project",
                accelerator_type="v3-8", data_dir="gs://bucket/imagenet",
                model_dir="gs://bucket/runs/r50",
                trainer_args=("--dataset=imagenet", "--train_batch_size=1024",
                              "--torus_shape=2x4"))
  values.update(overrides)
  return submit_tpu.TpuJob(**values)


def _commands(plan):
  return [step.shell() for step in plan if step.kind != "pack"]


def _launches(plan):
  return [s for s in plan if s.description.startswith("train")]


def _remote_command(step):
  (command,) = [a for a in step.argv if a.startswith("--command=")]
  return command[len("--command="):]


class AcceleratorTypeTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(
      # type, chips, cores, hosts, replicas
      ("v2-8", 4, 8, 1, 8),
      ("v3-8", 4, 8, 1, 8),
      ("v3-32", 16, 32, 4, 32),
      ("v3-1024", 512, 1024, 128, 1024),
      ("v3-2048", 1024, 2048, 256, 2048),  # the paper's 1024-chip pod
      ("v4-8", 4, 8, 1, 4),  # megacore: one replica per chip
      ("v4-32", 16, 32, 4, 16),
      ("v5p-8", 4, 8, 1, 4),
      ("v5litepod-8", 8, 8, 1, 8),
      ("v5litepod-256", 256, 256, 32, 256),
  )
  def test_shapes(self, name, chips, cores, hosts, replicas):
    spec = submit_tpu.parse_accelerator_type(name)
    self.assertEqual((spec.chips, spec.cores, spec.hosts, spec.replicas),
                     (chips, cores, hosts, replicas))
    self.assertEqual(spec.multi_host, hosts > 1)

  @parameterized.parameters("v3-16", "v3-4096", "v2-64", "v9-8", "v4-12", "tpu",
                            "v5litepod-2", "v3_8", "")
  def test_unknown_types(self, name):
    with self.assertRaisesRegex(submit_tpu.SubmitError, "accelerator_type"):
      submit_tpu.parse_accelerator_type(name)


class PlanTest(tf.test.TestCase, parameterized.TestCase):

  def test_v3_8_dry_run_commands(self):
    plan = submit_tpu.build_plan(_job(), ARCHIVE)
    self.assertEqual(_commands(plan), [
        f"{GCLOUD} scp {ARCHIVE} r50:torus-resnet.tar.gz {WHERE} --worker=0",
        f"{GCLOUD} ssh r50 {WHERE} --worker=0 '--command=rm -rf torus-resnet && "
        "mkdir -p torus-resnet && tar -xzf torus-resnet.tar.gz -C torus-resnet && "
        "cd torus-resnet && bash tools/install_on_tpu_vm.sh'",
        f"{GCLOUD} ssh r50 {WHERE} --worker=0 '--command=cd torus-resnet && "
        "PYTHONUNBUFFERED=1 python3 main.py --tpu=local "
        "--model_dir=gs://bucket/runs/r50 --data_dir=gs://bucket/imagenet "
        "--dataset=imagenet --train_batch_size=1024 --torus_shape=2x4'",
    ])
    self.assertEqual([s.kind for s in plan], ["pack", "run", "run", "run"])

  def test_v3_32_multi_host_create_and_delete(self):
    job = _job(accelerator_type="v3-32", create=True, spot=True, delete_after=True,
               runtime_version="tpu-vm-tf-2.16.1-pod-pjrt",
               trainer_args=("--train_batch_size=4096", "--torus_shape=4x8",
                             "--bn_group_size=4", "--allreduce=torus"))
    plan = submit_tpu.build_plan(job, ARCHIVE)
    commands = _commands(plan)
    self.assertEqual(commands[:4], [
        f"{GCLOUD} describe r50 {WHERE} '--format=value(state)'",
        f"{GCLOUD} delete r50 {WHERE} --quiet",
        f"{GCLOUD} versions describe tpu-vm-tf-2.16.1-pod-pjrt {WHERE}",
        f"{GCLOUD} create r50 {WHERE} --accelerator-type=v3-32 "
        "--version=tpu-vm-tf-2.16.1-pod-pjrt --spot",
    ])
    self.assertEqual([s.when for s in plan[:4]],
                     ["always", submit_tpu.IF_PREEMPTED, submit_tpu.IF_ABSENT,
                      submit_tpu.IF_ABSENT])
    self.assertEqual(commands[-1], f"{GCLOUD} delete r50 {WHERE} --quiet")
    self.assertEqual(plan[-1].when, submit_tpu.FINALLY)
    # Exactly one client process for the 4 hosts: on worker 0, by the TPU's name.
    (launch,) = _launches(plan)
    self.assertIn("--worker=0", launch.argv)
    words = shlex.split(_remote_command(launch))
    self.assertEqual(words[words.index("&&") + 1:words.index("python3")],
                     ["TPU_NAME=r50", "TPU_LOAD_LIBRARY=0", "PYTHONUNBUFFERED=1"])
    self.assertEqual(words[words.index("main.py") + 1:], [
        "--tpu=r50", "--model_dir=gs://bucket/runs/r50",
        "--data_dir=gs://bucket/imagenet", "--train_batch_size=4096",
        "--torus_shape=4x8", "--bn_group_size=4", "--allreduce=torus"])
    remote = [c for c in commands if " ssh " in c or " scp " in c]
    self.assertLen(remote, 3)  # copy, install, launch
    self.assertTrue(all("--worker=0" in c for c in remote))
    self.assertFalse([c for c in commands if "--worker=all" in c])

  @parameterized.named_parameters(
      # type, trainer grid, hosts, runtime default
      ("v3_8", "v3-8", "2x4", 1, "tpu-vm-tf-2.20.0-pjrt"),
      ("v3_32", "v3-32", "8x4", 4, "tpu-vm-tf-2.20.0-pod-pjrt"),
      ("v4_32", "v4-32", "2x8", 4, "tpu-vm-tf-2.20.0-pod-pjrt"),
      ("v5litepod_8", "v5litepod-8", "2x4", 1, "tpu-vm-tf-2.20.0-pjrt"),
  )
  def test_one_client_and_the_default_runtime(self, accelerator_type, grid, hosts,
                                              runtime):
    job = _job(accelerator_type=accelerator_type, create=True,
               tensorflow_version="2.20.0", trainer_args=(f"--torus_shape={grid}",))
    plan = submit_tpu.build_plan(job, ARCHIVE)
    (create,) = [s for s in plan if s.description == "create the slice"]
    self.assertIn(f"--version={runtime}", create.argv)
    (launch,) = _launches(plan)
    self.assertIn("--worker=0", launch.argv)
    command = _remote_command(launch)
    self.assertEqual(command.count("main.py"), 1)
    if hosts > 1:
      self.assertIn("TPU_NAME=r50 TPU_LOAD_LIBRARY=0", command)
      self.assertIn("--tpu=r50", shlex.split(command))
    else:
      self.assertNotIn("TPU_NAME", command)
      self.assertIn("--tpu=local", shlex.split(command))
    self.assertFalse([s for s in plan if "--worker=all" in s.argv])

  def test_explicit_runtime_version_wins(self):
    job = _job(create=True, tensorflow_version="2.20.0",
               runtime_version="tpu-vm-tf-2.18.0-pjrt")
    (create,) = [s for s in submit_tpu.build_plan(job, ARCHIVE)
                 if s.description == "create the slice"]
    self.assertIn("--version=tpu-vm-tf-2.18.0-pjrt", create.argv)

  def test_tensorflow_version_comes_from_requirements(self):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    version = submit_tpu.pinned_tensorflow_version(repo)
    with open(os.path.join(repo, "requirements.txt")) as f:
      self.assertIn(f"tensorflow=={version}\n", f.read())
    self.assertEqual(submit_tpu.pinned_tensorflow_version("/nonexistent"), "")

  def test_queued_spot_slice(self):
    job = _job(accelerator_type="v4-32", create=True, queued=True, spot=True,
               delete_after=True, tensorflow_version="2.20.0",
               trainer_args=("--torus_shape=2x8",))
    plan = submit_tpu.build_plan(job, ARCHIVE)
    queued = "gcloud compute tpus queued-resources"
    by_description = {s.description: s for s in plan}
    self.assertEqual(
        by_description["request the slice as a queued resource"].shell(),
        f"{queued} create r50 {WHERE} --node-id=r50 --accelerator-type=v4-32 "
        "--runtime-version=tpu-vm-tf-2.20.0-pod-pjrt --spot")
    self.assertEqual(by_description["delete the preempted slice"].shell(),
                     f"{queued} delete r50 {WHERE} --force --quiet")
    wait = by_description["wait until the queued resource is ACTIVE"]
    self.assertEqual((wait.argv[:2], wait.when),
                     (("bash", "-c"), submit_tpu.IF_NOT_ACTIVE))
    self.assertEqual(plan[0].shell(), f"{queued} describe r50 {WHERE} "
                     "'--format=value(state.state)'")
    self.assertEqual(plan[0].kind, "probe")
    self.assertIn(f"{queued} describe r50 {WHERE}", wait.argv[2])
    self.assertIn("ACTIVE) exit 0", wait.argv[2])
    self.assertEqual(plan[-1].shell(), f"{queued} delete r50 {WHERE} --force --quiet")
    self.assertEqual(plan[-1].when, submit_tpu.FINALLY)
    self.assertLen(_launches(plan), 1)

  def test_queued_needs_create_and_spot_not_preemptible(self):
    with self.assertRaisesRegex(submit_tpu.SubmitError, "--queued"):
      submit_tpu.validate(_job(queued=True))
    with self.assertRaisesRegex(submit_tpu.SubmitError, "--preemptible"):
      submit_tpu.validate(_job(queued=True, create=True, preemptible=True,
                               runtime_version="v"))

  def test_preemptible_flag(self):
    job = _job(create=True, preemptible=True, runtime_version="tpu-vm-tf-2.16.1-pjrt")
    create = [s for s in submit_tpu.build_plan(job, ARCHIVE)
              if s.description == "create the slice"][0]
    self.assertEqual(create.argv[-1], "--preemptible")

  def test_quoting_paths_with_spaces(self):
    job = _job(data_dir="gs://my bucket/image net", model_dir="gs://b/run 1",
               trainer_args=("--note", "it's a \"test\"; rm -rf /",
                             "--torus_shape=2x4"))
    plan = submit_tpu.build_plan(job, "/tmp/my dir/torus-resnet.tar.gz")
    # Locally: each printed line splits back into the exact argv.
    for step in plan:
      if step.kind != "pack":
        self.assertEqual(shlex.split(step.shell()), list(step.argv))
    scp = [s for s in plan if s.description.startswith("copy")][0]
    self.assertIn("/tmp/my dir/torus-resnet.tar.gz", scp.argv)
    # Remotely: the worker's shell sees each trainer flag as one word.
    words = shlex.split(_remote_command(_launches(plan)[0]))
    self.assertIn("--data_dir=gs://my bucket/image net", words)
    self.assertIn("--model_dir=gs://b/run 1", words)
    self.assertIn("it's a \"test\"; rm -rf /", words)
    self.assertNotIn("rm", words)

  def test_dry_run_text(self):
    text = submit_tpu.format_plan(submit_tpu.build_plan(
        _job(create=True, runtime_version="v", delete_after=True), ARCHIVE))
    self.assertIn("# create the slice (only if no usable slice exists)", text)
    self.assertIn("# delete the slice (also after a failure)", text)
    self.assertIn(f"{GCLOUD} scp {ARCHIVE}", text)


class BadInputTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("unknown_type", dict(accelerator_type="v3-7"), "accelerator_type"),
      ("grid_too_small", dict(accelerator_type="v3-32"), "torus_shape"),
      ("grid_for_v4_megacore", dict(accelerator_type="v4-8"), "torus_shape"),
      ("bad_grid_text", dict(trainer_args=("--torus_shape=2by4",)), "torus_shape"),
      ("batch_not_divisible", dict(trainer_args=("--train_batch_size", "1020")),
       "train_batch_size"),
      # The trainer's own replica check: the preset's values count too.
      ("preset_eval_batch_not_divisible",
       dict(accelerator_type="v3-128",
            trainer_args=("--train_batch_size=1024", "--torus_shape=8x16")),
       "eval_batch_size"),
      ("bn_group_does_not_tile", dict(trainer_args=("--bn_group_size=3",)),
       "bn_group_size"),
      ("unknown_preset", dict(trainer_args=("--preset=huge",)), "preset"),
      ("local_data_dir", dict(data_dir="/data/imagenet"), "data_dir"),
      ("local_model_dir", dict(model_dir="runs/r50"), "model_dir"),
      ("missing_model_dir", dict(model_dir=""), "model_dir"),
      ("missing_project", dict(project=""), "project"),
      ("bad_name", dict(tpu_name="My_TPU"), "tpu_name"),
      ("create_without_runtime", dict(create=True), "runtime_version"),
      ("spot_and_preemptible", dict(spot=True, preemptible=True), "spot"),
      ("tpu_in_trainer_args", dict(trainer_args=("--tpu=foo",)), "tpu"),
      ("data_dir_in_trainer_args", dict(trainer_args=("--data_dir", "gs://x")),
       "data_dir"),
  )
  def test_rejected_before_any_command(self, overrides, flag):
    calls = []
    with self.assertRaises(submit_tpu.SubmitError) as raised:
      plan = submit_tpu.build_plan(_job(**overrides), ARCHIVE)
      submit_tpu.run_plan(plan, runner=calls.append)
    self.assertEqual(raised.exception.flag, flag)
    self.assertStartsWith(str(raised.exception), f"--{flag}:")
    self.assertEmpty(calls)

  def test_grid_error_suggests_a_fit(self):
    with self.assertRaisesRegex(submit_tpu.SubmitError,
                                r"v3-32 runs 32 replicas: .* e\.g\. 4x8"):
      submit_tpu.validate(_job(accelerator_type="v3-32"))


class RunPlanTest(tf.test.TestCase):

  def _run(self, plan, state="", fail_on=None):
    calls = []

    def runner(argv):
      # The gcloud verb, "queued-<verb>" for a queued resource, "wait" for the poll.
      verb = ("wait" if argv[0] == "bash" else
              f"queued-{argv[4]}" if argv[3] == "queued-resources" else argv[4])
      calls.append(verb)
      return 1 if verb == fail_on else 0

    error = None
    try:
      submit_tpu.run_plan(plan, runner=runner, probe=lambda argv: state,
                          log=lambda line: None)
    except RuntimeError as e:
      error = str(e)
    return calls, error

  def _plan(self, tmp):
    job = _job(create=True, runtime_version="v", delete_after=True, repo_dir=tmp)
    return submit_tpu.build_plan(job, os.path.join(tmp, "out.tar.gz"))

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp)
    # A tiny git work tree for the pack step: one tracked file, one ignored.
    subprocess.run(["git", "-C", self.tmp, "init", "-q"], check=True)
    with open(os.path.join(self.tmp, "main.py"), "w") as f:
      f.write("print('hi')\n")
    with open(os.path.join(self.tmp, ".gitignore"), "w") as f:
      f.write("*.tar.gz\n.venv/\n")

  def test_missing_slice_is_created(self):
    calls, error = self._run(self._plan(self.tmp), state="")
    self.assertIsNone(error)
    self.assertEqual(calls, ["versions", "create", "scp", "ssh", "ssh", "delete"])
    with tarfile.open(os.path.join(self.tmp, "out.tar.gz")) as tar:
      self.assertCountEqual(tar.getnames(), ["main.py", ".gitignore"])

  def test_ready_slice_is_reused(self):
    calls, _ = self._run(self._plan(self.tmp), state="READY")
    self.assertEqual(calls, ["scp", "ssh", "ssh", "delete"])

  def test_preempted_slice_is_recreated(self):
    calls, _ = self._run(self._plan(self.tmp), state="PREEMPTED")
    self.assertEqual(calls, ["delete", "versions", "create", "scp", "ssh", "ssh",
                             "delete"])

  def _queued_plan(self, tmp):
    job = _job(create=True, queued=True, spot=True, runtime_version="v", repo_dir=tmp)
    return submit_tpu.build_plan(job, os.path.join(tmp, "out.tar.gz"))

  def test_queued_request_is_made_once_then_waited_for(self):
    calls, error = self._run(self._queued_plan(self.tmp), state="")
    self.assertIsNone(error)
    self.assertEqual(calls, ["versions", "queued-create", "wait", "scp", "ssh", "ssh"])

  def test_resubmitting_while_the_request_waits_does_not_request_again(self):
    for pending in ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"):
      calls, error = self._run(self._queued_plan(self.tmp), state=pending)
      self.assertIsNone(error)
      self.assertEqual(calls, ["wait", "scp", "ssh", "ssh"], pending)

  def test_active_queued_slice_is_reused(self):
    calls, _ = self._run(self._queued_plan(self.tmp), state="ACTIVE")
    self.assertEqual(calls, ["scp", "ssh", "ssh"])

  def test_failed_or_suspended_request_is_deleted_and_made_again(self):
    for dead in ("FAILED", "SUSPENDED"):
      calls, _ = self._run(self._queued_plan(self.tmp), state=dead)
      self.assertEqual(calls, ["queued-delete", "versions", "queued-create", "wait",
                               "scp", "ssh", "ssh"], dead)

  def test_a_missing_software_version_stops_before_anything_is_created(self):
    calls, error = self._run(self._plan(self.tmp), state="", fail_on="versions")
    self.assertEqual(calls, ["versions", "delete"])
    self.assertIn("pass --runtime_version", error)

  def test_stops_at_first_failure_but_still_deletes(self):
    calls, error = self._run(self._plan(self.tmp), state="READY", fail_on="scp")
    self.assertEqual(calls, ["scp", "delete"])
    self.assertIn("step 'copy it to worker 0' failed (exit code 1)", error)


class CommandLineTest(tf.test.TestCase):

  def _main(self, argv):
    flag_values = submit_tpu.define_flags(flags.FlagValues())
    rest = flag_values(["submit_tpu"] + argv)
    out, err = io.StringIO(), io.StringIO()
    code = submit_tpu.main(rest, flag_values, out=out, err=err)
    return code, out.getvalue(), err.getvalue()

  BASE = ["--tpu_name=r50", "--zone=europe-west4-a", "--project=my-project",
          "--accelerator_type=v3-32", "--model_dir=gs://b/runs", "--dry_run"]

  def test_dry_run_passes_flags_after_double_dash(self):
    code, out, err = self._main(self.BASE + ["--", "--torus_shape=4x8",
                                             "--train_batch_size=4096"])
    self.assertEqual((code, err), (0, ""))
    self.assertIn("v3-32: 16 chips, 32 TensorCores, 4 host(s), 32 replicas", out)
    self.assertIn("--torus_shape=4x8 --train_batch_size=4096'", out)
    self.assertEqual(out.count("--worker=0 '--command=cd torus-resnet"), 1)
    self.assertIn("TPU_NAME=r50 TPU_LOAD_LIBRARY=0", out)
    # The default runtime follows requirements.txt's TensorFlow (here without
    # --create, no create step at all).
    self.assertNotIn(" create ", out)

  def test_create_defaults_to_the_projects_tensorflow_image(self):
    code, out, err = self._main(self.BASE + ["--create", "--queued", "--spot", "--",
                                             "--torus_shape=4x8"])
    self.assertEqual((code, err), (0, ""))
    version = submit_tpu.pinned_tensorflow_version(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.assertIn(f"--runtime-version=tpu-vm-tf-{version}-pod-pjrt --spot", out)
    self.assertIn("queued-resources create r50", out)

  def test_bad_input_is_one_line_and_exit_2(self):
    code, out, err = self._main(self.BASE + ["--data_dir=/local/imagenet"])
    self.assertEqual(code, 2)
    self.assertEqual(out, "")
    self.assertEqual(err.count("\n"), 1)
    self.assertStartsWith(err, "error: --data_dir: '/local/imagenet' is not on "
                          "Cloud Storage")
    self.assertNotIn("Traceback", err)


if __name__ == "__main__":
  tf.test.main()
