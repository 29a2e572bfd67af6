"""An alpha-beta cost model of the 1-D ring and the 2-D torus all-reduce.

Why a model: the CPU runs here can check that the implementation issues the
collectives and moves the bytes we think it does, but they cannot show what happens
on a 1024-chip pod. The model takes those same counts and prices them with a per-step
latency (alpha) and a per-link bandwidth (beta = 1 / bandwidth):

    time(phase) = ring_steps * latency + bytes_sent / ring_bandwidth

A ring of p members needs 2(p - 1) latency steps for an all-reduce. The 2-D torus
(Ying et al. 2018, arXiv 1811.06992, section on 2-D gradient summation) does a
reduce-scatter along x, an all-reduce of each 1/x shard along y and an all-gather
along x: 2(x - 1) + 2(y - 1) steps, about 4(sqrt(p) - 1) on a square grid, for the
same bytes per replica. At 1024 chips that is 124 steps instead of 2046, which is the
whole case for the 2-D algorithm once the payload per step gets small.

Two schedules are counted for every phase:
  * `ring_steps`: the latency steps of the textbook ring schedule (what a TPU's
    interconnect executes, one neighbour hop per step);
  * `collective_calls`: the collective ops each replica issues in *this* repo's
    implementation (allreduce/torus_aggregator.py), per back end (`backend=`):
    - "collective_ops" (`CollectiveOpsBackend` off NCCL: CPU, and GPU without
      NCCL): the aggregator hands the back end each pack as its x chunks
      (`reduce_scatter_chunks`), which it exchanges by pair broadcasts, a
      `CollectiveBcastSendV2` of its chunk to each of the x - 1 peers and a
      `CollectiveBcastRecvV2` of the peer's chunk from each, 2 (x - 1) ops, then a
      local sum; the y all-reduce is one `CollectiveReduceV2`; the all-gather
      (`all_gather_chunks`) one broadcast over the row from each member, a
      `CollectiveBcastSendV2` of its shard and x - 1 `CollectiveBcastRecvV2`s, x
      ops. Chunks may then differ in length (runs of whole tensors): the counts
      below are those of equal chunks, which the mean over a row's replicas equals;
    - "nccl" (`CollectiveOpsBackend(communication_hint="nccl")`, what
      `backend_for_strategy` picks when every replica is a GPU): equal chunks, the
      reduce-scatter the base class's concatenation and one `CollectiveAllToAllV2`
      plus a local sum (NCCL needs one launch order, which unordered broadcasts do
      not keep; also what `reduce_scatter_sum` issues on either collective-ops back
      end), the all-gather one `CollectiveGatherV2`;
    - "tpu": the reduce-scatter is one `XlaReduceScatter`, the y all-reduce one
      `CrossReplicaSum`, the all-gather 2 (x - 1) `CollectivePermute`s, the ring
      itself (x - 1 steps, half of each piece each way round).
    tests/cost_model_check_test.py traces the aggregator through each and compares
    the ops it issued (tests/collective_recorder.py) with these counts.
`payload_bytes` is the size of the tensor each replica hands to that collective (what
instrumenting the implementation records) and `bytes_sent` is what each replica puts
on the wire in the phase. For the reduce-scatter the two schedules send the same
bytes: a ring sends (x - 1) chunks of n/x, an all-to-all or the pair broadcasts send
the (x - 1) other chunks of n/x directly. A group of one replica needs no collective:
its phase counts zero calls, steps and bytes.

Why these TPU ops (bytes on the busiest link of a bidirectional ring of g chips, for a
piece of d bytes per member, which is what `bytes_sent / ring_bandwidth` prices):
  * ring reduce-scatter or all-gather: (g - 1) d / 2, the optimum;
  * `AllToAll` (the previous TPU reduce-scatter and all-gather): every chunk goes
    straight to its destination, up to g / 2 hops away, so the busiest link carries
    about g^2 d / 8: equal at g = 2, 1.3x at g = 4, 8x at the pod's g = 32;
  * `CrossReplicaSum` of a zero-padded g * d buffer as an all-gather (what TF's own
    `TPUStrategy.all_gather` does; TF 2.20 has no TPU all-gather op): (g - 1) d,
    2x the optimum and 2(g - 1) steps instead of g - 1.
So the reduce-scatter is XLA's own (`XlaReduceScatter`) and the all-gather is built
from neighbour-to-neighbour `CollectivePermute`s, both at the ring optimum that the
counts below assume; the permute ring pays one op launch per step, which is folded
into the per-step latency.

Everything here is plain Python so the counts can be compared with `==` against the
instrumented implementation (`as_dict()`).
"""

