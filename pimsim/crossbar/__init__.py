"""The crossbar: array geometry, the placement of tiles on arrays, the array-level simulation
of a quantized layer and a network on arrays.

- ``geometry``: ``Crossbar`` (a validated array description: rows, cols, cell / DAC / ADC bits,
  signed-weight format) and its derived quantities; its fields are the YAML ``crossbar:``
  section (``pimsim.config`` reads them through ``pimsim.schema``); ``check_field`` /
  ``INT_FIELDS`` derived from them.
- ``mapping``: ``LayerSpec`` -> ``map_layer`` -> ``LayerMapping``; ``Mapping`` of a network;
  the placement rules and ``adc_conversions``, the one count of ADC conversions.
- ``arrays``: ``CrossbarGemm``, the layer as the arrays compute it (number representation,
  bit-serial inputs, ADC, digital shift-add; with an ideal ADC bit-identical to
  ``kernels.TiledGemm``); ``adc_tables``.
- ``backend``: ``CrossbarBackend``, the ``crossbar`` backend of ``pimsim.backends``.
- ``attach``: ``attach`` (a calibrated network onto arrays), ``fit_adc_ranges``,
  ``reset_adc_stats``, ``adc_stats``.
- ``irdrop`` (imported on its own, ``pimsim.crossbar.irdrop``): wire resistance, the exact
  nodal solve of a resistive array and the decoupled / coupled line models of its column
  currents (``column_currents``, ``effective_conductance``, ``exact_conductance``).
"""

from __future__ import annotations

from .arrays import CrossbarGemm, adc_tables
from .attach import adc_stats, array_op, attach, fit_adc_ranges, reset_adc_stats
from .geometry import INT_FIELDS, RANGES, SIGNED, Crossbar, check_field
from .mapping import LayerMapping, LayerSpec, Mapping, adc_conversions, map_layer

__all__ = ["Crossbar", "CrossbarGemm", "INT_FIELDS", "LayerMapping", "LayerSpec", "Mapping",
           "RANGES", "SIGNED", "adc_conversions", "adc_stats", "adc_tables", "array_op",
           "attach", "check_field", "fit_adc_ranges", "map_layer", "reset_adc_stats"]
