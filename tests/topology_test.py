"""Tests for allreduce.topology: the replica grid and its group assignments."""

import itertools
import random

from absl.testing import parameterized
import tensorflow as tf

from allreduce.topology import TopologyError
from allreduce.topology import TorusTopology
from allreduce.topology import most_square_grid
from allreduce.topology import parse_grid

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
    with self.assertRaisesRegex(TopologyError, "permutation"):
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
    with self.assertRaisesRegex(TopologyError, "full grid"):
      TorusTopology.from_physical_coordinates([(0, 0), (1, 0), (0, 1), (0, 1)])

  def test_rejects_3d_layouts(self):
    with self.assertRaisesRegex(TopologyError, "z = 0"):
      TorusTopology.from_physical_coordinates([(0, 0, 0), (0, 0, 1)])


if __name__ == "__main__":
  tf.test.main()
