"""Calibration: choose every quantized layer's tile scales and activation scale.

Layers are calibrated in network order in one pass over the calibration batch: when the pass
reaches a layer, all earlier layers are already quantized, so the layer sees the input the
quantized network really gives it; it picks its scales, quantizes itself, and its quantized
output feeds the next layer. The method is looked up by name in ``pimsim.methods`` (built in:
``max``, ``mse``, ``ptqsl``; ``register_method`` adds more).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .methods import get_method
from .network import GemmLayer, LayerQuant, Network
from .quant import Granularity


def record_float_outputs(net: Network, images: torch.Tensor, names) -> dict:
    """The float network's output of each named GEMM layer on ``images`` (one forward pass)."""
    outs = {}
    saved = {l.name: l.mode for l in net.layers}

    def hook(layer, x):
        y = layer.float_forward(x)
        outs[layer.name] = y
        return y
    try:
        for l in net.layers:
            l.mode = "float"
        net.run_with_hooks(images, {n: hook for n in names})
    finally:
        for l in net.layers:
            l.mode = saved[l.name]
    return outs


def resolve_float_layers(net: Network, float_layers) -> set[str]:
    """``auto`` -> first and last GEMM layer; a list of names is checked against the network."""
    if float_layers == "auto":
        return set(net.default_float_layers())
    names = {l.name for l in net.layers}
    unknown = [n for n in float_layers if n not in names]
    if unknown:
        raise ValueError(f"quant.float_layers: unknown layer(s) {unknown}; layers: {sorted(names)}")
    return set(float_layers)


def method_params(params: dict | None, symmetric: bool = False) -> dict:
    """A copy of ``params`` with ``"symmetric": True`` added when ``symmetric``."""
    params = dict(params or {})
    if symmetric:
        params["symmetric"] = True
    return params


def symmetric_quant(q: LayerQuant, symmetric: bool) -> LayerQuant:
    """``q.as_symmetric()`` when ``symmetric``, else ``q`` (``LayerQuant.as_symmetric``)."""
    return q.as_symmetric() if symmetric else q


def quantize_layer(fn, layer: GemmLayer, x: torch.Tensor, target, gran: Granularity,
                   w_bits: int, a_bits: int, params: dict) -> None:
    """Quantize ``layer`` with method ``fn`` on its input ``x`` (and float output ``target``)
    and put it in fake mode, so that its quantized output feeds the next layer.
    ``params["symmetric"]`` holds whatever the method does with it."""
    q = fn(layer, x, target, gran, w_bits, a_bits, params)
    layer.set_quant(symmetric_quant(q, bool(params.get("symmetric", False))))
    layer.mode = "fake"


def calibrate(net: Network, images: torch.Tensor, gran: Granularity, w_bits: int, a_bits: int,
              method: str = "max", float_layers="auto", progress: bool = True,
              params: dict | None = None, symmetric: bool = False) -> dict:
    """Quantize every GEMM layer of ``net`` except ``float_layers``, in network order.

    ``images`` is the (normalized) calibration batch; ``params`` method options;
    ``symmetric``: integers in ``[-(2^(b-1)-1), 2^(b-1)-1]``, the range crossbar arrays store
    (the methods search their scales for it).
    Returns ``{"calibration_s", "float_layers"}``.
    """
    m = get_method(method)
    params = method_params(params, symmetric)
    if m.check_params is not None:
        m.check_params(params)                    # fail before the pass, not at its first layer
    keep = resolve_float_layers(net, float_layers)
    todo = [l for l in net.layers if l.name not in keep]
    for l in net.layers:
        l.clear_quant()
    t0 = time.perf_counter()
    targets = (record_float_outputs(net, images, {l.name for l in todo})
               if m.needs_target else {})
    bar = tqdm(total=len(todo), desc=f"calibrate ({method})", disable=not progress, leave=False)

    def hook(layer: GemmLayer, x: torch.Tensor):
        layer.hook = None
        quantize_layer(m.fn, layer, x, targets.pop(layer.name, None), gran, w_bits, a_bits, params)
        bar.update(1)
        return None

    try:
        net.run_with_hooks(images, {l.name: hook for l in todo})
    finally:
        bar.close()
    missed = [l.name for l in todo if l.quant is None]
    if missed:
        raise RuntimeError(f"layers never reached by the forward pass: {missed}")
    return {"calibration_s": time.perf_counter() - t0,
            "float_layers": [l.name for l in net.layers if l.name in keep]}

