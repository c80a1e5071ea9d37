"""Layer backends: how a ``pimsim.network.GemmLayer`` is executed, and their registry.

A backend is an object a layer holds (``GemmLayer.backend``), built for that layer by the
factory registered under its name: ``factory(layer, **options) -> Backend``, from the layer's
``LayerQuant`` (``layer.quant``, its integer weights ``layer.wq``) and, for array backends, the
options given through ``GemmLayer.set_backend(name, **options)`` (e.g. the crossbar and the
layer's ``LayerMapping``). ``GemmLayer.mode`` names the backend a layer runs; a layer without
quantization always runs ``float``. A layer's built backends are dropped when its quantization
changes.

The interface is one method, ``forward(layer, x) -> y`` (torch in, torch out, the layer's
geometry and bias read from ``layer``). ``IntegerBackend`` implements it for backends that
compute the integer tiled product of Eq. 5: they give ``gemm(xq, act_scale, bias)`` (X^T N x K
integers -> Y^T N x O float32) and ``conv(xq4, act_scale, kernel_size, stride, padding,
dilation, bias)`` ((B, C, H, W) integers -> Y^T (B*Ho*Wo) x O float32); the input quantization
(Eq. 1) and the reshaping into the layer's output are shared.

Built in: ``float`` (backends/float.py), ``fake`` (backends/fake.py), ``kernel``
(backends/kernel.py), ``crossbar`` (pimsim/crossbar/backend.py). Adding one is a file with a
``Backend`` subclass and a ``register_backend(name, factory)`` call (or a ``"module:attr"``
string, imported on first use — how the built-ins are registered, so that importing
``pimsim.network`` imports no backend).
"""

from __future__ import annotations

import importlib

import numpy as np
import torch


class Backend:
    """The execution of one layer. Subclasses set ``name`` and implement ``forward``."""

    name = ""

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for input ``x`` (the layer's float input)."""
        raise NotImplementedError

    def quant_of(self, layer):
        """The layer's ``LayerQuant``; ValueError naming the layer and this mode if it has none."""
        if layer.quant is None:
            raise ValueError(f"layer {layer.name}: mode {self.name} needs a quantization "
                             "(set_quant)")
        return layer.quant


class IntegerBackend(Backend):
    """A backend computing the tiled integer product: ``forward`` quantizes the input with the
    layer's activation scale (``layer.quantize_input``) and calls ``gemm`` (linear layers, any
    leading dims) or ``conv`` (convolutions, the layer's geometry), whose Y^T is the output in
    channels-last order (returned as an NCHW view, no copy)."""

    def gemm(self, xq: torch.Tensor, act_scale: float, bias) -> np.ndarray:
        raise NotImplementedError

    def conv(self, xq4: torch.Tensor, act_scale: float, kernel_size, stride, padding, dilation,
             bias) -> np.ndarray:
        raise NotImplementedError

    def quantize_conv_input(self, layer, x: torch.Tensor) -> torch.Tensor:
        """A conv layer's quantized input as ``conv`` takes it: by default
        ``layer.quantize_input(x)`` (integers as float32); a backend may return the same
        integers in another dtype or memory format."""
        return layer.quantize_input(x)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        q = layer.quant
        if layer.kind == "linear":
            xq = layer.quantize_input(x)                                 # integers, as float32
            y = self.gemm(xq.reshape(-1, layer.K), q.act_scale, layer.bias)
            return torch.from_numpy(y).view(*x.shape[:-1], layer.O)
        xq = self.quantize_conv_input(layer, x)
        B = x.shape[0]
        ho, wo = layer.out_hw(x.shape[2], x.shape[3])
        y = self.conv(xq, q.act_scale, layer.kernel_size, layer.stride, layer.padding,
                      layer.dilation, layer.bias)                         # (B*ho*wo) x O
        return torch.from_numpy(y).view(B, ho, wo, layer.O).permute(0, 3, 1, 2)


_FACTORIES: dict = {}


def register_backend(name: str, factory, replace: bool = False) -> None:
    """Make ``factory(layer, **options) -> Backend`` available as mode ``name``. ``factory``
    may be a ``"module:attr"`` string, imported when the backend is first built."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    if name in _FACTORIES and not replace:
        raise ValueError(f"backend {name!r} is already registered (replace=True to replace it)")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise ValueError(f"backend {name!r}: factory must be callable or 'module:attr', "
                         f"got {factory!r}")
    _FACTORIES[name] = factory


def backend_names() -> tuple:
    """The registered backend names, in registration order."""
    return tuple(_FACTORIES)


def get_backend(name: str):
    """The factory registered as ``name`` (a ``"module:attr"`` entry is imported now)."""
    if name not in _FACTORIES:
        raise ValueError(f"mode must be one of {backend_names()}, got {name!r}")
    f = _FACTORIES[name]
    if isinstance(f, str):
        mod, _, attr = f.partition(":")
        f = getattr(importlib.import_module(mod), attr)
        _FACTORIES[name] = f
    return f


def build_backend(name: str, layer, **options) -> Backend:
    """A new backend ``name`` for ``layer``."""
    return get_backend(name)(layer, **options)


register_backend("float", "pimsim.backends.float:FloatBackend")
register_backend("fake", "pimsim.backends.fake:FakeBackend")
register_backend("kernel", "pimsim.backends.kernel:KernelBackend")
register_backend("crossbar", "pimsim.crossbar.backend:CrossbarBackend")
