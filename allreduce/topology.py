"""The replica grid: which replica sits where on the 2-D torus, and which form a group.

This is the one place that knows the layout. Batch-norm groups and the gradient
aggregator both ask it for *group assignments*: lists of replica-id lists that partition
all replicas, the form `cross_replica_sum(group_assignment=...)` takes on TPU and that the
CPU/GPU collectives turn into one group key per group. Everything here is plain Python,
so the same lists are printed, tested here and used on every back end.

Convention: a grid `(x_size, y_size)` numbers replicas x-fastest,
`replica_id = y * x_size + x`. Replicas that differ only in x form a *row* (the x ring),
replicas that differ only in y form a *column* (the y ring).
"""

import dataclasses
import math
from typing import List, Sequence, Tuple

GroupAssignment = List[List[int]]


class TopologyError(ValueError):
  """A grid or group that does not fit the replicas."""


def most_square_grid(num_replicas: int) -> Tuple[int, int]:
  """The `(x, y)` factorization of `num_replicas` closest to square, with x <= y.

  Square grids minimise the latency steps of the 2-D all-reduce, 2(x-1) + 2(y-1).
  """
  if num_replicas < 1:
    raise TopologyError(f"num_replicas must be positive, got {num_replicas}")
  x = int(math.isqrt(num_replicas))
  while num_replicas % x:
    x -= 1
  return x, num_replicas // x


def parse_grid(text: str) -> Tuple[int, int]:
  """Parses "2x4" into (2, 4)."""
  parts = text.lower().replace(" ", "").split("x")
  if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise TopologyError(
        f"a grid is written XxY with positive integers, e.g. 2x4; got {text!r}")
  return int(parts[0]), int(parts[1])


@dataclasses.dataclass(frozen=True)
class TorusTopology:
  """An `x_size` by `y_size` grid of replicas.

  `device_order`, when given, lists for each grid position (in x-fastest order) the
  replica id that sits there; on TPU it comes from the chips' physical coordinates so
  that grid neighbours are neighbours on the interconnect. By default position i holds
  replica i.
  """
  x_size: int
  y_size: int
  device_order: Tuple[int, ...] = ()

  def __post_init__(self):
    if self.x_size < 1 or self.y_size < 1:
      raise TopologyError(
          f"grid sides must be positive, got {self.x_size}x{self.y_size}")
    if self.device_order:
      if sorted(self.device_order) != list(range(self.num_replicas)):
        raise TopologyError(
            f"device_order must be a permutation of 0..{self.num_replicas - 1}, "
            f"got {list(self.device_order)}")
    else:
      object.__setattr__(self, "device_order", tuple(range(self.num_replicas)))

  @classmethod
  def for_replicas(cls, num_replicas: int, shape: Sequence[int] = None):
    """The grid `shape` (or the most square one) checked against the replica count."""
    x_size, y_size = shape if shape else most_square_grid(num_replicas)
    if x_size * y_size != num_replicas:
      raise TopologyError(
          f"torus shape {x_size}x{y_size} holds {x_size * y_size} replicas but there "
          f"are {num_replicas}; use a shape whose product is {num_replicas}, e.g. "
          "{}x{}".format(*most_square_grid(num_replicas)))
    return cls(x_size, y_size)

  @classmethod
  def from_physical_coordinates(cls, coordinates: Sequence[Sequence[int]]):
    """A grid that follows physical chip coordinates.

    `coordinates[r]` is replica r's `(x, y)` (or `(x, y, z, ...)` with the rest zero)
    position on the interconnect, as a TPU device assignment reports it. The grid's
    sides are the ranges of x and y, and grid position (x, y) holds the replica found
    there, so rows and columns are physical rings.
    """
    points = [tuple(int(v) for v in c[:2]) for c in coordinates]
    if any(any(int(v) for v in c[2:]) for c in coordinates):
      raise TopologyError("only flat (z = 0) physical layouts map onto a 2-D grid")
    xs = sorted({p[0] for p in points})
    ys = sorted({p[1] for p in points})
    if len(xs) * len(ys) != len(points) or len(set(points)) != len(points):
      raise TopologyError(
          f"physical coordinates do not form a full grid: {points}")
    x_index = {x: i for i, x in enumerate(xs)}
    y_index = {y: i for i, y in enumerate(ys)}
    order = [0] * len(points)
    for replica, (x, y) in enumerate(points):
      order[y_index[y] * len(xs) + x_index[x]] = replica
    return cls(len(xs), len(ys), tuple(order))

  @property
  def shape(self) -> Tuple[int, int]:
    return self.x_size, self.y_size

  @property
  def num_replicas(self) -> int:
    return self.x_size * self.y_size

  def replica_at(self, x: int, y: int) -> int:
    return self.device_order[y * self.x_size + x]

  def coordinates(self, replica_id: int) -> Tuple[int, int]:
    position = self.device_order.index(replica_id)
    return position % self.x_size, position // self.x_size

  def row_groups(self) -> GroupAssignment:
    """Groups along x (one per y): the reduce-scatter / all-gather rings."""
    return [[self.replica_at(x, y) for x in range(self.x_size)]
            for y in range(self.y_size)]

  def column_groups(self) -> GroupAssignment:
    """Groups along y (one per x): the ring that all-reduces each shard."""
    return [[self.replica_at(x, y) for y in range(self.y_size)]
            for x in range(self.x_size)]

  def block_groups(self, group_size: int) -> GroupAssignment:
    """Groups of `group_size` neighbouring replicas, for batch-norm statistics.

    A group is a tile of the grid: `group_size` consecutive replicas along x when it
    divides `x_size` (one hop apart), else whole rows stacked along y (a block of
    `group_size // x_size` rows). Contiguous tiles keep the extra all-reduce on
    nearest-neighbour links, which is why the paper groups neighbours; group_size 1 is
    per-replica batch norm and group_size = num_replicas is full sync batch norm.
    """
    tile = self._tile(group_size)
    tile_x, tile_y = tile
    groups = []
    for y0 in range(0, self.y_size, tile_y):
      for x0 in range(0, self.x_size, tile_x):
        groups.append([self.replica_at(x, y)
                       for y in range(y0, y0 + tile_y)
                       for x in range(x0, x0 + tile_x)])
    return groups

  def _tile(self, group_size: int) -> Tuple[int, int]:
    if group_size < 1 or self.num_replicas % group_size:
      raise TopologyError(
          f"batch-norm group size {group_size} must divide the replica count "
          f"{self.num_replicas}; pick one of {self.valid_group_sizes()}")
    if self.x_size % group_size == 0:
      return group_size, 1
    if group_size % self.x_size == 0 and self.y_size % (group_size // self.x_size) == 0:
      return self.x_size, group_size // self.x_size
    raise TopologyError(
        f"batch-norm group size {group_size} does not tile the {self.x_size}x"
        f"{self.y_size} torus (it must divide {self.x_size} or be a multiple of it "
        f"that divides {self.num_replicas}); pick one of {self.valid_group_sizes()}")

  def valid_group_sizes(self) -> List[int]:
    sizes = []
    for size in range(1, self.num_replicas + 1):
      if self.num_replicas % size:
        continue
      if self.x_size % size == 0 or (
          size % self.x_size == 0 and self.y_size % (size // self.x_size) == 0):
        sizes.append(size)
    return sizes

  def __str__(self):
    return f"{self.x_size}x{self.y_size}"
