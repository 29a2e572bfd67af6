"""Does the torus gradient summation overlap the backward pass? A profiler trace says.

Runs the project's trainer (ResNet on synthetic 32x32 images, grouped batch norm over
pairs, the 2x4 torus aggregator with small packs so that there are several) on 8
logical CPUs, traces one step, after a first that traced the function, with the TF
profiler (host tracer level 3: every op's start and end), and reads replica 0's ops
out of the trace:

* the backward pass: ops under `gradient_tape/`, from the loss gradient (the
  softmax cross-entropy's) to the last gradient op's end (weight decay's gradients
  are under `gradient_tape/` too but are computed alongside the forward pass);
* the gradient collectives: the aggregator's reduce-scatter (off NCCL a pair
  broadcast each way per pack, `CollectiveBcastSendV2` and `RecvV2`; an
  all-to-all under NCCL), all-reduce and all-gather ops (off NCCL a broadcast
  over the row from each member), built under the optimizer's name scope (batch
  norm's, forward and backward, are not).

Prints when each gradient collective started, relative to the backward pass, how
many of each op type started during it, and last
`gradient_collectives_started_during_backprop: <k>/<n>` over the ops that send
data: a broadcast receive has no input, so it starts at the top of the step and
waits, and its start says nothing about overlap (receives are listed, not counted).
0/n means the summation waited for the whole backward pass.

`--shard_weight_update x|xy` traces the sharded update instead (the default with the
torus), whose reduce-scatters are its gradient summation; its norm all-reduce and
weight all-gathers come after the update, so they cannot start during backprop.

    .venv/bin/python benchmarks/overlap_trace.py [--depth 18] [--width 16] [--pack_mb 0.25]
        [--shard_weight_update off]
"""

import argparse
import glob
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf
import tf_keras
from absl import logging
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from training import config as config_lib
from training import run as run_lib
from training import strategy as strategy_lib

NUM_REPLICAS = 8
_GRADIENT_COLLECTIVES = ("CollectiveAllToAllV2", "CollectiveBcastSendV2",
                         "CollectiveBcastRecvV2", "CollectiveReduceV2",
                         "CollectiveGatherV2")


def op_spans(xplane_path):
  """[(op name, op type, start us, end us)] of every op on the host, from the trace.

  Synchronous kernels appear as events named "<op name>:<op type>"; asynchronous ones
  (collectives) as `ExecutorState::ProcessAsync::Start` with the op's name and type
  in its stats, ending at the matching `...::Done`.
  """
  space = xplane_pb2.XSpace()
  with open(xplane_path, "rb") as f:
    space.ParseFromString(f.read())
  plane, = [p for p in space.planes if p.name == "/host:CPU"]

  def stats_of(event):
    values = {}
    for stat in event.stats:
      kind = stat.WhichOneof("value")
      value = getattr(stat, kind)
      if kind == "ref_value":
        value = plane.stat_metadata[value].name
      values[plane.stat_metadata[stat.metadata_id].name] = value
    return values

  spans, async_events = [], {}
  for line in plane.lines:
    for event in line.events:
      name = plane.event_metadata[event.metadata_id].name
      start = (line.timestamp_ns * 1000 + event.offset_ps) / 1e6
      end = start + event.duration_ps / 1e6
      if name in ("ExecutorState::ProcessAsync::Start",
                  "ExecutorState::ProcessAsync::Done"):
        stats = stats_of(event)
        if "name" in stats:
          phase = "start" if name.endswith("Start") else "done"
          key = (stats["name"], stats.get("kernel_type", ""))
          async_events.setdefault(key, {}).setdefault(phase, []).append(
              start if phase == "start" else end)
      elif ":" in name and "::" not in name and " " not in name:
        op_name, op_type = name.rsplit(":", 1)
        spans.append((op_name, op_type, start, end))
  for (op_name, op_type), phases in async_events.items():
    for begin, done in zip(sorted(phases.get("start", [])),
                           sorted(phases.get("done", []))):
      spans.append((op_name, op_type, begin, done))
  return spans