import dataclasses
import math
from typing import Dict, Tuple

# ResNet-50 v1.5's trainable parameters (the gradient that is all-reduced every step):
# 25,557,032 values, float32.
RESNET50_NUM_PARAMETERS = 25_557_032
RESNET50_GRADIENT_BYTES = RESNET50_NUM_PARAMETERS * 4  # 102,228,128 bytes

FLOAT32_BYTES = 4


class CostModelError(ValueError):
  """A grid, payload or link parameter the model cannot price."""


@dataclasses.dataclass(frozen=True)
class PhaseCounts:
  """One phase of an all-reduce, seen from one replica.

  Attributes:
    name: "reduce_scatter_x", "all_reduce_y", "all_gather_x" or "all_reduce".
    collective: what the implementation's op does: "pair_broadcasts" (the
      collective_ops reduce-scatter: a broadcast to and from each peer),
      "all_to_all" (the nccl reduce-scatter), "reduce_scatter" (TPU), "all_reduce"
      or "all_gather".
    group_size: replicas in each group (ring) of this phase.
    num_groups: groups that run this phase side by side.
    collective_calls: collective ops each replica issues (0 for a group of one).
    ring_steps: latency steps of the textbook ring schedule.
    payload_bytes: bytes of the tensor each replica passes to each call.
    bytes_sent: bytes each replica sends during the phase.
  """
  name: str
  collective: str
  group_size: int
  num_groups: int
  collective_calls: int
  ring_steps: int
  payload_bytes: int
  bytes_sent: int


