"""Backend ``float``: the layer in float32 torch (``GemmLayer.float_forward``), ignoring any
quantization. Layers without quantization always run it."""

from __future__ import annotations

from . import Backend


class FloatBackend(Backend):
    name = "float"

    def __init__(self, layer):
        pass

    def forward(self, layer, x):
        return layer.float_forward(x)
