"""Runs main.py on a Cloud TPU VM or pod slice with gcloud.

    python -m tools.submit_tpu --tpu_name=resnet-pod --zone=europe-west4-a \\
        --project=my-project --accelerator_type=v3-32 --create --spot \\
        [--queued] [--runtime_version=tpu-vm-tf-2.20.0-pod-pjrt] \\
        --data_dir=gs://my-bucket/imagenet --model_dir=gs://my-bucket/runs/r50 \\
        [--delete_after] [--dry_run] \\
        -- --dataset=imagenet --train_batch_size=4096 --torus_shape=8x4

Everything after `--` is passed to main.py unchanged (each argument shell-quoted, so
values with spaces survive); the submitter itself adds `--tpu`, `--data_dir` and
`--model_dir`.

One process drives the whole slice: TensorFlow's TPUStrategy is single-client (one
Python program replicates over every core of every host; see
tensorflow/python/distribute/tpu_strategy.py), and on a multi-host TPU VM slice the
other hosts run the TPU runtime's servers that the image starts. So the trainer runs
on worker 0 only: with `--tpu=local` on a single-host slice, and with `--tpu=<name>`
plus `TPU_NAME=<name> TPU_LOAD_LIBRARY=0` on a multi-host one (the client reaches every
host through the Cloud TPU API by name and must not claim the local chips itself).
docs/TPU.md gives the sources. The plan, in order:

  1. with --create: make the slice unless it exists and is READY; a PREEMPTED spot
     slice is deleted and made again (re-submitting the same command after a
     preemption resumes training from the last checkpoint in --model_dir). With
     --queued the slice is requested as a queued resource (what Cloud TPU offers for
     large and spot slices) and the plan waits until it is ACTIVE;
  2. pack the working tree (git-tracked and untracked, not ignored, files) into a
     tarball, scp it to worker 0 and unpack it there; then run --install_command
     (default: tools/install_on_tpu_vm.sh, which installs the requirements around the
     image's TPU build of TensorFlow without replacing it);
  3. start main.py on worker 0; the ssh streams its output here;
  4. with --delete_after: delete the slice, also when an earlier step failed.

Building the plan is pure (`build_plan`), so tests and --dry_run see exactly the
commands the runner would execute. Bad input (unknown accelerator type, a grid,
batch or batch-norm group that does not fit the slice's replicas, by the trainer's own
`check_against_replicas`, a non-gs:// directory) raises `SubmitError` before anything
runs.
"""

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from typing import Callable, List, Optional, Sequence, Tuple

from allreduce import topology
from training import config as config_lib
from training.flag_error import FlagError

# A submission that cannot work; `flag` names the flag to fix. The trainer's own
# class, so a config check's error passes through unchanged.
SubmitError = FlagError


# ---------------------------------------------------------------------------
# Accelerator types.
#
# What N in `vX-N` counts, and how that maps to chips, hosts and the replicas a
# TPUStrategy sees, per Cloud TPU's documentation of each version
# (cloud.google.com/tpu/docs/v2, /v3, /v4, /v5e, /v5p, "System architecture"):
#   v2, v3: N = TensorCores, 2 per chip, 4 chips (8 cores) per host; every core is
#           a TPU device, so replicas = cores. v3-8 is one host with 4 chips;
#           v3-32 is 16 chips on 4 hosts; the paper's 1024-chip pod is v3-2048.
#   v4, v5p: N = TensorCores, 2 per chip, 4 chips per host, but the two cores of a
#           chip run as one "megacore" device, so replicas = chips = N / 2.
#   v5e (v5litepod-N): N = chips, 1 TensorCore each, replicas = chips; up to 8
#           chips on a host (the v5e page's "chips per host: 8").
# Sizes: v2 and v3 slices come in the listed sizes only; v4/v5p slices are 3-D
# shapes whose core count is a multiple of 8 (one host) up to the pod.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Generation:
  counts: str  # what N counts: "cores" or "chips"
  cores_per_chip: int
  replicas_per_chip: int
  chips_per_host: int
  sizes: Tuple[int, ...] = ()  # allowed N; empty means multiples of `step`
  step: int = 8
  max_size: int = 0