@dataclasses.dataclass(frozen=True)
class AllReduceCounts:
  """The phases of one all-reduce of `num_bytes` over `num_replicas` replicas."""
  algorithm: str  # "ring" or "torus"
  grid: Tuple[int, int]  # (p, 1) for a ring
  num_bytes: int
  element_bytes: int
  phases: Tuple[PhaseCounts, ...]

  @property
  def num_replicas(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def collective_calls(self) -> int:
    return sum(p.collective_calls for p in self.phases)

  @property
  def ring_steps(self) -> int:
    return sum(p.ring_steps for p in self.phases)

  @property
  def bytes_sent(self) -> int:
    return sum(p.bytes_sent for p in self.phases)

  def phase(self, name: str) -> PhaseCounts:
    for phase in self.phases:
      if phase.name == name:
        return phase
    raise KeyError(f"no phase {name!r}; phases are {[p.name for p in self.phases]}")

  def as_dict(self) -> Dict[str, object]:
    """Plain nested dicts and ints, for comparing with instrumented counts."""
    return {
        "algorithm": self.algorithm,
        "grid": list(self.grid),
        "num_bytes": self.num_bytes,
        "element_bytes": self.element_bytes,
        "collective_calls": self.collective_calls,
        "ring_steps": self.ring_steps,
        "bytes_sent": self.bytes_sent,
        "phases": [dataclasses.asdict(p) for p in self.phases],
    }


def _check_payload(num_bytes: int, element_bytes: int) -> int:
  if element_bytes < 1:
    raise CostModelError(f"element_bytes must be positive, got {element_bytes}")
  if num_bytes < 0 or num_bytes % element_bytes:
    raise CostModelError(
        f"num_bytes must be a non-negative multiple of element_bytes={element_bytes}, "
        f"got {num_bytes}")
  return num_bytes // element_bytes


def _chunk_elements(num_elements: int, parts: int) -> int:
  """Elements per chunk when `num_elements` is split into `parts` equal (padded) chunks."""
  return -(-num_elements // parts)


def _ring_all_reduce_phase(name, group_size, num_groups, num_elements, element_bytes):
  """A ring all-reduce: reduce-scatter then all-gather, 2(g - 1) steps of n/g each."""
  if group_size == 1:
    return PhaseCounts(name, "all_reduce", 1, num_groups, 0, 0, 0, 0)
  chunk = _chunk_elements(num_elements, group_size) * element_bytes
  steps = 2 * (group_size - 1)
  return PhaseCounts(name, "all_reduce", group_size, num_groups, 1, steps,
                     num_elements * element_bytes, steps * chunk)


def ring_allreduce_counts(num_replicas: int, num_bytes: int,
                          element_bytes: int = FLOAT32_BYTES) -> AllReduceCounts:
  """One all-reduce over a single ring of `num_replicas` (one collective call).

  Each replica sends 2(p - 1) chunks of ceil(n / p) elements: the reduce-scatter
  half and the all-gather half of the ring algorithm.
  """
  if num_replicas < 1:
    raise CostModelError(f"num_replicas must be positive, got {num_replicas}")
  num_elements = _check_payload(num_bytes, element_bytes)
  phase = _ring_all_reduce_phase("all_reduce", num_replicas, 1, num_elements,
                                 element_bytes)
  return AllReduceCounts("ring", (num_replicas, 1), num_bytes, element_bytes,
                         (phase,))


BACKENDS = ("collective_ops", "nccl", "tpu")

# The reduce-scatter's kind of op per back end (`PhaseCounts.collective`).
_SCATTER_KIND = {"collective_ops": "pair_broadcasts", "nccl": "all_to_all",
                 "tpu": "reduce_scatter"}


def torus_allreduce_counts(x_size: int, y_size: int, num_bytes: int,
                           element_bytes: int = FLOAT32_BYTES,
                           backend: str = "collective_ops") -> AllReduceCounts:
  """The 2-D all-reduce on an `x_size` by `y_size` grid, as `backend` issues it.

  The buffer is padded to a multiple of `x_size` elements and cut into `x_size`
  shards of s = ceil(n / x) elements:
    1. reduce-scatter along x (rows of x): x - 1 ring steps, (x - 1) * s sent; the
       implementation issues 2 (x - 1) pair broadcasts of one shard each, a send
       to and a receive from each peer (collective_ops), one all-to-all of the
       padded buffer (nccl) or one XLA reduce-scatter of it (tpu). The payload is
       the padded buffer, x * s elements, on every back end.
    2. all-reduce of the one summed shard along y (columns of y): 2(y - 1) steps of
       ceil(s / y) elements; one op.
    3. all-gather along x: x - 1 steps, (x - 1) * s sent; x broadcasts, one from
       each member (collective_ops), one gather of the shard (nccl) or 2 (x - 1)
       neighbour permutes of half a shard (tpu).
  Bytes and steps are the same on every back end; only the ops issued differ.
  """
  if backend not in BACKENDS:
    raise CostModelError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if x_size < 1 or y_size < 1:
    raise CostModelError(f"grid sides must be positive, got {x_size}x{y_size}")
  num_elements = _check_payload(num_bytes, element_bytes)
  shard = _chunk_elements(num_elements, x_size)
  shard_bytes = shard * element_bytes
  scatter_kind = _SCATTER_KIND[backend]
  if x_size == 1:
    scatter = PhaseCounts("reduce_scatter_x", scatter_kind, 1, y_size, 0, 0, 0, 0)
    gather = PhaseCounts("all_gather_x", "all_gather", 1, y_size, 0, 0, 0, 0)
  else:
    sent = (x_size - 1) * shard_bytes
    scatter_calls = 2 * (x_size - 1) if backend == "collective_ops" else 1
    gather_calls = {"collective_ops": x_size, "nccl": 1,
                    "tpu": 2 * (x_size - 1)}[backend]
    scatter = PhaseCounts("reduce_scatter_x", scatter_kind, x_size, y_size,
                          scatter_calls, x_size - 1, x_size * shard_bytes, sent)
    gather = PhaseCounts("all_gather_x", "all_gather", x_size, y_size, gather_calls,
                         x_size - 1, shard_bytes, sent)
  reduce_y = _ring_all_reduce_phase("all_reduce_y", y_size, x_size, shard,
                                    element_bytes)
  return AllReduceCounts("torus", (x_size, y_size), num_bytes, element_bytes,
                         (scatter, reduce_y, gather))


@dataclasses.dataclass(frozen=True)
class LinkParameters:
  """The interconnect as the model sees it.

  Attributes:
    latency_s: alpha, seconds per ring step (hop latency plus the per-step
      synchronisation of the collective), independent of size.
    bandwidth_bytes_per_s: bytes per second of one link in one direction.
    links_per_chip: links leaving a chip: 2 on a ring, 4 on a 2-D torus. A ring
      along one axis can use the 2 links of that axis; the 2-D schedule can keep
      the x and the y links busy at once only when this is at least 4.
    bidirectional: a ring sends half of each chunk each way round, so a replica
      sends on 2 links at once; otherwise on 1.
  """
  latency_s: float
  bandwidth_bytes_per_s: float
  links_per_chip: int = 4
  bidirectional: bool = True

  def __post_init__(self):
    if self.latency_s < 0:
      raise CostModelError(f"latency_s must be >= 0, got {self.latency_s}")
    if self.bandwidth_bytes_per_s <= 0:
      raise CostModelError(
          f"bandwidth_bytes_per_s must be positive, got {self.bandwidth_bytes_per_s}")
    if self.links_per_chip < 2:
      raise CostModelError(
          f"links_per_chip must be at least 2 (a ring), got {self.links_per_chip}")

  @property
  def ring_bandwidth_bytes_per_s(self) -> float:
    """Bytes per second one replica sends along one ring."""
    return self.bandwidth_bytes_per_s * (2 if self.bidirectional else 1)


# TPU v3 figures. Sources and how sure we are:
#  * Cloud TPU v3 documentation (cloud.google.com/tpu/docs/v3), "v3 Pod values":
#    1024 chips, 2-D torus interconnect, all-reduce bandwidth per pod 340 TB/s,
#    bisection bandwidth per pod 6.4 TB/s.
#  * The same table for v5e (cloud.google.com/tpu/docs/v5e) lists 4 ICI ports per
#    chip, 400 GB/s bidirectional ICI per chip and 51.2 TB/s all-reduce per
#    256-chip pod, i.e. the all-reduce figure is chips * 4 links * one direction.
#    Reading v3's 340 TB/s the same way gives 340e12 / 1024 / 4 = 83 GB/s per link
#    per direction, which matches the ~656 Gbit/s per ICI link quoted for TPU v3 in
#    Jouppi et al. 2020 ("A Domain-Specific Supercomputer for Training Deep Neural
#    Networks", CACM) as we remember it. The v3 bisection figure read the same way
#    (a 32x32 torus cut crosses 64 links) gives 100 GB/s: the per-link bandwidth is
#    uncertain by about 20%.
#  * Latency: Google publishes no per-hop or per-step ICI latency for v3. 1 us per
#    ring step is an assumption of the right order for a hardware-driven neighbour
#    exchange; the benchmark prints the result for 0.5 to 10 us as well, and the
#    torus/ring ratio at 1024 chips depends on it far more than on the bandwidth.
TPU_V3_POD_CHIPS = 1024
TPU_V3_POD_GRID = (32, 32)
TPU_V3_ALLREDUCE_BYTES_PER_S_PER_POD = 340e12
TPU_V3_LINKS_PER_CHIP = 4
TPU_V3_LINK_BYTES_PER_S = (TPU_V3_ALLREDUCE_BYTES_PER_S_PER_POD / TPU_V3_POD_CHIPS /
                           TPU_V3_LINKS_PER_CHIP)
TPU_V3_STEP_LATENCY_S = 1e-6

TPU_V3_LINKS = LinkParameters(
    latency_s=TPU_V3_STEP_LATENCY_S,
    bandwidth_bytes_per_s=TPU_V3_LINK_BYTES_PER_S,
    links_per_chip=TPU_V3_LINKS_PER_CHIP,
    bidirectional=True)


def phase_time(phase: PhaseCounts, links: LinkParameters) -> float:
  """alpha-beta time of one phase: ring_steps * latency + bytes_sent / bandwidth."""
  return (phase.ring_steps * links.latency_s +
          phase.bytes_sent / links.ring_bandwidth_bytes_per_s)


def allreduce_time(counts: AllReduceCounts, links: LinkParameters,
                   concurrent_halves: bool = False) -> float:
  """Seconds for the all-reduce `counts` describes, phases one after another.

  `concurrent_halves` prices a variant of the torus schedule (not what this repo
  implements): the buffer is split in two halves, one reduced x-then-y and the other
  y-then-x at the same time, so both axes' links carry traffic in every phase. Each
  phase then moves half the bytes per axis; it needs `links_per_chip >= 4`.
  """
  if not concurrent_halves:
    return sum(phase_time(p, links) for p in counts.phases)
  if counts.algorithm != "torus":
    raise CostModelError("concurrent_halves applies to the torus schedule only")
  if links.links_per_chip < 4:
    raise CostModelError(
        f"concurrent_halves needs 4 links per chip, got {links.links_per_chip}")
  x_size, y_size = counts.grid
  element_bytes = counts.element_bytes
  num_elements = counts.num_bytes // element_bytes
  half = num_elements // 2
  x_first = torus_allreduce_counts(x_size, y_size, half * element_bytes,
                                   element_bytes)
  y_first = torus_allreduce_counts(y_size, x_size,
                                   (num_elements - half) * element_bytes,
                                   element_bytes)
  return sum(max(phase_time(a, links), phase_time(b, links))
             for a, b in zip(x_first.phases, y_first.phases))


def ring_time(num_replicas: int, num_bytes: int, links: LinkParameters) -> float:
  """Seconds for a 1-D ring all-reduce of `num_bytes` over `num_replicas`."""
  return allreduce_time(ring_allreduce_counts(num_replicas, num_bytes), links)


def torus_time(x_size: int, y_size: int, num_bytes: int, links: LinkParameters,
               concurrent_halves: bool = False) -> float:
  """Seconds for the 2-D all-reduce of `num_bytes` on an x_size by y_size grid."""
  return allreduce_time(torus_allreduce_counts(x_size, y_size, num_bytes), links,
                        concurrent_halves)


def closed_form_ring_time(num_replicas: int, num_bytes: float,
                          links: LinkParameters) -> float:
  """2(p-1) alpha + 2(p-1)/p * n / B, the textbook formula (no padding)."""
  p = num_replicas
  return 2 * (p - 1) * links.latency_s + (
      2 * (p - 1) / p * num_bytes / links.ring_bandwidth_bytes_per_s)


def closed_form_torus_time(x_size: int, y_size: int, num_bytes: float,
                           links: LinkParameters) -> float:
  """(2(x-1) + 2(y-1)) alpha + (2(x-1)/x + 2(y-1)/(xy)) n / B (no padding)."""
  x, y = x_size, y_size
  steps = 2 * (x - 1) + 2 * (y - 1)
  volume = 2 * (x - 1) / x * num_bytes + 2 * (y - 1) / y * num_bytes / x
  return steps * links.latency_s + volume / links.ring_bandwidth_bytes_per_s


def square_grid_steps(num_replicas: int) -> int:
  """4(sqrt(p) - 1), the torus's latency steps on a square grid of p replicas."""
  side = math.isqrt(num_replicas)
  if side * side != num_replicas:
    raise CostModelError(f"{num_replicas} is not a square number of replicas")
  return 4 * (side - 1)


@dataclasses.dataclass(frozen=True)
class MeasuredFit:
  """The model's parameters fitted to measured aggregations (`fit_alpha_beta`).

  Attributes:
    seconds_per_call: alpha, per collective op a replica issues (on CPU the launch
      and rendezvous of an op, not a hop: the logical devices share one memory).
    seconds_per_byte: beta, per byte a replica sends (on CPU a memory copy and the
      local sum of what was received).
    seconds_per_tensor: per gradient tensor of the aggregation: its copy into a pack
      and back out, ops launched per tensor whatever the grid.
  """
  seconds_per_call: float
  seconds_per_byte: float
  seconds_per_tensor: float = 0.0

  def predict(self, counts, num_tensors: int = 0) -> float:
    """Seconds for one aggregation of `num_tensors` tensors sent as the packs
    `counts` (one AllReduceCounts per pack, in sequence)."""
    return (sum(c.collective_calls * self.seconds_per_call
                + c.bytes_sent * self.seconds_per_byte for c in counts)
            + num_tensors * self.seconds_per_tensor)


def _solve(matrix, vector):
  """x with matrix @ x = vector, by Gaussian elimination (a few unknowns)."""
  n = len(vector)
  rows = [list(matrix[i]) + [vector[i]] for i in range(n)]
  for col in range(n):
    pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
    if abs(rows[pivot][col]) < 1e-12 * max(1.0, max(abs(v) for v in rows[pivot])):
      raise CostModelError("the samples do not separate the parameters: measure "
                           "at least two payload sizes and two grids")
    rows[col], rows[pivot] = rows[pivot], rows[col]
    for r in range(n):
      if r != col:
        factor = rows[r][col] / rows[col][col]
        rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col])]
  return [rows[i][n] / rows[i][i] for i in range(n)]


