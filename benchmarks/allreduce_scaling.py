"""Prints the alpha-beta model of ring vs 2-D torus all-reduce from 8 to 1024 chips.

    python -m benchmarks.allreduce_scaling [--latency_us=1] [--bandwidth_gbps=83]

The payload is ResNet-50's gradient (25,557,032 float32 values, 102,228,128 bytes).
One replica per chip, grids as square as the chip count allows (32x32 at 1024, the
paper's TPU v3 pod). The two TensorCores of a v3 chip sum on-chip first; that is not
modelled. Parameters and their sources are in allreduce/cost_model.py.

The last line is `torus_vs_ring_at_1024: <torus time / ring time>x`: below 1 means
the 2-D torus all-reduce is faster than the 1-D ring.
"""

import argparse
import dataclasses

from allreduce import cost_model
from allreduce import topology

CHIP_COUNTS = (8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_SWEEP_US = (0.5, 1.0, 2.0, 5.0, 10.0)

# Ying et al. 2018 (arXiv 1811.06992) report, for the whole system: ResNet-50 to
# 76.3% top-1 in 2.2 minutes on a 1024-chip TPU v3 pod at over 1.05 million
# images/s. We did not find (in the sources available to us) a per-size gradient
# summation time or a 1-D vs 2-D speedup figure we could quote exactly, so the table
# has no "paper" column rather than a number we cannot cite.
PAPER_NOTE = ("paper: Ying et al. 2018 report 2.2 min / 1.05M images/s on 1024 TPU v3 "
              "chips; no all-reduce timing from the paper was available to compare "
              "against, so none is shown")


def scaling_rows(links, num_bytes=cost_model.RESNET50_GRADIENT_BYTES,
                 chip_counts=CHIP_COUNTS):
  """One dict per chip count: grid, steps, bytes and modelled times (seconds)."""
  rows = []
  for chips in chip_counts:
    x_size, y_size = topology.most_square_grid(chips)
    ring = cost_model.ring_allreduce_counts(chips, num_bytes)
    # The TPU back end's ops (XLA reduce-scatter, CrossReplicaSum, a permute ring
    # for the all-gather); the bytes and steps are the same on every back end.
    torus = cost_model.torus_allreduce_counts(x_size, y_size, num_bytes,
                                              backend="tpu")
    ring_s = cost_model.allreduce_time(ring, links)
    torus_s = cost_model.allreduce_time(torus, links)
    both_axes_s = cost_model.allreduce_time(torus, links, concurrent_halves=True)
    rows.append(dict(chips=chips, grid=f"{x_size}x{y_size}",
                     ring_steps=ring.ring_steps, torus_steps=torus.ring_steps,
                     ring_bytes=ring.bytes_sent, torus_bytes=torus.bytes_sent,
                     torus_ops=torus.collective_calls,
                     ring_s=ring_s, torus_s=torus_s, both_axes_s=both_axes_s,
                     torus_vs_ring=torus_s / ring_s))
  return rows


def format_table(rows):
  header = (f"{'chips':>6} {'grid':>6} {'ring_steps':>10} {'torus_steps':>11} "
            f"{'torus_ops':>9} "
            f"{'ring_MB':>8} {'torus_MB':>8} {'ring_ms':>8} {'torus_ms':>8} "
            f"{'torus2ax_ms':>11} {'torus/ring':>10}")
  lines = [header]
  for r in rows:
    lines.append(
        f"{r['chips']:>6} {r['grid']:>6} {r['ring_steps']:>10} {r['torus_steps']:>11} "
        f"{r['torus_ops']:>9} "
        f"{r['ring_bytes'] / 1e6:>8.2f} {r['torus_bytes'] / 1e6:>8.2f} "
        f"{r['ring_s'] * 1e3:>8.3f} {r['torus_s'] * 1e3:>8.3f} "
        f"{r['both_axes_s'] * 1e3:>11.3f} {r['torus_vs_ring']:>10.3f}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--latency_us", type=float,
                      default=cost_model.TPU_V3_STEP_LATENCY_S * 1e6,
                      help="alpha: seconds per ring step, in microseconds")
  parser.add_argument("--bandwidth_gbps", type=float,
                      default=cost_model.TPU_V3_LINK_BYTES_PER_S / 1e9,
                      help="one link, one direction, in GB/s (1e9 bytes/s)")
  args = parser.parse_args()
  links = dataclasses.replace(cost_model.TPU_V3_LINKS,
                              latency_s=args.latency_us * 1e-6,
                              bandwidth_bytes_per_s=args.bandwidth_gbps * 1e9)

  print(f"payload: ResNet-50 gradient, {cost_model.RESNET50_NUM_PARAMETERS:,} float32 "
        f"= {cost_model.RESNET50_GRADIENT_BYTES:,} bytes per replica")
  print(f"links: alpha={links.latency_s * 1e6:g} us/step, "
        f"{links.bandwidth_bytes_per_s / 1e9:.1f} GB/s per link per direction, "
        f"{links.links_per_chip} links/chip, bidirectional rings={links.bidirectional}")
  print("columns: torus_ops = TPU collective ops per replica per buffer; "
        "*_MB = bytes each replica sends; torus_ms = x-then-y schedule this "
        "repo implements; torus2ax_ms = two halves x-first and y-first at once "
        "(all 4 links busy; not implemented here)")
  rows = scaling_rows(links)
  print(format_table(rows))
  print("latency sensitivity at 1024 chips (32x32), torus/ring: " + ", ".join(
      f"{us:g}us={row[0]['torus_vs_ring']:.3f}" for us, row in (
          (us, scaling_rows(dataclasses.replace(links, latency_s=us * 1e-6),
                            chip_counts=(1024,)))
          for us in LATENCY_SWEEP_US)))
  print(PAPER_NOTE)
  print(f"torus_vs_ring_at_1024: {rows[-1]['torus_vs_ring']:.3f}x")


if __name__ == "__main__":
  main()