_GENERATIONS = {
    "v2": _Generation("cores", 2, 2, 4, sizes=(8, 32, 128, 256, 512)),
    "v3": _Generation("cores", 2, 2, 4,
                      sizes=(8, 32, 64, 128, 256, 512, 1024, 2048)),
    "v4": _Generation("cores", 2, 1, 4, max_size=8192),
    "v5p": _Generation("cores", 2, 1, 4, max_size=17920),
    "v5litepod": _Generation("chips", 1, 1, 8, sizes=(1, 4, 8, 16, 32, 64, 128, 256)),
}


@dataclasses.dataclass(frozen=True)
class SliceSpec:
  """A TPU slice: its accelerator type and what it holds."""
  accelerator_type: str
  generation: str
  chips: int
  cores: int
  hosts: int
  replicas: int  # TPU devices a TPUStrategy replicates over

  @property
  def multi_host(self) -> bool:
    return self.hosts > 1


def _known_types_hint() -> str:
  return ("known types are v2-{8,32,128,256,512}, v3-{8,32,...,2048}, v4-N and "
          "v5p-N (N a multiple of 8), v5litepod-{1,4,8,...,256}")


def parse_accelerator_type(text: str) -> SliceSpec:
  """'v3-32' -> SliceSpec(chips=16, cores=32, hosts=4, replicas=32)."""
  match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod)-(\d+)", text.strip().lower())
  if not match:
    raise SubmitError("accelerator_type",
                      f"unknown accelerator type {text!r}; {_known_types_hint()}")
  name, size = match.group(1), int(match.group(2))
  generation = _GENERATIONS[name]
  if generation.sizes:
    valid = size in generation.sizes
  else:
    valid = 0 < size <= generation.max_size and size % generation.step == 0
  if not valid:
    raise SubmitError("accelerator_type",
                      f"{text!r} is not a size {name} comes in; {_known_types_hint()}")
  if generation.counts == "cores":
    cores, chips = size, size // generation.cores_per_chip
  else:
    chips, cores = size, size * generation.cores_per_chip
  hosts = max(1, chips // generation.chips_per_host)
  return SliceSpec(accelerator_type=f"{name}-{size}", generation=name, chips=chips,
                   cores=cores, hosts=hosts,
                   replicas=chips * generation.replicas_per_chip)


# ---------------------------------------------------------------------------
# The job and its checks.
# ---------------------------------------------------------------------------

# Flags the submitter sets on main.py itself; passing them after `--` is an error.
RESERVED_TRAINER_FLAGS = ("tpu", "data_dir", "model_dir")

DEFAULT_REMOTE_DIR = "torus-resnet"
DEFAULT_INSTALL_COMMAND = "bash tools/install_on_tpu_vm.sh"
# The worker that runs the single TPUStrategy client (and the only one that needs the
# code): worker 0, which `tpu-vm ssh` also picks by default.
CLIENT_WORKER = "0"
_TPU_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclasses.dataclass(frozen=True)
class TpuJob:
  """Everything one submission needs, as plain values."""
  tpu_name: str
  zone: str
  project: str
  accelerator_type: str
  model_dir: str
  data_dir: str = ""
  trainer_args: Tuple[str, ...] = ()
  runtime_version: str = ""
  create: bool = False
  spot: bool = False
  preemptible: bool = False
  delete_after: bool = False
  repo_dir: str = "."
  remote_dir: str = DEFAULT_REMOTE_DIR
  install_command: str = DEFAULT_INSTALL_COMMAND
  python: str = "python3"
  queued: bool = False  # create through a queued resource
  # TensorFlow version the project pins (requirements.txt); picks the default runtime.
  tensorflow_version: str = ""


def default_runtime_version(spec: "SliceSpec", tensorflow_version: str) -> str:
  """The TPU VM image for `spec` with the TensorFlow the project pins.

  Cloud TPU names TensorFlow images `tpu-vm-tf-x.y.z[-pod][-{device_api}]`: `-pod`
  for multi-host slices, and from TF 2.15 a device API, `-pjrt` or `-se` (stream
  executor). PJRT is the one every generation runs (v5e and v5p have no stream
  executor build), so it is the default for all; the TF version is the project's,
  so the image's build is the one requirements.txt was tested with.
  """
  if not tensorflow_version:
    raise SubmitError("runtime_version",
                      "no default without the project's TensorFlow version "
                      "(the tensorflow== line of requirements.txt); give one, e.g. "
                      "tpu-vm-tf-2.20.0-pjrt")
  pod = "-pod" if spec.multi_host else ""
  return f"tpu-vm-tf-{tensorflow_version}{pod}-pjrt"


def pinned_tensorflow_version(repo_dir: str) -> str:
  """The version on requirements.txt's `tensorflow==` line ("" if there is none)."""
  try:
    with open(os.path.join(repo_dir, "requirements.txt")) as f:
      for line in f:
        match = re.fullmatch(r"tensorflow==([\w.]+)", line.split("#")[0].strip())
        if match:
          return match.group(1)
  except FileNotFoundError:
    pass
  return ""


def runtime_version(job: "TpuJob", spec: "SliceSpec") -> str:
  return job.runtime_version or default_runtime_version(spec, job.tensorflow_version)


def trainer_flag_value(args: Sequence[str], name: str) -> Optional[str]:
  """The last value of `--name=value` or `--name value` in `args`, else None."""
  value = None
  for i, arg in enumerate(args):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(args):
      value = args[i + 1]
  return value


def validate(job: TpuJob) -> SliceSpec:
  """Checks the whole job; returns the slice. Raises SubmitError naming the flag."""
  for flag in ("tpu_name", "zone", "project", "accelerator_type", "model_dir"):
    if not getattr(job, flag):
      raise SubmitError(flag, "is required")
  if not _TPU_NAME.fullmatch(job.tpu_name):
    raise SubmitError("tpu_name",
                      f"{job.tpu_name!r} is not a valid TPU name: use lower-case "
                      "letters, digits and '-', starting with a letter")
  spec = parse_accelerator_type(job.accelerator_type)
  # TPU workers read and write through Cloud Storage; a local path would name a
  # directory on each worker's own disk, different on every host and lost with it.
  for flag in ("model_dir", "data_dir"):
    value = getattr(job, flag)
    if value and not value.startswith("gs://"):
      raise SubmitError(flag, f"{value!r} is not on Cloud Storage; TPU workers need "
                        "a gs://bucket/path they can all reach")
  if job.create:
    runtime_version(job, spec)  # raises when there is neither a value nor a default
  if job.spot and job.preemptible:
    raise SubmitError("spot", "use either --spot or --preemptible, not both")
  if job.queued and not job.create:
    raise SubmitError("queued", "only applies with --create")
  if job.queued and job.preemptible:
    raise SubmitError("preemptible", "queued resources take --spot, not "
                      "--preemptible")
  for name in RESERVED_TRAINER_FLAGS:
    if trainer_flag_value(job.trainer_args, name) is not None or any(
        a == f"--no{name}" for a in job.trainer_args):
      raise SubmitError(name, f"set it as a submitter flag, not after `--`: the "
                        f"submitter passes --{name} to main.py itself")
  _check_replicas(job.trainer_args, spec)
  return spec


# Trainer flags, besides --preset and --torus_shape, that the replica check reads.
_REPLICA_CHECKED_FLAGS = ("train_batch_size", "eval_batch_size", "bn_group_size")


def _check_replicas(trainer_args: Sequence[str], spec: SliceSpec):
  """The trainer's config must fit the slice's replicas: its own check, run here.

  The values are those main.py will use, its preset's overridden by the flags
  after `--`, so a grid, batch or batch-norm group that cannot fit fails before a
  slice is made. Only what `check_against_replicas` reads is filled in; the trainer
  checks the rest when it starts.
  """
  preset = trainer_flag_value(trainer_args, "preset") or config_lib.TrainConfig.preset
  if preset not in config_lib.PRESETS:
    raise SubmitError("preset", f"unknown preset {preset!r}; choose one of "
                      f"{', '.join(sorted(config_lib.PRESETS))}")
  values = dict(config_lib.PRESETS[preset])
  shape_text = trainer_flag_value(trainer_args, "torus_shape")
  if shape_text:
    try:
      values["torus_shape"] = topology.parse_grid(shape_text)
    except topology.TopologyError as e:
      raise SubmitError("torus_shape", str(e)) from None
  for name in _REPLICA_CHECKED_FLAGS:
    text = trainer_flag_value(trainer_args, name)
    if text:
      if not text.isdigit() or int(text) < 1:
        raise SubmitError(name, f"must be a positive integer, got {text!r}")
      values[name] = int(text)
  try:
    config_lib.check_against_replicas(config_lib.TrainConfig.from_flat(preset, **values),
                                      spec.replicas)
  except SubmitError as e:
    raise SubmitError(e.flag, f"{spec.accelerator_type} runs {spec.replicas} "
                      f"replicas: {e.message}") from None


# ---------------------------------------------------------------------------
# The plan: the commands, in order.
# ---------------------------------------------------------------------------

# When a step runs. The runner decides the `IF_*` ones from the probed state: a
# node's (`tpu-vm describe`) or, with --queued, its queued resource's.
ALWAYS = "always"
IF_PREEMPTED = "if_preempted"  # the slice exists but cannot run: delete it first
IF_ABSENT = "if_absent"  # no usable slice: missing, or just deleted
IF_NOT_ACTIVE = "if_not_active"  # a queued request not granted yet (or just made)
FINALLY = "finally"  # also after an earlier step failed

# States after which a slice must be deleted and requested again: a preempted spot
# node; a queued resource that failed, or was suspended by a spot preemption.
_UNUSABLE_STATES = ("PREEMPTED", "FAILED", "SUSPENDED")
# States of a slice that runs now (a node's READY, a queued resource's ACTIVE).
_RUNNING_STATES = ("READY", "ACTIVE")


@dataclasses.dataclass(frozen=True)
class Step:
  """One command of the plan.

  `argv` is the command to run; a `pack` step has none (the runner writes
  `archive` from `repo_dir` itself). `probe` steps only report the slice's state.
  """
  description: str
  argv: Tuple[str, ...] = ()
  when: str = ALWAYS
  kind: str = "run"  # "run", "probe" (describe the slice) or "pack"
  archive: str = ""
  repo_dir: str = ""

  def shell(self) -> str:
    """The command as one shell-safe line."""
    return shlex.join(self.argv)


def _gcloud(verb: str, job: TpuJob, *args: str) -> Tuple[str, ...]:
  return ("gcloud", "compute", "tpus", "tpu-vm", verb, job.tpu_name,
          f"--zone={job.zone}", f"--project={job.project}") + tuple(args)


def _queued(verb: str, job: TpuJob, *args: str) -> Tuple[str, ...]:
  return ("gcloud", "compute", "tpus", "queued-resources", verb, job.tpu_name,
          f"--zone={job.zone}", f"--project={job.project}") + tuple(args)


def trainer_command(job: TpuJob, spec: SliceSpec) -> str:
  """The shell line worker 0 runs: main.py, the slice's one client, flags quoted.

  Single host: `--tpu=local`, the TPU attached to the VM. Multi-host: the TPU's name,
  which the client resolves to every host's TPU server; `TPU_NAME` names it for
  TensorFlow and `TPU_LOAD_LIBRARY=0` keeps this process from opening the local
  chips, which worker 0's own TPU server drives (the Cloud TPU pod instructions).
  """
  tpu = job.tpu_name if spec.multi_host else "local"
  flags = [f"--tpu={tpu}", f"--model_dir={job.model_dir}"]
  if job.data_dir:
    flags.append(f"--data_dir={job.data_dir}")
  flags.extend(job.trainer_args)
  environment = ["PYTHONUNBUFFERED=1"]  # log lines reach the ssh stream as written
  if spec.multi_host:
    environment = [f"TPU_NAME={shlex.quote(job.tpu_name)}", "TPU_LOAD_LIBRARY=0"
                   ] + environment
  return (f"cd {shlex.quote(job.remote_dir)} && {' '.join(environment)} "
          f"{shlex.quote(job.python)} main.py " + " ".join(map(shlex.quote, flags)))


def _wait_until_active(job: TpuJob) -> Tuple[str, ...]:
  """A local shell loop: poll the queued resource until ACTIVE; fail on FAILED."""
  describe = shlex.join(_queued("describe", job, "--format=value(state.state)"))
  script = (f"while true; do state=$({describe}); echo \"# queued resource: $state\"; "
            'case "$state" in ACTIVE) exit 0;; FAILED|SUSPENDED) exit 1;; esac; '
            "sleep 60; done")
  return ("bash", "-c", script)


def _check_version_step(job: TpuJob, version: str) -> Step:
  """Asks Cloud TPU whether the software version exists before anything is created.

  The default version is derived from the pinned TensorFlow by Cloud TPU's naming
  rule, and a release may not have every variant; this fails first, naming the flag.
  """
  return Step(
      f"check that TPU software version {version} exists (if not, pass "
      "--runtime_version)",
      ("gcloud", "compute", "tpus", "tpu-vm", "versions", "describe", version,
       f"--zone={job.zone}", f"--project={job.project}"), when=IF_ABSENT)


def build_plan(job: TpuJob, archive: str) -> List[Step]:
  """The steps that run `job`, `archive` being the local tarball path to write."""
  spec = validate(job)
  archive_name = f"{job.remote_dir}.tar.gz"
  remote = shlex.quote(job.remote_dir)
  worker = f"--worker={CLIENT_WORKER}"
  plan = []
  if job.create:
    version = runtime_version(job, spec)
    if job.queued:
      # The queued resource, not the node: while a request waits for capacity there
      # is no node yet, and a second `create` of the same request would fail.
      plan.append(Step("look up the queued resource", _queued(
          "describe", job, "--format=value(state.state)"), kind="probe"))
      # Deleting the queued resource (with --force) deletes its node too.
      plan.append(Step("delete the preempted slice", _queued(
          "delete", job, "--force", "--quiet"), when=IF_PREEMPTED))
      plan.append(_check_version_step(job, version))
      create = _queued("create", job, f"--node-id={job.tpu_name}",
                       f"--accelerator-type={job.accelerator_type}",
                       f"--runtime-version={version}")
      if job.spot:
        create += ("--spot",)
      plan.append(Step("request the slice as a queued resource", create,
                       when=IF_ABSENT))
      plan.append(Step("wait until the queued resource is ACTIVE",
                       _wait_until_active(job), when=IF_NOT_ACTIVE))
    else:
      plan.append(Step("look up the slice", _gcloud(
          "describe", job, "--format=value(state)"), kind="probe"))
      plan.append(Step("delete the preempted slice", _gcloud(
          "delete", job, "--quiet"), when=IF_PREEMPTED))
      plan.append(_check_version_step(job, version))
      create = _gcloud("create", job, f"--accelerator-type={job.accelerator_type}",
                       f"--version={version}")
      if job.spot:
        create += ("--spot",)
      elif job.preemptible:
        create += ("--preemptible",)
      plan.append(Step("create the slice", create, when=IF_ABSENT))
  plan.append(Step("pack the working tree", kind="pack", archive=archive,
                   repo_dir=job.repo_dir))
  plan.append(Step(f"copy it to worker {CLIENT_WORKER}", (
      "gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
      f"{job.tpu_name}:{archive_name}", f"--zone={job.zone}",
      f"--project={job.project}", worker)))
  install = (f"rm -rf {remote} && mkdir -p {remote} && "
             f"tar -xzf {shlex.quote(archive_name)} -C {remote} && "
             f"cd {remote} && {job.install_command}")
  plan.append(Step(f"unpack and install on worker {CLIENT_WORKER}", _gcloud(
      "ssh", job, worker, f"--command={install}")))
  where = (f"the one client for all {spec.hosts} hosts" if spec.multi_host
           else "the single host")
  plan.append(Step(f"train on worker {CLIENT_WORKER}, {where} (logs stream here)",
                   _gcloud("ssh", job, worker,
                           f"--command={trainer_command(job, spec)}")))
  if job.delete_after:
    delete = (_queued("delete", job, "--force", "--quiet") if job.queued
              else _gcloud("delete", job, "--quiet"))
    plan.append(Step("delete the slice", delete, when=FINALLY))
  return plan


def format_plan(plan: Sequence[Step]) -> str:
  """What --dry_run prints: a comment per step, then the command."""
  notes = {IF_PREEMPTED: " (only if the slice is PREEMPTED, FAILED or SUSPENDED)",
           IF_ABSENT: " (only if no usable slice exists)",
           IF_NOT_ACTIVE: " (unless the queued resource is ACTIVE already)",
           FINALLY: " (also after a failure)"}
  lines = []
  for step in plan:
    lines.append(f"# {step.description}{notes.get(step.when, '')}")
    if step.kind == "pack":
      lines.append(f"#   {step.archive} <- git ls-files --cached --others "
                   f"--exclude-standard in {step.repo_dir}")
    else:
      lines.append(step.shell())
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Running the plan.
# ---------------------------------------------------------------------------


def repo_files(repo_dir: str) -> List[str]:
  """Tracked and untracked-but-not-ignored files: what the job needs, no venv."""
  out = subprocess.run(
      ["git", "-C", repo_dir, "ls-files", "-z", "--cached", "--others",
       "--exclude-standard"], check=True, capture_output=True).stdout
  return [f for f in out.decode().split("\0")
          if f and os.path.isfile(os.path.join(repo_dir, f))]


def pack_repo(repo_dir: str, archive: str) -> int:
  """Writes the working tree's files to a .tar.gz; returns how many."""
  files = repo_files(repo_dir)
  with tarfile.open(archive, "w:gz") as tar:
    for name in files:
      tar.add(os.path.join(repo_dir, name), arcname=name)
  return len(files)


def _stream(argv: Sequence[str]) -> int:
  """Runs a command with its output going straight to ours (the logs)."""
  return subprocess.run(list(argv), check=False).returncode


def _slice_state(argv: Sequence[str]) -> str:
  """The slice's state, or "" when it does not exist (describe fails)."""
  result = subprocess.run(list(argv), check=False, capture_output=True, text=True)
  return result.stdout.strip() if result.returncode == 0 else ""


def run_plan(plan: Sequence[Step], runner: Callable[[Sequence[str]], int] = _stream,
             probe: Callable[[Sequence[str]], str] = _slice_state,
             log: Callable[[str], None] = print) -> None:
  """Runs the steps in order; stops at the first failure, then runs FINALLY steps.

  Raises RuntimeError naming the step and its exit code when one fails.
  """
  state = None
  failure = None
  for step in plan:
    if failure is not None and step.when != FINALLY:
      continue
    if step.when == IF_PREEMPTED and state not in _UNUSABLE_STATES:
      continue
    if step.when == IF_ABSENT and state not in ("", "DELETED"):
      log(f"# slice exists ({state}); not creating it")
      continue
    if step.when == IF_NOT_ACTIVE and state in _RUNNING_STATES:
      continue
    log(f"# {step.description}")
    if step.kind == "probe":
      state = probe(step.argv)
      continue
    if step.kind == "pack":
      count = pack_repo(step.repo_dir, step.archive)
      log(f"#   {count} files -> {step.archive}")
      continue
    log(step.shell())
    code = runner(step.argv)
    if step.when == IF_PREEMPTED and code == 0:
      state = "DELETED"
    if code != 0 and failure is None:
      failure = f"step '{step.description}' failed (exit code {code}): {step.shell()}"
  if failure is not None:
    raise RuntimeError(failure)


# ---------------------------------------------------------------------------
# The command line. tools/ is a CLI layer, so it reads absl flags here and hands
# plain values to the functions above.
# ---------------------------------------------------------------------------


def define_flags(flag_values=None):
  """Defines the CLI's flags on `flag_values` (absl's global FLAGS by default)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_string("tpu_name", None, "Name of the TPU VM or pod slice.",
                      flag_values=fv)
  flags.DEFINE_string("zone", None, "Zone of the slice, e.g. europe-west4-a.",
                      flag_values=fv)
  flags.DEFINE_string("project", None, "Google Cloud project id.", flag_values=fv)
  flags.DEFINE_string("accelerator_type", None,
                      "v2-N, v3-N, v4-N, v5p-N (N = TensorCores) or v5litepod-N "
                      "(N = chips), e.g. v3-8, v3-32, v3-2048.", flag_values=fv)
  flags.DEFINE_string("runtime_version", "",
                      "TPU VM software version for --create; default "
                      "tpu-vm-tf-<requirements.txt's TensorFlow>[-pod]-pjrt.",
                      flag_values=fv)
  flags.DEFINE_string("data_dir", "", "gs:// directory of the TFRecords.",
                      flag_values=fv)
  flags.DEFINE_string("model_dir", None,
                      "gs:// directory for checkpoints and summaries; re-submitting "
                      "with the same one resumes from its last checkpoint.",
                      flag_values=fv)
  flags.DEFINE_bool("create", False, "Create the slice unless a READY one exists.",
                    flag_values=fv)
  flags.DEFINE_bool("spot", False, "Create a spot slice.", flag_values=fv)
  flags.DEFINE_bool("preemptible", False, "Create a preemptible slice.",
                    flag_values=fv)
  flags.DEFINE_bool("queued", False,
                    "With --create: request the slice as a queued resource "
                    "(gcloud compute tpus queued-resources), for large and spot "
                    "slices, and wait until it is ACTIVE.", flag_values=fv)
  flags.DEFINE_bool("delete_after", False,
                    "Delete the slice when training ends or fails.", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print the gcloud commands and exit.",
                    flag_values=fv)
  flags.DEFINE_string("remote_dir", DEFAULT_REMOTE_DIR,
                      "Directory (under each worker's home) for the code.",
                      flag_values=fv)
  flags.DEFINE_string("install_command", DEFAULT_INSTALL_COMMAND,
                      "Shell command run in --remote_dir on worker 0 after "
                      "unpacking, to install the dependencies.", flag_values=fv)
  return fv


def job_from_flags(flag_values, trainer_args: Sequence[str], repo_dir: str) -> TpuJob:
  return TpuJob(
      tpu_name=flag_values.tpu_name or "", zone=flag_values.zone or "",
      project=flag_values.project or "",
      accelerator_type=flag_values.accelerator_type or "",
      model_dir=flag_values.model_dir or "", data_dir=flag_values.data_dir,
      trainer_args=tuple(trainer_args), runtime_version=flag_values.runtime_version,
      create=flag_values.create, spot=flag_values.spot,
      preemptible=flag_values.preemptible, delete_after=flag_values.delete_after,
      repo_dir=repo_dir, remote_dir=flag_values.remote_dir,
      install_command=flag_values.install_command, queued=flag_values.queued,
      tensorflow_version=pinned_tensorflow_version(repo_dir))


def main(argv: Sequence[str], flag_values, out=None, err=None) -> int:
  """Runs the CLI on parsed `flag_values`; returns the exit code.

  `argv[1:]` are the arguments absl left unparsed, i.e. those after `--`: they go
  to main.py. A bad flag prints one line naming it (no traceback) and returns 2; a
  failed gcloud step returns 1.
  """
  out = out or sys.stdout
  err = err or sys.stderr
  trainer_args = [a for a in argv[1:] if a != "--"]
  repo_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  job = job_from_flags(flag_values, trainer_args, repo_dir)
  try:
    with tempfile.TemporaryDirectory(prefix="submit_tpu_") as tmp:
      plan = build_plan(job, os.path.join(tmp, f"{job.remote_dir}.tar.gz"))
      spec = parse_accelerator_type(job.accelerator_type)
      print(f"# {spec.accelerator_type}: {spec.chips} chips, {spec.cores} TensorCores, "
            f"{spec.hosts} host(s), {spec.replicas} replicas", file=out)
      if flag_values.dry_run:
        print(format_plan(plan), file=out)
        return 0
      run_plan(plan, log=lambda line: print(line, file=out, flush=True))
  except SubmitError as e:
    print(f"error: {e}", file=err)
    return 2
  except RuntimeError as e:
    print(f"error: {e}", file=err)
    return 1
  return 0


def run():
  # Flags are defined here, not at import, so that tests can import this module
  # next to main.py (which defines --data_dir and --model_dir too).
  from absl import app  # pylint: disable=g-import-not-at-top
  flag_values = define_flags()
  app.run(lambda argv: sys.exit(main(argv, flag_values)))


if __name__ == "__main__":
  run()