def fit_alpha_beta(samples, per_tensor: bool = False) -> MeasuredFit:
  """Least-squares parameters from [(per-pack AllReduceCounts, num_tensors,
  seconds), ...].

  Each sample is one measured aggregation: the counts of every pack it sent (as
  `torus_allreduce_counts` gives them for the packs the aggregator planned), how many
  tensors it summed, and its time. `per_tensor` also fits `seconds_per_tensor`.
  Relative errors are minimised (each row divided by its time), so small and large
  payloads weigh alike.
  """
  rows = []
  for counts, num_tensors, seconds in samples:
    if seconds <= 0:
      raise CostModelError(f"measured time must be positive, got {seconds}")
    features = [sum(c.collective_calls for c in counts),
                sum(c.bytes_sent for c in counts)]
    if per_tensor:
      features.append(num_tensors)
    rows.append([f / seconds for f in features])
  unknowns = len(rows[0]) if rows else 0
  if len(rows) < unknowns or not rows:
    raise CostModelError("the samples do not separate the parameters: measure at "
                         "least two payload sizes and two grids")
  # Normal equations of min sum (features . params / t - 1)^2.
  gram = [[sum(r[i] * r[j] for r in rows) for j in range(unknowns)]
          for i in range(unknowns)]
  moments = [sum(r[i] for r in rows) for i in range(unknowns)]
  # Scale columns to 1 so the pivot test compares like with like.
  scale = [gram[i][i] ** 0.5 or 1.0 for i in range(unknowns)]
  scaled = _solve([[gram[i][j] / (scale[i] * scale[j]) for j in range(unknowns)]
                   for i in range(unknowns)],
                  [moments[i] / scale[i] for i in range(unknowns)])
  params = [p / scale[i] for i, p in enumerate(scaled)] + [0.0]
  return MeasuredFit(seconds_per_call=params[0], seconds_per_byte=params[1],
                     seconds_per_tensor=params[2])


