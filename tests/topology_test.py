"""Tests for allreduce.topology: the replica grid and its group assignments."""

import itertools
import random

from absl.testing import parameterized
import tensorflow as tf

from allreduce.topology import TopologyError
from allreduce.topology import TorusTopology
from allreduce.topology import most_square_grid
from allreduce.topology import parse_grid
from allreduce.topology import replica_coordinates
from allreduce.topology import yz_plane_ring

ALL_GRIDS = [(x, y) for n in (1, 2, 4, 6, 8, 12, 16, 32)
             for x in range(1, n + 1) if n % x == 0 for y in [n // x]]


def _is_partition(groups, n):
  return sorted(r for g in groups for r in g) == list(range(n))


class MostSquareGridTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((1, (1, 1)), (2, (1, 2)), (4, (2, 2)), (8, (2, 4)),
                            (12, (3, 4)), (16, (4, 4)), (7, (1, 7)), (18, (3, 6)),
                            (1024, (32, 32)), (2048, (32, 64)))
  def test_known_values(self, n, expected):
    self.assertEqual(most_square_grid(n), expected)

  def test_is_the_most_square_factorization(self):
    for n in range(1, 200):
      x, y = most_square_grid(n)
      self.assertEqual(x * y, n)
      self.assertLessEqual(x, y)
      best = min(abs(a - n // a) for a in range(1, n + 1) if n % a == 0)
      self.assertEqual(y - x, best)

  @parameterized.parameters(0, -3)
  def test_rejects_non_positive(self, n):
    with self.assertRaisesRegex(TopologyError, "positive"):
      most_square_grid(n)


class ParseGridTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(("2x4", (2, 4)), ("8x1", (8, 1)), ("1X8", (1, 8)),
                            (" 4 x 2 ", (4, 2)), ("32x64", (32, 64)))
  def test_parses(self, text, expected):
    self.assertEqual(parse_grid(text), expected)

  @parameterized.parameters("2x", "x4", "0x4", "4x0", "2x4x1", "-1x4", "2*4",
                            "two by four", "", "2.0x4")
  def test_rejects(self, text):
    with self.assertRaisesRegex(TopologyError, "XxY"):
      parse_grid(text)

  def test_error_is_a_value_error(self):
    # Config validation catches ValueError; TopologyError must be one.
    with self.assertRaises(ValueError):
      parse_grid("nope")


class TorusTopologyTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((0, 4), (4, 0), (-1, 2))
  def test_rejects_non_positive_sides(self, x, y):
    with self.assertRaisesRegex(TopologyError, "positive"):
      TorusTopology(x, y)

  @parameterized.parameters(((0, 1, 2),), ((0, 1, 2, 2),), ((1, 2, 3, 4),))
  def test_rejects_bad_device_order(self, order):
    with self.assertRaisesRegex(TopologyError, "device_order .* exactly once"):
      TorusTopology(2, 2, order)

  @parameterized.parameters(*ALL_GRIDS)
  def test_row_and_column_groups(self, x_size, y_size):
    topology = TorusTopology(x_size, y_size)
    n = x_size * y_size
    rows, columns = topology.row_groups(), topology.column_groups()
    self.assertLen(rows, y_size)
    self.assertLen(columns, x_size)
    self.assertTrue(all(len(g) == x_size for g in rows))
    self.assertTrue(all(len(g) == y_size for g in columns))
    self.assertTrue(_is_partition(rows, n))
    self.assertTrue(_is_partition(columns, n))
    # x-fastest numbering: row y is the contiguous ids y*X .. y*X + X-1.
    self.assertEqual(rows, [list(range(y * x_size, (y + 1) * x_size))
                            for y in range(y_size)])
    self.assertEqual(columns, [list(range(x, n, x_size)) for x in range(x_size)])
    # Every row meets every column in exactly one replica: the torus property the
    # three-phase sum relies on (each shard is summed over all rows exactly once).
    for row, column in itertools.product(rows, columns):
      self.assertLen(set(row) & set(column), 1)

  @parameterized.parameters(*ALL_GRIDS)
  def test_coordinates_round_trip(self, x_size, y_size):
    topology = TorusTopology(x_size, y_size)
    for replica in range(topology.num_replicas):
      x, y = topology.coordinates(replica)
      self.assertEqual(topology.replica_at(x, y), replica)
      self.assertEqual(replica, y * x_size + x)
      self.assertIn(replica, topology.row_groups()[y])
      self.assertIn(replica, topology.column_groups()[x])

  def test_shape_size_and_str(self):
    topology = TorusTopology(4, 2)
    self.assertEqual(topology.shape, (4, 2))
    self.assertEqual(topology.num_replicas, 8)
    self.assertEqual(str(topology), "4x2")
    self.assertEqual(topology.device_order, tuple(range(8)))

  def test_hashable_and_frozen(self):
    self.assertEqual(TorusTopology(2, 4), TorusTopology(2, 4))
    self.assertNotEqual(TorusTopology(2, 4), TorusTopology(4, 2))
    self.assertLen({TorusTopology(2, 4), TorusTopology(2, 4)}, 1)
    with self.assertRaises(AttributeError):
      TorusTopology(2, 4).x_size = 3  # pytype: disable=not-writable

  def test_device_order_moves_replicas(self):
    topology = TorusTopology(2, 2, (3, 1, 2, 0))
    self.assertEqual(topology.row_groups(), [[3, 1], [2, 0]])
    self.assertEqual(topology.column_groups(), [[3, 2], [1, 0]])
    self.assertEqual(topology.coordinates(0), (1, 1))
    self.assertEqual(topology.coordinates(3), (0, 0))


class ForReplicasTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((8, None, (2, 4)), (8, (8, 1), (8, 1)), (8, (1, 8), (1, 8)),
                            (8, [4, 2], (4, 2)), (1, None, (1, 1)), (6, (), (2, 3)))
  def test_shapes(self, n, shape, expected):
    self.assertEqual(TorusTopology.for_replicas(n, shape).shape, expected)

  @parameterized.parameters((8, (2, 2)), (8, (3, 3)), (4, (2, 4)), (1, (1, 2)))
  def test_mismatch_is_a_clear_error(self, n, shape):
    with self.assertRaisesRegex(TopologyError,
                                rf"holds {shape[0] * shape[1]} replicas but there "
                                rf"are {n}"):
      TorusTopology.for_replicas(n, shape)

  def test_error_suggests_a_valid_shape(self):
    with self.assertRaisesRegex(TopologyError, "e.g. 2x4"):
      TorusTopology.for_replicas(8, (3, 3))


class BlockGroupsTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(*ALL_GRIDS)
  def test_every_valid_size_tiles_the_grid(self, x_size, y_size):
    topology = TorusTopology(x_size, y_size)
    n = topology.num_replicas
    sizes = topology.valid_group_sizes()
    self.assertIn(1, sizes)
    self.assertIn(n, sizes)
    for size in sizes:
      groups = topology.block_groups(size)
      self.assertTrue(_is_partition(groups, n), (size, groups))
      self.assertTrue(all(len(g) == size for g in groups))
      for group in groups:
        points = [topology.coordinates(r) for r in group]
        xs = sorted({p[0] for p in points})
        ys = sorted({p[1] for p in points})
        # A tile: a full rectangle of contiguous grid positions.
        self.assertEqual(len(xs) * len(ys), size)
        self.assertEqual(xs, list(range(xs[0], xs[0] + len(xs))))
        self.assertEqual(ys, list(range(ys[0], ys[0] + len(ys))))

  @parameterized.parameters(*ALL_GRIDS)
  def test_invalid_sizes_raise(self, x_size, y_size):
    topology = TorusTopology(x_size, y_size)
    valid = set(topology.valid_group_sizes())
    for size in range(0, topology.num_replicas + 2):
      if size in valid:
        continue
      with self.assertRaisesRegex(TopologyError, "pick one of"):
        topology.block_groups(size)

  def test_known_groups(self):
    topology = TorusTopology(4, 2)
    self.assertEqual(topology.block_groups(2), [[0, 1], [2, 3], [4, 5], [6, 7]])
    self.assertEqual(topology.block_groups(4), [[0, 1, 2, 3], [4, 5, 6, 7]])
    self.assertEqual(topology.block_groups(8), [list(range(8))])
    self.assertEqual(topology.block_groups(1), [[r] for r in range(8)])
    self.assertEqual(TorusTopology(2, 4).block_groups(4), [[0, 1, 2, 3], [4, 5, 6, 7]])

  def test_size_that_does_not_tile(self):
    # 3 does not divide 2 and is not a multiple of it.
    with self.assertRaisesRegex(TopologyError, "does not tile"):
      TorusTopology(2, 6).block_groups(3)
    # 4 = 2 rows of 2, but 2 rows do not divide the 3 rows.
    self.assertNotIn(4, TorusTopology(2, 3).valid_group_sizes())

  def test_group_size_that_does_not_divide(self):
    with self.assertRaisesRegex(TopologyError, "must divide the replica count 8"):
      TorusTopology(2, 4).block_groups(3)


class PhysicalCoordinatesTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((2, 2), (4, 2), (2, 4), (8, 1), (4, 4))
  def test_grid_follows_coordinates(self, x_size, y_size):
    points = [(x, y) for y in range(y_size) for x in range(x_size)]
    random.Random(x_size * 10 + y_size).shuffle(points)
    coordinates = [(x, y, 0) for x, y in points]  # replica r sits at points[r]
    topology = TorusTopology.from_physical_coordinates(coordinates)
    self.assertEqual(topology.shape, (x_size, y_size))
    for replica, point in enumerate(points):
      self.assertEqual(topology.coordinates(replica), point)
    # Rows are physical rows: same y, x increasing.
    for y, row in enumerate(topology.row_groups()):
      self.assertEqual([points[r] for r in row], [(x, y) for x in range(x_size)])
    for x, column in enumerate(topology.column_groups()):
      self.assertEqual([points[r] for r in column], [(x, y) for y in range(y_size)])

  def test_offset_coordinates_are_normalised(self):
    topology = TorusTopology.from_physical_coordinates([(4, 10), (6, 10), (4, 12),
                                                        (6, 12)])
    self.assertEqual(topology.shape, (2, 2))
    self.assertEqual(topology.row_groups(), [[0, 1], [2, 3]])

  def test_rejects_holes(self):
    with self.assertRaisesRegex(TopologyError, "full grid"):
      TorusTopology.from_physical_coordinates([(0, 0), (1, 0), (0, 1)])

  def test_rejects_duplicates(self):
    with self.assertRaisesRegex(TopologyError, "repeat a place"):
      TorusTopology.from_physical_coordinates([(0, 0), (1, 0), (0, 1), (0, 1)])

  def test_z_folds_into_the_columns(self):
    topology = TorusTopology.from_physical_coordinates([(0, 0, 0), (0, 0, 1)])
    self.assertEqual(topology.shape, (1, 2))

  def test_rejects_bad_coordinates(self):
    with self.assertRaisesRegex(TopologyError, r"\(x, y, z, core\)"):
      TorusTopology.from_physical_coordinates([(0,), (1,)])
    with self.assertRaisesRegex(TopologyError, "repeat"):
      TorusTopology.from_physical_coordinates([(0, 0, 0, 1), (0, 0, 0, 1)])

  def test_shape_must_follow_the_chips(self):
    coordinates = [(x, y, 0, c) for y in range(2) for x in range(2) for c in range(2)]
    self.assertEqual(TorusTopology.from_physical_coordinates(coordinates).shape,
                     (4, 2))
    transposed = TorusTopology.from_physical_coordinates(coordinates, shape=(2, 4))
    self.assertEqual(transposed.shape, (2, 4))
    self.assertEqual(transposed.row_groups(),
                     TorusTopology.from_physical_coordinates(
                         coordinates).column_groups())
    with self.assertRaisesRegex(TopologyError, "use 4x2 or 2x4"):
      TorusTopology.from_physical_coordinates(coordinates, shape=(8, 1))


# ---------------------------------------------------------------------------
# TPU slices as TensorFlow reports them.
#
# `tf.tpu.experimental.Topology.device_coordinates[task][device]` is each TPU
# device's (x, y, z, core). The arrays below follow the layout TPU VMs report: a
# host holds a 2x2 block of chips (x fastest, then y; on v2/v3 the chip's two cores
# next to each other, core fastest), and hosts tile the slice block by block, x
# first, then y, then z. The replica -> core mapping is TF's own:
# `DeviceAssignment.build(topology, num_replicas=...)`, what training/strategy.py
# passes to TPUStrategy.
# ---------------------------------------------------------------------------


def tpu_slice(chips, cores_per_chip):
  """A `Topology` for a slice of `chips` = (x, y, z) chips, 2x2 chips per host."""
  x_chips, y_chips, z_chips = chips
  hosts = []
  for hz in range(z_chips):
    for hy in range(0, y_chips, 2):
      for hx in range(0, x_chips, 2):
        hosts.append([[hx + x, hy + y, hz, core]
                      for y in range(min(2, y_chips)) for x in range(min(2, x_chips))
                      for core in range(cores_per_chip)])
  return tf.tpu.experimental.Topology(
      mesh_shape=[x_chips, y_chips, z_chips, cores_per_chip],
      device_coordinates=hosts)


def tf_replica_devices(topology):
  """(task, device) of each replica under TF's default one-core-per-replica assignment."""
  num_replicas = topology.num_tasks * topology.num_tpus_per_task
  assignment = tf.tpu.experimental.DeviceAssignment.build(
      topology, num_replicas=num_replicas)
  devices = []
  for replica in range(num_replicas):
    core = assignment.coordinates(replica, 0)
    devices.append((int(topology.task_ordinal_at_coordinates(core)),
                    int(topology.tpu_device_ordinal_at_coordinates(core))))
  return devices


def chip_hops(a, b, chips, wraps):
  """ICI hops between the chips of cores a and b (0 on one chip)."""
  hops = 0
  for axis in range(3):
    d = abs(a[axis] - b[axis])
    if wraps[axis]:
      d = min(d, chips[axis] - d)
    hops += d
  return hops


SLICES = [
    # name, chips (x, y, z), cores per replica-chip, wraparound per axis
    ("v3_8", (2, 2, 1), 2, (False, False, False)),
    ("v3_32", (4, 4, 1), 2, (False, False, False)),
    # The paper's pod: 1024 chips, 2048 cores (v3-2048), a full 2-D torus.
    ("v3_2048", (32, 32, 1), 2, (True, True, False)),
    # v4: one replica per chip (megacore); 3-D.
    ("v4_32", (2, 2, 4), 1, (False, False, False)),
    ("v4_128", (4, 4, 4), 1, (True, True, True)),
]


class TpuSliceTopologyTest(tf.test.TestCase, parameterized.TestCase):

  def _grid(self, chips, cores):
    topology = tpu_slice(chips, cores)
    coordinates = replica_coordinates(topology.device_coordinates,
                                      tf_replica_devices(topology))
    return coordinates, TorusTopology.from_physical_coordinates(coordinates)

  def assertRing(self, members, coordinates, chips, wraps, closes):
    """Consecutive members one hop apart (or on one chip); the last back to the
    first too when `closes`."""
    places = [coordinates[r] for r in members]
    for a, b in zip(places, places[1:]):
      self.assertLessEqual(chip_hops(a, b, chips, wraps), 1, (a, b, places))
    if closes and len(places) > 2:
      self.assertLessEqual(chip_hops(places[-1], places[0], chips, wraps), 1,
                           places)

  def assertConnected(self, members, coordinates, chips, wraps):
    places = [coordinates[r] for r in members]
    reached, frontier = {0}, [0]
    while frontier:
      i = frontier.pop()
      for j in range(len(places)):
        if j not in reached and chip_hops(places[i], places[j], chips, wraps) <= 1:
          reached.add(j)
          frontier.append(j)
    self.assertLen(reached, len(places), places)

  @parameterized.named_parameters(*SLICES)
  def test_rows_and_columns_are_physical_rings(self, chips, cores, wraps):
    coordinates, grid = self._grid(chips, cores)
    self.assertEqual(grid.shape, (chips[0] * cores, chips[1] * chips[2]))
    for row in grid.row_groups():
      self.assertRing(row, coordinates, chips, wraps, closes=wraps[0])
      # One y-z place per row: the row runs along x only.
      self.assertLen({coordinates[r][1:3] for r in row}, 1)
    plane_closes = (chips[1] > 1 and chips[2] > 1) or wraps[1] or wraps[2]
    for column in grid.column_groups():
      self.assertRing(column, coordinates, chips, wraps, closes=plane_closes)
      self.assertLen({coordinates[r][0] for r in column}, 1)
      self.assertLen({coordinates[r][3] for r in column}, 1)

  @parameterized.named_parameters(*SLICES)
  def test_batch_norm_groups_are_neighbours(self, chips, cores, wraps):
    coordinates, grid = self._grid(chips, cores)
    for size in [s for s in grid.valid_group_sizes() if s <= 64]:
      for group in grid.block_groups(size):
        self.assertConnected(group, coordinates, chips, wraps)
    if cores == 2:
      # Groups of two are the two cores of one chip.
      for group in grid.block_groups(2):
        self.assertEqual(coordinates[group[0]][:3], coordinates[group[1]][:3])

  def test_v4_32_folds_z_into_a_closed_column_ring(self):
    coordinates, grid = self._grid((2, 2, 4), 1)
    self.assertEqual(grid.shape, (2, 8))
    column = [coordinates[r][1:3] for r in grid.column_groups()[0]]
    self.assertEqual(sorted(column), [(y, z) for y in range(2) for z in range(4)])
    self.assertEqual(column[0], (0, 0))
    self.assertEqual(chip_hops((0,) + column[-1], (0,) + column[0],
                               (2, 2, 4), (False,) * 3), 1)

  def test_tf_default_assignment_is_not_in_grid_order(self):
    # Why the grid must come from coordinates: on v4 TF's default assignment walks
    # a 3-D ring, so consecutive replica ids are not the grid's rows.
    coordinates, grid = self._grid((2, 2, 4), 1)
    self.assertNotEqual(list(grid.device_order), list(range(16)))

  def test_replica_coordinates_reads_the_device_table(self):
    table = [[[0, 0, 0, 0], [0, 0, 0, 1]], [[1, 0, 0, 0], [1, 0, 0, 1]]]
    self.assertEqual(replica_coordinates(table, [(1, 1), (0, 0)]),
                     [(1, 0, 0, 1), (0, 0, 0, 0)])


class YzPlaneRingTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((1, 1), (1, 4), (4, 1), (2, 2), (2, 4), (4, 2), (4, 4),
                            (3, 4), (4, 3), (8, 16), (3, 3))
  def test_visits_every_place_one_hop_at_a_time(self, y_size, z_size):
    ring = yz_plane_ring(y_size, z_size)
    self.assertEqual(sorted(ring), [(y, z) for y in range(y_size)
                                    for z in range(z_size)])
    for (y0, z0), (y1, z1) in zip(ring, ring[1:]):
      self.assertEqual(abs(y0 - y1) + abs(z0 - z1), 1)
    closed = y_size > 1 and z_size > 1 and (y_size % 2 == 0 or z_size % 2 == 0)
    (y0, z0), (y1, z1) = ring[-1], ring[0]
    self.assertEqual(abs(y0 - y1) + abs(z0 - z1) == 1, closed or len(ring) == 2)


if __name__ == "__main__":
  tf.test.main()
