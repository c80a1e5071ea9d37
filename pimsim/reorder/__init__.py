"""Channel reordering (see ``pimsim.reorder.groups``)."""

from .groups import (DEFAULTS, METHODS, ChannelGather, LayerScorer, PermGroup, Reorderer, Segment,
                     SegmentScorer, calibrate_layers, check_order, check_search_params,
                     column_index, describe_groups, evolve, evolve_segment, find_groups,
                     find_segments, gram_error, independent_network, permute_stats,
                     ptqsl_weight_error, random_independent_orders)