# TPU v3 HBM bandwidth per chip: Cloud TPU system architecture page (v3: 32 GiB HBM
# per chip, 900 GB/s). The update is memory-bound, so its time is bytes / bandwidth.
TPU_V3_HBM_BYTES_PER_S = 900e9
# LARS with momentum per float32 parameter: read weight, gradient and momentum, write
# weight and momentum (the per-layer norms re-read weight and gradient once more).
LARS_BYTES_PER_PARAMETER = 7 * FLOAT32_BYTES


def sharded_update_saving_s(num_parameters: int, num_shards: int,
                            hbm_bytes_per_s: float = TPU_V3_HBM_BYTES_PER_S,
                            bytes_per_parameter: int = LARS_BYTES_PER_PARAMETER
                            ) -> float:
  """Seconds per step saved when each replica updates 1 / num_shards of the weights.

  The collectives move the same bytes either way (reduce-scatter, then an all-gather
  of weights instead of gradients), so the saving is the update itself:
  (1 - 1 / num_shards) of a memory-bound pass over the optimizer state.
  """
  if num_shards < 1:
    raise CostModelError(f"num_shards must be positive, got {num_shards}")
  full = num_parameters * bytes_per_parameter / hbm_bytes_per_s
  return full * (1.0 - 1.0 / num_shards)
