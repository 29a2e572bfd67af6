"""One worker of `multiworker_allreduce_test`: a MultiWorkerMirroredStrategy process.

    python -m tests.multiworker_allreduce_worker --task=0 --ports=P0,P1,P2,P3 \
        --output=/tmp/result_0.json

Each worker is one replica (MultiWorkerMirroredStrategy gives a CPU-only worker one
device). It sums a known gradient list with the torus aggregator on several grids and
with the strategy's own all-reduce, checks both against NumPy (it can compute every
replica's input) and writes what it found as JSON. Exits 0 when everything matched.
"""

import argparse
import json
import os
import sys
import time

GRIDS = ("2x2", "1x4", "4x1")
# (shape, dtype name): mixed shapes and dtypes, a scalar, a size (13) no grid divides.
SPECS = (((3, 3, 2, 4), "float32"), ((7,), "bfloat16"), ((), "float32"),
         ((13,), "float32"), ((5, 6), "float32"))


def replica_values(num_replicas, integer_valued):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(123 if integer_valued else 456)
  values = []
  for shape, dtype in SPECS:
    if integer_valued:
      v = rng.integers(-8, 9, size=(num_replicas,) + shape).astype(np.float64)
    else:
      v = rng.standard_normal((num_replicas,) + shape)
      if dtype == "bfloat16":
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        v = tf.cast(tf.cast(v, tf.bfloat16), tf.float64).numpy()
    values.append(v)
  return values


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--task", type=int, required=True)
  parser.add_argument("--ports", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--timeout_seconds", type=float, default=60.0)
  args = parser.parse_args()
  start = time.monotonic()

  ports = args.ports.split(",")
  os.environ["TF_CONFIG"] = json.dumps({
      "cluster": {"worker": [f"localhost:{p}" for p in ports]},
      "task": {"type": "worker", "index": args.task}})
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import allreduce  # pylint: disable=g-import-not-at-top

  options = tf.distribute.experimental.CommunicationOptions(
      timeout_seconds=args.timeout_seconds)
  strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
  num_replicas = strategy.num_replicas_in_sync
  report = {"task": args.task, "num_replicas": num_replicas, "checks": {},
            "startup_seconds": time.monotonic() - start}
  all_ok = num_replicas == len(ports)

  def run(aggregate, values):
    @tf.function(autograph=False)
    def step():
      def replica_fn():
        context = tf.distribute.get_replica_context()
        r = int(tf.get_static_value(context.replica_id_in_sync_group))
        return aggregate([tf.constant(v[r], getattr(tf, dtype))
                          for v, (_, dtype) in zip(values, SPECS)])
      return strategy.run(replica_fn)
    return [strategy.experimental_local_results(t)[0].numpy() for t in step()]

  def strategy_sum(tensors):
    # One call per tensor: the strategy's batch all-reduce cannot pack mixed dtypes.
    context = tf.distribute.get_replica_context()
    return [context.all_reduce(tf.distribute.ReduceOp.SUM, t) for t in tensors]

  for integer_valued in (True, False):
    values = replica_values(num_replicas, integer_valued)
    summed = {"strategy": run(strategy_sum, values)}
    for grid in GRIDS:
      aggregator = allreduce.make_torus_aggregator(
          grid, timeout_seconds=args.timeout_seconds)
      summed[grid] = run(aggregator.all_reduce, values)
    for name, results in summed.items():
      ok, worst = True, 0.0
      for v, (shape, dtype), result in zip(values, SPECS, results):
        expected = v.sum(axis=0)
        error = np.abs(result.astype(np.float64) - expected)
        magnitude = np.abs(v).sum(axis=0)
        if integer_valued:
          bound = 0.0 * magnitude
        elif dtype == "float32":
          # Any float32 summation order: (n-1) * 2^-24 * sum|x| < 1e-6 * sum|x|.
          bound = 1e-6 * magnitude
        elif name == "strategy":
          # The strategy sums bfloat16 in bfloat16: 8 bits per addition.
          bound = len(values) * 2.0**-8 * magnitude
        else:
          # The torus sums bfloat16 in float32 and rounds once at the end.
          bound = 2.0**-8 * np.abs(expected) + 1e-6 * magnitude
        ok &= result.shape == shape and result.dtype.name == dtype
        ok &= bool((error <= bound).all())
        worst = max(worst, float(error.max()))
      kind = "integers" if integer_valued else "random"
      report["checks"][f"{name}/{kind}"] = {"ok": bool(ok), "max_error": worst}
      all_ok &= bool(ok)
  report["ok"] = bool(all_ok)
  report["total_seconds"] = time.monotonic() - start
  with open(args.output, "w") as f:
    json.dump(report, f)
  sys.stdout.flush()
  # Skip interpreter teardown: the gRPC server of a strategy cannot be stopped and
  # can block exit while its peers shut down.
  os._exit(0 if all_ok else 1)  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
