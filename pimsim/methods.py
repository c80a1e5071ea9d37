"""The calibration-method registry: which methods ``calibrate``, ``reorder`` and the YAML key
``quant.calibration`` can use.

A method is ``fn(layer, x, target, gran, w_bits, a_bits, params) -> LayerQuant``: ``x`` is the
layer's input in the (partly) quantized network, ``target`` its float output (None unless the
method was registered with ``needs_target=True``), ``params`` the method options (YAML
``quant.search.*`` and ``quant.metric``; ``params["symmetric"]``, present only when true, asks
for integers in ``[-(2^(b-1)-1), 2^(b-1)-1]``; a method that ignores it gets its weights clamped
to that range afterwards by ``pimsim.calibrate.quantize_layer``; ``params["act_unsigned"]``,
present only when true, says the layer's input is quantized unsigned, ``[0, 2^b - 1]``
(``quant.act_signed``), so the activation scale should be searched for that range; the
result is marked unsigned either way). ``check_params(params)``
(optional) validates those options before any work starts and raises ValueError naming the bad
key; ``pimsim.config`` calls it on ``{**quant.search, "metric": quant.metric}``.

Built-in methods, registered when this module is first imported (so whoever can look a method
up sees them): ``max`` (below: ``s = max|W_ij| / (2^(b-1)-1)`` per tile, activation scale from
the max of the calibration input), ``mse`` and ``ptqsl`` (``pimsim.ptqsl``). ``pimsim.ptqsl``
only implements them and does not import this module, so there is no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import ptqsl
from .network import GemmLayer, LayerQuant
from .quant import Granularity, act_max_scale, max_scales


@dataclass(frozen=True)
class Method:
    """One registered calibration method."""

    name: str
    fn: Callable
    needs_target: bool = False            # fn wants the float layer output Y*
    check_params: Callable | None = None  # params -> checked params, ValueError if bad


_METHODS: dict[str, Method] = {}


def register_method(name: str, fn, needs_target: bool = False, check_params=None,
                    replace: bool = False) -> Method:
    """Make ``fn`` available as calibration method ``name`` (also as YAML
    ``quant.calibration: name``). ValueError if ``name`` is taken, unless ``replace``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a method name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"method {name!r}: fn must be callable, got {type(fn).__name__}")
    if check_params is not None and not callable(check_params):
        raise ValueError(f"method {name!r}: check_params must be callable or None")
    if name in _METHODS and not replace:
        raise ValueError(f"calibration method {name!r} is already registered "
                         "(replace=True to override it)")
    m = Method(name, fn, bool(needs_target), check_params)
    _METHODS[name] = m
    return m


def unregister_method(name: str) -> None:
    """Remove method ``name``; ValueError (listing the registered ones) if there is none."""
    get_method(name)
    del _METHODS[name]


def method_names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The method registered as ``name``; ValueError listing the registered ones otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"calibration method must be one of {method_names()}, "
                         f"got {name!r}") from None


def max_method(layer: GemmLayer, x: torch.Tensor, target, gran: Granularity, w_bits: int,
               a_bits: int, params: dict) -> LayerQuant:
    """``max`` calibration: ``max|W_ij| / (2^(b-1)-1)`` per tile, activation scale from
    ``max|x|`` over the activation range (``params["act_unsigned"]``: ``[0, 2^b - 1]``). Reads no
    other option (its scales never reach -2^(b-1), so the symmetric clamp of
    ``quantize_layer`` leaves them exact)."""
    grid = gran.resolve(layer.O, layer.K, layer.groups)
    w_scales = max_scales(layer.weight_matrix(), grid, w_bits)
    uns = bool((params or {}).get("act_unsigned", False))
    act_scale = float(act_max_scale(float(x.abs().max()), a_bits, uns))
    return LayerQuant(grid, w_scales, act_scale, w_bits, a_bits, info={"method": "max"},
                      act_unsigned=uns)


register_method("max", max_method)
register_method("mse", ptqsl.mse_method, check_params=ptqsl.check_params)
register_method("ptqsl", ptqsl.ptqsl_method, needs_target=True, check_params=ptqsl.check_params)
