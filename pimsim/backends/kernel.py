"""Backend ``kernel``: the exact tiled-integer product of Eq. 5 on the Numba/BLAS kernel
(``pimsim.kernels.TiledGemm``). A convolution forms its pixel-major im2col rows chunk by chunk
and gets Y^T, the output in channels-last memory format: no transposition anywhere."""

from __future__ import annotations

import torch

from ..kernels import TiledGemm, quantize_int8_channels_last
from ..quant import act_qrange
from . import IntegerBackend


class KernelBackend(IntegerBackend):
    name = "kernel"

    def __init__(self, layer):
        q = self.quant_of(layer)
        self.op = TiledGemm(layer.wq, q.grid, q.w_scales, w_bits=q.w_bits, a_bits=q.a_bits,
                            clamp=q.clamp, a_unsigned=q.act_unsigned)

    def quantize_conv_input(self, layer, x):
        """On the int8 path, Eq. 1 straight into the int8 channels-last input the im2col
        reads (one pass; the same integers as ``layer.quantize_input``)."""
        q = layer.quant
        if self.op.path == "int8" and x.dtype == torch.float32:   # int8 path: the range fits
            lo, hi = act_qrange(q.a_bits, q.symmetric, q.act_unsigned)
            return quantize_int8_channels_last(x, q.act_scale, lo, hi)
        return layer.quantize_input(x)

    def gemm(self, xq, act_scale, bias):
        return self.op(xq, act_scale, bias=bias, layout="NK")

    def conv(self, xq4, act_scale, kernel_size, stride, padding, dilation, bias):
        return self.op.conv(xq4, act_scale, kernel_size, stride, padding, dilation, bias=bias)
