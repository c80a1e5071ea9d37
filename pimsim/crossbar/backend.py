"""Backend ``crossbar``: the layer computed on its simulated crossbar arrays
(``pimsim.crossbar.arrays.CrossbarGemm``). Built by ``GemmLayer.set_crossbar(crossbar,
mapping)`` (``set_backend("crossbar", crossbar=..., mapping=...)``), usually through
``pimsim.crossbar.attach``; the layer's quantization must be symmetric. With non-ideal
cells (``crossbar.device``), ``adc_range: calibrated_slice`` or a drift ``compensation``
(``Crossbar.analog``) the layer runs on the analog model ``pimsim.crossbar.noisy``."""

from __future__ import annotations

from ..backends import IntegerBackend
from .arrays import CrossbarGemm


class CrossbarBackend(IntegerBackend):
    """Holds the layer's ``CrossbarGemm`` as ``op`` (ADC ranges, clip / conversion counters)."""

    name = "crossbar"

    def __init__(self, layer, crossbar=None, mapping=None):
        if crossbar is None:
            raise ValueError(f"layer {layer.name}: mode crossbar needs set_crossbar() first")
        q = layer.quant
        if q is None or not q.symmetric:
            raise ValueError(f"layer {layer.name}: crossbar mode needs a symmetric quantization")
        cls = CrossbarGemm
        if crossbar.analog:              # real cells, per-slice ADC ranges or compensation
            from .noisy import NoisyCrossbarGemm as cls
        self.op = cls(layer.wq, q.grid, q.w_scales, crossbar, q.w_bits, q.a_bits,
                      mapping=mapping, name=layer.name, a_unsigned=q.act_unsigned)

    def gemm(self, xq, act_scale, bias):
        return self.op(xq, act_scale, bias=bias)

    def conv(self, xq4, act_scale, kernel_size, stride, padding, dilation, bias):
        return self.op.conv(xq4, act_scale, kernel_size, stride, padding, dilation, bias=bias)
