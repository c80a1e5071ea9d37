"""Backend ``fake``: fake quantization — the dequantized weights ``Wq * s_ij`` (float32) on the
dequantized input ``round(x / s_x) * s_x``, as a torch conv / linear (fast; float32 rounding,
so not bit-exact against Eq. 5)."""

from __future__ import annotations

import numpy as np
import torch

from . import Backend


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, layer):
        q = self.quant_of(layer)
        wdeq = layer.wq.astype(np.float32) * q.grid.expand(q.w_scales).astype(np.float32)
        self.weight = torch.from_numpy(wdeq).reshape(layer.weight.shape)

    def forward(self, layer, x):
        xq = layer.quantize_input(x) * np.float32(layer.quant.act_scale)
        return layer.float_forward(xq, self.weight)
