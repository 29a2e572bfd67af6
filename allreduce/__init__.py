"""The 2-D torus all-reduce: replica grid, collective back ends, gradient aggregator."""

from allreduce.collectives import CollectiveBackend
from allreduce.collectives import CollectiveOpsBackend
from allreduce.collectives import TpuBackend
from allreduce.collectives import backend_for_strategy
from allreduce.topology import GroupAssignment
from allreduce.topology import TopologyError
from allreduce.topology import TorusTopology
from allreduce.topology import check_group_assignment
from allreduce.topology import most_square_grid
from allreduce.topology import parse_grid
from allreduce.topology import replica_coordinates
from allreduce.torus_aggregator import DEFAULT_PACK_SIZE_BYTES
from allreduce.torus_aggregator import TorusGradientAggregator
from allreduce.torus_aggregator import make_packed_strategy_aggregator
from allreduce.torus_aggregator import make_torus_aggregator
