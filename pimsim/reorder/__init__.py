"""Channel reordering: which channel orders a traced network allows, how an order is applied, how
it is scored, and the evolutionary search of the paper. The flow, one module each:

``groups``   graph analysis: permutation groups (``find_groups``, ``describe_groups``) and the
             segments searched together (``find_segments``);
``permute``  applying orders: joint orders on the float network (``Reorderer``), independent
             per-layer orders with runtime gathers (``independent_network``, ``ChannelGather``),
             ``check_order`` / ``column_index``;
``score``    scoring an order without the samples: Gram statistics permuted by the order and
             Algorithm 1 on them (``LayerScorer``, ``SegmentScorer``, ``ptqsl_weight_error``);
``cluster``  orders from the weights' tile magnitudes, a swap descent on a max-scale proxy
             (``cluster_segment``);
``search``   the per-segment search loop (``search_segments``) with the evolutionary search
             (``evolve``) or ``cluster``, interleaved with a segment-wise calibration pass
             (``calibrate_layers``).

Each module's docstring holds its part of the method. Everything public is re-exported here:
``from pimsim.reorder import Reorderer, evolve``.
"""

from .groups import PermGroup, Segment, describe_groups, find_groups, find_segments
from .permute import (ChannelGather, Reorderer, check_order, column_index, independent_network,
                      random_independent_orders)
from .score import LayerScorer, SegmentScorer, gram_error, permute_stats, ptqsl_weight_error
from .cluster import ChannelBlocks, ProxyScorer, cluster_segment, layer_blocks
from .search import (DEFAULTS, METHODS, ReorderParams, calibrate_layers, check_search_params,
                     cluster, evolve, evolve_segment, search_segments)

__all__ = [
    "PermGroup", "Segment", "describe_groups", "find_groups", "find_segments",
    "ChannelGather", "Reorderer", "check_order", "column_index", "independent_network",
    "random_independent_orders",
    "LayerScorer", "SegmentScorer", "gram_error", "permute_stats", "ptqsl_weight_error",
    "DEFAULTS", "METHODS", "ReorderParams", "calibrate_layers", "check_search_params", "evolve",
    "evolve_segment", "cluster", "search_segments",
    "ChannelBlocks", "ProxyScorer", "cluster_segment", "layer_blocks",
]
