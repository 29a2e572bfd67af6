"""Tests for allreduce/cost_model.py: hand-computed counts, degenerate grids, times."""

import dataclasses

from absl.testing import parameterized
import tensorflow as tf

from tests import logical_devices

logical_devices.configure_logical_cpus()

from allreduce import cost_model  # pylint: disable=g-import-not-at-top
from allreduce import topology  # pylint: disable=g-import-not-at-top

N = 1024  # bytes: 256 float32 values, divisible by every grid side below but 32x32


def _phase_tuple(phase):
  return (phase.collective_calls, phase.ring_steps, phase.payload_bytes,
          phase.bytes_sent)


class TorusCountsTest(tf.test.TestCase, parameterized.TestCase):

  # Each phase as (calls, ring steps, payload bytes, bytes sent), worked out by hand
  # for n = 1024 bytes = 256 values, on the default "collective_ops" back end:
  #   reduce-scatter along x: shard s = 256 / x values; (x-1) steps, sends (x-1)*s,
  #     in 2(x-1) calls (a broadcast of one shard to and from each of x-1 peers).
  #   all-reduce along y of the shard: 2(y-1) steps of s / y values.
  #   all-gather along x: (x-1) steps, payload s, sends (x-1)*s, in x calls (a
  #     broadcast over the row from each member: one send, x-1 receives).
  @parameterized.named_parameters(
      ("1x8", 1, 8, (0, 0, 0, 0), (1, 14, 1024, 14 * 128), (0, 0, 0, 0)),
      ("2x4", 2, 4, (2, 1, 1024, 512), (1, 6, 512, 6 * 128), (2, 1, 512, 512)),
      ("4x2", 4, 2, (6, 3, 1024, 768), (1, 2, 256, 2 * 128), (4, 3, 256, 768)),
      ("8x1", 8, 1, (14, 7, 1024, 896), (0, 0, 0, 0), (8, 7, 128, 896)),
  )
  def test_small_grids(self, x_size, y_size, scatter, reduce_y, gather):
    counts = cost_model.torus_allreduce_counts(x_size, y_size, N)
    self.assertEqual(_phase_tuple(counts.phase("reduce_scatter_x")), scatter)
    self.assertEqual(_phase_tuple(counts.phase("all_reduce_y")), reduce_y)
    self.assertEqual(_phase_tuple(counts.phase("all_gather_x")), gather)
    self.assertEqual(counts.ring_steps, 2 * (x_size - 1) + 2 * (y_size - 1))

  @parameterized.parameters((1, 8), (2, 4), (4, 2), (8, 1))
  def test_same_bytes_as_a_ring_when_sides_divide_the_payload(self, x_size, y_size):
    # 2(p-1)/p * n for p = 8: 1792 bytes, whatever the grid.
    torus = cost_model.torus_allreduce_counts(x_size, y_size, N)
    ring = cost_model.ring_allreduce_counts(8, N)
    self.assertEqual(torus.bytes_sent, ring.bytes_sent)
    self.assertEqual(ring.bytes_sent, 1792)

  def test_paper_pod_32x32(self):
    n = cost_model.RESNET50_GRADIENT_BYTES
    counts = cost_model.torus_allreduce_counts(32, 32, n)
    self.assertEqual(counts.ring_steps, 124)  # 4 (sqrt(1024) - 1)
    self.assertEqual(counts.ring_steps, cost_model.square_grid_steps(1024))
    # 62 pair broadcasts (a send to and a receive from each of 31 peers), one
    # all-reduce, 32 broadcasts over the row (one from each member).
    self.assertEqual(counts.collective_calls, 95)
    self.assertEqual(
        cost_model.torus_allreduce_counts(32, 32, n, backend="nccl").collective_calls,
        3)
    # 25,557,032 values are not a multiple of 32: shards are padded to 798,658.
    shard = 798_658
    self.assertEqual(counts.phase("reduce_scatter_x").payload_bytes, 32 * shard * 4)
    self.assertEqual(counts.phase("reduce_scatter_x").bytes_sent, 31 * shard * 4)
    self.assertEqual(counts.phase("all_reduce_y").payload_bytes, shard * 4)
    # The shard again split 32 ways (padded): ceil(798658 / 32) = 24,959 values.
    self.assertEqual(counts.phase("all_reduce_y").bytes_sent, 62 * 24_959 * 4)
    self.assertEqual(counts.phase("all_gather_x").bytes_sent, 31 * shard * 4)
    ring = cost_model.ring_allreduce_counts(1024, n)
    self.assertEqual(ring.ring_steps, 2046)
    # Padding aside, the bytes match the ring's to within 0.1%.
    self.assertAllClose(counts.bytes_sent, ring.bytes_sent, rtol=1e-3)

  def test_degenerate_grids(self):
    single = cost_model.torus_allreduce_counts(1, 1, N)
    self.assertEqual((single.collective_calls, single.ring_steps,
                      single.bytes_sent), (0, 0, 0))
    ring_of_one = cost_model.ring_allreduce_counts(1, N)
    self.assertEqual((ring_of_one.collective_calls, ring_of_one.ring_steps,
                      ring_of_one.bytes_sent), (0, 0, 0))
    empty = cost_model.torus_allreduce_counts(4, 2, 0)
    self.assertEqual(empty.bytes_sent, 0)
    self.assertEqual(empty.ring_steps, 8)  # latency is paid even for no data
    # A 1 x p or p x 1 grid is the ring: same steps and bytes.
    for grid in ((1, 8), (8, 1)):
      torus = cost_model.torus_allreduce_counts(*grid, N)
      ring = cost_model.ring_allreduce_counts(8, N)
      self.assertEqual((torus.ring_steps, torus.bytes_sent),
                       (ring.ring_steps, ring.bytes_sent))

  def test_group_counts_follow_the_topology(self):
    grid = topology.TorusTopology(4, 2)
    counts = cost_model.torus_allreduce_counts(4, 2, N)
    self.assertLen(grid.row_groups(), counts.phase("reduce_scatter_x").num_groups)
    self.assertLen(grid.row_groups()[0],
                   counts.phase("reduce_scatter_x").group_size)
    self.assertLen(grid.column_groups(), counts.phase("all_reduce_y").num_groups)
    self.assertLen(grid.column_groups()[0], counts.phase("all_reduce_y").group_size)

  def test_as_dict_is_plain(self):
    as_dict = cost_model.torus_allreduce_counts(2, 4, N).as_dict()
    self.assertEqual(as_dict["collective_calls"], 5)  # 2 + 1 + 2
    self.assertEqual(as_dict["ring_steps"], 8)
    self.assertEqual(as_dict["bytes_sent"], 1792)
    self.assertEqual([p["collective"] for p in as_dict["phases"]],
                     ["pair_broadcasts", "all_reduce", "all_gather"])

  @parameterized.parameters((2, 4), (4, 2), (8, 1), (1, 8), (32, 32))
  def test_back_ends_issue_other_ops_for_the_same_bytes(self, x_size, y_size):
    cpu = cost_model.torus_allreduce_counts(x_size, y_size, 32 * N)
    nccl = cost_model.torus_allreduce_counts(x_size, y_size, 32 * N, backend="nccl")
    tpu = cost_model.torus_allreduce_counts(x_size, y_size, 32 * N, backend="tpu")
    for c, g, t in zip(cpu.phases, nccl.phases, tpu.phases):
      self.assertEqual((c.ring_steps, c.payload_bytes, c.bytes_sent),
                       (t.ring_steps, t.payload_bytes, t.bytes_sent))
      self.assertEqual((c.ring_steps, c.payload_bytes, c.bytes_sent),
                       (g.ring_steps, g.payload_bytes, g.bytes_sent))
    self.assertEqual(tpu.phase("reduce_scatter_x").collective, "reduce_scatter")
    self.assertEqual(nccl.phase("reduce_scatter_x").collective, "all_to_all")
    self.assertEqual(cpu.phase("reduce_scatter_x").collective, "pair_broadcasts")
    # The reduce-scatter: a send and a receive per peer off NCCL, one op otherwise.
    scatter_calls = 1 if x_size > 1 else 0
    self.assertEqual(cpu.phase("reduce_scatter_x").collective_calls, 2 * (x_size - 1))
    self.assertEqual(nccl.phase("reduce_scatter_x").collective_calls, scatter_calls)
    self.assertEqual(tpu.phase("reduce_scatter_x").collective_calls, scatter_calls)
    self.assertEqual(nccl.phase("all_gather_x").collective_calls, scatter_calls)
    # The TPU all-gather: x - 1 permute steps each way round the row.
    self.assertEqual(tpu.phase("all_gather_x").collective_calls, 2 * (x_size - 1))
    # Off NCCL: a broadcast over the row from each member.
    self.assertEqual(cpu.phase("all_gather_x").collective_calls,
                     x_size if x_size > 1 else 0)

  def test_unknown_backend(self):
    with self.assertRaisesRegex(cost_model.CostModelError, "backend"):
      cost_model.torus_allreduce_counts(2, 4, N, backend="gpu")

  @parameterized.parameters(
      dict(x_size=0, y_size=4, num_bytes=N),
      dict(x_size=2, y_size=-1, num_bytes=N),
      dict(x_size=2, y_size=4, num_bytes=1023),  # not whole float32 values
      dict(x_size=2, y_size=4, num_bytes=-4),
  )
  def test_bad_input(self, x_size, y_size, num_bytes):
    with self.assertRaises(cost_model.CostModelError):
      cost_model.torus_allreduce_counts(x_size, y_size, num_bytes)

  def test_bad_ring_and_links(self):
    with self.assertRaises(cost_model.CostModelError):
      cost_model.ring_allreduce_counts(0, N)
    with self.assertRaises(cost_model.CostModelError):
      cost_model.LinkParameters(latency_s=1e-6, bandwidth_bytes_per_s=0)
    with self.assertRaises(cost_model.CostModelError):
      cost_model.LinkParameters(1e-6, 1e9, links_per_chip=1)


