"""Backend ``kernel``: the exact tiled-integer product of Eq. 5 on the Numba/BLAS kernel
(``pimsim.kernels.TiledGemm``). A convolution forms its pixel-major im2col rows chunk by chunk
and gets Y^T, the output in channels-last memory format: no transposition anywhere."""

from __future__ import annotations

from ..kernels import TiledGemm
from . import IntegerBackend


class KernelBackend(IntegerBackend):
    name = "kernel"

    def __init__(self, layer):
        q = self.quant_of(layer)
        self.op = TiledGemm(layer.wq, q.grid, q.w_scales, w_bits=q.w_bits, a_bits=q.a_bits,
                            clamp=q.clamp, a_unsigned=q.act_unsigned)

    def gemm(self, xq, act_scale, bias):
        return self.op(xq, act_scale, bias=bias, layout="NK")

    def conv(self, xq4, act_scale, kernel_size, stride, padding, dilation, bias):
        return self.op.conv(xq4, act_scale, kernel_size, stride, padding, dilation, bias=bias)
