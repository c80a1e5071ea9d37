"""A network on crossbars: ``attach`` puts the quantized layers of a calibrated network on
arrays (its ``Mapping`` and one ``crossbar`` backend per layer), ``fit_adc_ranges`` fits the
``calibrated`` ADC ranges, ``reset_adc_stats`` / ``adc_stats`` read the simulation's clip and
conversion counters.
"""

from __future__ import annotations

from ..quant import Granularity
from .geometry import Crossbar
from .mapping import Mapping


def array_op(layer):
    """The ``CrossbarGemm`` of ``layer``'s crossbar backend, or None before ``attach``."""
    b = layer.backend_of("crossbar")
    return None if b is None else b.op


def attach(net, crossbar: Crossbar, granularity: Granularity | None = None,
           strict: bool = True) -> Mapping:
    """Put the quantized layers of ``net`` (a calibrated ``pimsim.network.Network``) on arrays:
    their weights become symmetric (a weight at ``-2^(b-1)`` is stored as ``-(2^(b-1)-1)``, as
    the arrays cannot hold it; inputs are clamped the same way), the ``Mapping`` is built and
    every layer gets its ``crossbar`` backend (``pimsim.crossbar.backend``: a ``CrossbarGemm``
    on its ``LayerMapping``; the layers' modes are not changed). Returns the mapping."""
    for l in net.quantized_layers:
        if not l.quant.symmetric:
            mode = l.mode
            l.set_quant(l.quant.as_symmetric())
            l.mode = mode
    mapping = Mapping.from_network(net, crossbar, strict=strict, granularity=granularity)
    for l in net.quantized_layers:
        l.set_crossbar(crossbar, mapping.layer(l.name))
    return mapping


def fit_adc_ranges(net, images, batch_size: int = 500) -> dict:
    """The ``calibrated`` ADC range: run ``images`` (normalized tensor) through ``net`` with
    every quantized layer in mode ``crossbar`` and an ideal ADC, record the largest column sum
    per array, and make it that array's range. Returns ``{layer: ranges}``."""
    import torch
    layers = [l for l in net.quantized_layers if array_op(l) is not None]
    saved = {l.name: l.mode for l in net.layers}
    try:
        for l in layers:
            l.mode = "crossbar"
            array_op(l).start_fit()
        with torch.no_grad():
            for s in range(0, len(images), batch_size):
                net(images[s:s + batch_size])
        return {l.name: array_op(l).finish_fit().tolist() for l in layers}
    finally:
        for l in net.layers:
            l.mode = saved[l.name]
        for l in layers:
            array_op(l).recording = False


def reset_adc_stats(net) -> None:
    """Zero the clip and conversion counters of every attached layer."""
    for l in net.quantized_layers:
        op = array_op(l)
        if op is not None:
            op.reset_stats()


def adc_stats(net) -> dict:
    """``{layer: (clipped, conversions)}`` counted since the last ``reset_adc_stats``."""
    ops = {l.name: array_op(l) for l in net.quantized_layers}
    return {n: (op.clipped, op.conversions) for n, op in ops.items() if op is not None}