def last_run_of_replica_0(spans):
  """Replica 0's ops (MirroredStrategy names the others' `replica_<k>/...`), each
  op's last run only: the trace may hold more than one step."""
  last = {}
  for span in spans:
    if not re.search(r"(^|/)replica_\d+/", span[0]):
      key = span[:2]
      if key not in last or span[2] > last[key][2]:
        last[key] = span
  return list(last.values())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depth", type=int, default=18)
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--global_batch", type=int, default=32)
  parser.add_argument("--pack_mb", type=float, default=0.25,
                      help="the aggregator's pack cap (small: several packs)")
  parser.add_argument("--shard_weight_update", choices=("off", "x", "xy"),
                      default="off",
                      help="off: trace the gradient aggregator's summation; x, xy: "
                      "the sharded update's (the default with the torus), whose "
                      "reduce-scatters are the ones that can overlap backprop")
  args = parser.parse_args(argv)

  strategy_lib.split_cpu(NUM_REPLICAS)
  logging.set_verbosity(logging.ERROR)
  tf.get_logger().setLevel("ERROR")
  # Grappler would take minutes on 8 replicas' graphs and can reorder nothing that
  # matters here: the question is what the executor runs when.
  tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
  strategy = tf.distribute.MirroredStrategy(
      [f"/cpu:{i}" for i in range(NUM_REPLICAS)])
  work_dir = tempfile.mkdtemp(prefix="overlap_trace_")
  config = config_lib.build_config(
      "cpu_demo", model_dir=os.path.join(work_dir, "run"), dataset="synthetic",
      image_size=32, resnet_depth=args.depth, resnet_width=args.width,
      train_batch_size=args.global_batch, eval_batch_size=args.global_batch,
      bn_group_size=2, torus_shape=(2, 4), allreduce="torus",
      shard_weight_update=args.shard_weight_update,
      allreduce_pack_mb=args.pack_mb, train_steps=1,
      log_every_steps=1, checkpoint_every_steps=10**6)
  trainer = run_lib.build_trainer(config, strategy)
  trainer.train()  # traces the step
  # The same step function again, by Keras' `fit`, with the profiler on.
  data = tf_keras.utils.experimental.DatasetCreator(
      lambda context: trainer.data.make_train_dataset(context, 0),
      input_options=trainer.data.input_options)
  profile_dir = os.path.join(work_dir, "profile")
  tf.profiler.experimental.start(
      profile_dir, options=tf.profiler.experimental.ProfilerOptions(host_tracer_level=3))
  trainer.model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
  tf.profiler.experimental.stop()
  path, = glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)

  step = last_run_of_replica_0(op_spans(path))
  backward = [s for s in step if s[0].startswith("gradient_tape/")]
  # The aggregator's ops are built under the optimizer's name scope, the sharded
  # update's under its own (batch norm's under neither).
  scopes = (trainer.model.optimizer.get_config()["name"] + "/", "sharded_update/")
  gradient_collectives = sorted(
      (s for s in step if s[1] in _GRADIENT_COLLECTIVES and s[0].startswith(scopes)),
      key=lambda s: s[2])
  backward_start = min(s[2] for s in backward if "softmax_cross_entropy" in s[0])
  backward_end = max(s[3] for s in backward)
  print(f"ResNet-{args.depth} width {args.width}, batch {args.global_batch} over "
        f"{NUM_REPLICAS} logical CPUs ({os.cpu_count()} cores), 2x4 torus, packs of "
        f"at most {args.pack_mb:g} MiB, weight update sharded: "
        f"{args.shard_weight_update}; replica 0, times from the start of the "
        "backward pass:")
  print(f"  backward pass: 0 .. {backward_end - backward_start:.0f} us "
        f"({len(backward)} ops)")
  for name, op_type, start, end in gradient_collectives:
    print(f"  {op_type:22s} {start - backward_start:>9.0f} .. "
          f"{end - backward_start:>9.0f} us  {name}")
  senders = [s for s in gradient_collectives if s[1] != "CollectiveBcastRecvV2"]
  during = sum(1 for s in senders if s[2] < backward_end)
  for op_type in _GRADIENT_COLLECTIVES:
    spans = [s for s in gradient_collectives if s[1] == op_type]
    if spans:
      print(f"  {op_type}: {sum(1 for s in spans if s[2] < backward_end)}/"
            f"{len(spans)} started during backprop")
  print("gradient_collectives_started_during_backprop: "
        f"{during}/{len(senders)}")


if __name__ == "__main__":
  main()