class TimeTest(tf.test.TestCase, parameterized.TestCase):

  def test_formula_by_hand(self):
    links = cost_model.LinkParameters(latency_s=1e-6, bandwidth_bytes_per_s=1e9,
                                      links_per_chip=4, bidirectional=False)
    # 2x4 on 1024 bytes: 8 steps, 1792 bytes on one link at 1e9 B/s.
    expected = 8 * 1e-6 + 1792 / 1e9
    self.assertAllClose(cost_model.torus_time(2, 4, N, links), expected)
    bidirectional = dataclasses.replace(links, bidirectional=True)
    self.assertAllClose(cost_model.torus_time(2, 4, N, bidirectional),
                        8 * 1e-6 + 1792 / 2e9)
    self.assertAllClose(cost_model.ring_time(8, N, links), 14 * 1e-6 + 1792 / 1e9)

  @parameterized.parameters((8, 2, 4), (64, 8, 8), (1024, 32, 32))
  def test_matches_closed_form(self, p, x_size, y_size):
    links = cost_model.TPU_V3_LINKS
    n = 4 * p * p * 16  # divisible by every side: no padding
    self.assertAllClose(cost_model.ring_time(p, n, links),
                        cost_model.closed_form_ring_time(p, n, links))
    self.assertAllClose(cost_model.torus_time(x_size, y_size, n, links),
                        cost_model.closed_form_torus_time(x_size, y_size, n, links))

  def test_monotone_in_replicas_and_bytes(self):
    links = cost_model.TPU_V3_LINKS
    n = cost_model.RESNET50_GRADIENT_BYTES
    sizes = [8, 16, 32, 64, 128, 256, 512, 1024]
    ring = [cost_model.ring_time(p, n, links) for p in sizes]
    torus = [cost_model.torus_time(*topology.most_square_grid(p), n, links)
             for p in sizes]
    self.assertEqual(ring, sorted(ring))
    self.assertEqual(torus, sorted(torus))
    ratios = [t / r for t, r in zip(torus, ring)]
    self.assertEqual(ratios, sorted(ratios, reverse=True))  # torus gains with scale
    self.assertLess(ratios[-1], 0.5)
    small, large = (cost_model.torus_time(32, 32, b, links) for b in (N, n))
    self.assertLess(small, large)
    slow = dataclasses.replace(links, latency_s=links.latency_s * 10)
    self.assertLess(cost_model.torus_time(32, 32, n, links),
                    cost_model.torus_time(32, 32, n, slow))

  def test_latency_dominates_small_payloads(self):
    links = cost_model.TPU_V3_LINKS
    ratio = (cost_model.torus_time(32, 32, N, links) /
             cost_model.ring_time(1024, N, links))
    self.assertAllClose(ratio, 124 / 2046, rtol=0.01)

  def test_concurrent_halves_use_both_axes(self):
    links = cost_model.TPU_V3_LINKS
    n = cost_model.RESNET50_GRADIENT_BYTES
    sequential = cost_model.torus_time(32, 32, n, links)
    concurrent = cost_model.torus_time(32, 32, n, links, concurrent_halves=True)
    self.assertLess(concurrent, sequential)
    # Bandwidth term halves, latency stays: between half and all of the time.
    self.assertGreater(concurrent, sequential / 2)
    with self.assertRaises(cost_model.CostModelError):
      cost_model.torus_time(32, 32, n, dataclasses.replace(links, links_per_chip=2),
                            concurrent_halves=True)

  def test_tpu_v3_parameters(self):
    # 340 TB/s per 1024-chip pod over 4 links per chip: about 83 GB/s per link.
    self.assertAllClose(cost_model.TPU_V3_LINK_BYTES_PER_S, 83.0e9, rtol=0.01)
    self.assertEqual(cost_model.RESNET50_GRADIENT_BYTES, 102_228_128)


class MeasuredFitTest(tf.test.TestCase):
  """Fitting the model's parameters to measured times, and the sharded saving."""

  def _samples(self, params, grids_and_sizes, num_tensors=0):
    samples = []
    for (x, y), sizes in grids_and_sizes:
      counts = [cost_model.torus_allreduce_counts(x, y, n) for n in sizes]
      samples.append((counts, num_tensors, cost_model.MeasuredFit(*params).predict(
          counts, num_tensors)))
    return samples

  def test_recovers_the_parameters_and_predicts_a_held_out_grid(self):
    params = (2e-4, 3e-10, 1e-5)
    samples = self._samples(params, [((1, 8), [1 << 22] * 3), ((2, 4), [1 << 16]),
                                     ((8, 1), [1 << 24, 1 << 20])], num_tensors=161)
    samples += self._samples(params, [((1, 8), [1 << 12])], num_tensors=10)
    fit = cost_model.fit_alpha_beta(samples, per_tensor=True)
    self.assertAllClose([fit.seconds_per_call, fit.seconds_per_byte,
                         fit.seconds_per_tensor], params, rtol=1e-6)
    held_out = [cost_model.torus_allreduce_counts(4, 2, 1 << 23)] * 2
    want = (2 * (held_out[0].collective_calls * 2e-4 + held_out[0].bytes_sent * 3e-10)
            + 161 * 1e-5)
    self.assertAllClose(fit.predict(held_out, 161), want, rtol=1e-6)

  def test_without_a_per_tensor_term(self):
    samples = self._samples((1e-4, 1e-9, 0.0), [((2, 4), [1 << 10]),
                                                ((1, 8), [1 << 22])])
    fit = cost_model.fit_alpha_beta(samples)
    self.assertAllClose([fit.seconds_per_call, fit.seconds_per_byte], [1e-4, 1e-9],
                        rtol=1e-6)
    self.assertEqual(fit.seconds_per_tensor, 0.0)

  def test_minimises_relative_error(self):
    # Two exact small samples and one large one 10% slow: the fit stays near the
    # small ones' parameters instead of being pulled by the large one's seconds.
    params = (1e-4, 1e-9, 0.0)
    samples = self._samples(params, [((2, 4), [1 << 10]), ((1, 8), [1 << 12])])
    (big_counts, _, big_seconds), = self._samples(params, [((2, 4), [1 << 26])])
    fit = cost_model.fit_alpha_beta(samples + [(big_counts, 0, big_seconds * 1.1)])
    self.assertBetween(fit.predict(big_counts) / big_seconds, 1.0, 1.1)

  def test_samples_that_cannot_separate_the_parameters(self):
    samples = self._samples((1e-4, 1e-9, 0.0), [((2, 4), [1 << 20])])
    with self.assertRaisesRegex(cost_model.CostModelError, "two payload sizes"):
      cost_model.fit_alpha_beta(samples)
    with self.assertRaisesRegex(cost_model.CostModelError, "two payload sizes"):
      cost_model.fit_alpha_beta(samples * 3)  # the same sample thrice
    with self.assertRaisesRegex(cost_model.CostModelError, "positive"):
      cost_model.fit_alpha_beta([(samples[0][0], 0, 0.0)])

  def test_sharded_update_saving(self):
    # ResNet-50's LARS state, 28 bytes per parameter at 900 GB/s: 0.795 ms a step,
    # of which 31/32 is saved by 32 shards; nothing with one shard.
    full = cost_model.RESNET50_NUM_PARAMETERS * 28 / 900e9
    self.assertAllClose(
        cost_model.sharded_update_saving_s(cost_model.RESNET50_NUM_PARAMETERS, 32),
        full * 31 / 32)
    self.assertEqual(cost_model.sharded_update_saving_s(1000, 1), 0.0)
    with self.assertRaises(cost_model.CostModelError):
      cost_model.sharded_update_saving_s(1000, 0)


if __name__ == "__main__":
  tf.test.main()
