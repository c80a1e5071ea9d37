"""A torch model as pimsim sees it: BatchNorm folded, traced by torch.fx into GEMM layers.

``build_network(model)`` folds every BatchNorm2d into the convolution that feeds it, traces the
model with ``torch.fx`` and replaces each Conv2d / Linear by a ``GemmLayer``: the layer's im2col
weight matrix W (O x K, K in ``weight.reshape(O, -1)`` order) plus its convolution geometry.
Everything else in the graph (ReLU, residual adds, pooling, flatten, ...) runs as in torch.
A ``GemmLayer`` holds its quantization (``LayerQuant``) and runs on the backend its ``mode``
names (``pimsim.backends``: ``float``, ``fake`` dequantized torch conv, ``kernel`` the
tiled-integer product of Eq. 5, ``crossbar`` simulated arrays set up by
``pimsim.crossbar.attach``, or any registered one). This module knows only the backend
interface and registry, no backend.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .backends import backend_names, build_backend
from .kernels import conv_out_hw
from .quant import TileGrid, qrange, quantize_weight

DEFAULT_QUANT_MODE = "kernel"       # the mode a float layer switches to when it is quantized


class UnsupportedModelError(ValueError):
    """The model has a layer pimsim cannot map onto crossbar GEMMs; the message names it."""


# --------------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------------

def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """W' = W * g / sqrt(v + eps); b' = (b - mu) * g / sqrt(v + eps) + beta (float64 math)."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    k = gamma / torch.sqrt(var + bn.eps)
    conv.weight = nn.Parameter((w * k.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    conv.bias = nn.Parameter(((b - mean) * k + beta).to(conv.weight.dtype))


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A traced copy of ``model`` (eval mode) with each BatchNorm2d that directly follows a
    Conv2d (whose only user it is; both called once) folded into that conv. Other BatchNorms,
    and those without running statistics, stay as they are."""
    model = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 — re-raised with context
        raise UnsupportedModelError(f"torch.fx cannot trace {type(model).__name__}: {e}") from e
    modules = dict(gm.named_modules())
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        bn = modules[node.target]
        if bn.running_mean is None or bn.running_var is None:
            continue            # batch statistics even in eval mode: not a fixed affine map
        prev = node.args[0]
        if (isinstance(prev, fx.Node) and prev.op == "call_module"
                and isinstance(modules[prev.target], nn.Conv2d) and len(prev.users) == 1
                and calls[prev.target] == 1 and calls[node.target] == 1):
            _fold_into_conv(modules[prev.target], modules[node.target])
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


# --------------------------------------------------------------------------------------------
# GEMM layers
# --------------------------------------------------------------------------------------------

@dataclass
class LayerQuant:
    """How one layer is quantized: grid, per-tile weight scales, activation scale, bits."""

    grid: TileGrid
    w_scales: np.ndarray            # grid.shape, float64
    act_scale: float
    w_bits: int
    a_bits: int
    clamp: object = None            # per-tile partial-sum limit (ADC range) or None
    info: dict = field(default_factory=dict)
    symmetric: bool = False         # integers in [-(2^(b-1)-1), 2^(b-1)-1] (crossbar storage)

    def weight_int(self, w: np.ndarray) -> np.ndarray:
        """The layer's integer weights under this quantization."""
        return quantize_weight(w, self.grid, self.w_scales, self.w_bits, self.symmetric)

    def as_symmetric(self) -> "LayerQuant":
        """This quantization in the symmetric range ``[-(2^(b-1)-1), 2^(b-1)-1]`` that crossbar
        arrays store (same scales: a weight at ``-2^(b-1)`` is clamped to ``-(2^(b-1)-1)``);
        ``self`` when it already is."""
        return self if self.symmetric else dataclasses.replace(self, symmetric=True)

    def check(self) -> None:
        """ValueError unless the tile scales have the grid's shape and are finite and > 0."""
        s = np.asarray(self.w_scales, dtype=np.float64)
        if s.shape != self.grid.shape:
            raise ValueError(f"scales shape {s.shape} != grid shape {self.grid.shape}")
        if not (np.isfinite(s).all() and (s > 0).all()):
            raise ValueError("scales must be finite and > 0")


class GemmLayer(nn.Module):
    """A Conv2d or Linear seen as ``Y = W X + b`` with W the O x K im2col weight matrix.

    A grouped convolution (``groups = g``) is g independent matrices of ``O/g x K`` (K =
    ``Cin/g * kh * kw``) stacked along the rows of W (PyTorch's ``weight.reshape(O, -1)``):
    group g's rows multiply only its own input channels, im2col columns ``g*K .. (g+1)*K``
    of the ``K_in = g * K`` columns of ``im2col``. Its ``TileGrid`` has ``groups = g``.
    """

    def __init__(self, name: str, module: nn.Module):
        super().__init__()
        self.name = name
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise UnsupportedModelError(
                    f"layer {name!r}: padding_mode={module.padding_mode!r} is not supported "
                    "(only 'zeros')")
            if isinstance(module.padding, str):
                raise UnsupportedModelError(
                    f"layer {name!r}: string padding {module.padding!r} is not supported; "
                    "give padding as integers")
            self.kind = "conv"
            self.in_channels = module.in_channels
            self.kernel_size = tuple(module.kernel_size)
            self.stride = tuple(module.stride)
            self.padding = tuple(module.padding)
            self.dilation = tuple(module.dilation)
            self.groups = int(module.groups)
        elif isinstance(module, nn.Linear):
            self.kind = "linear"
            self.in_channels = module.in_features
            self.kernel_size = (1, 1)
            self.groups = 1
        else:
            raise UnsupportedModelError(f"layer {name!r}: {type(module).__name__} is not a GEMM")
        w = module.weight.detach().to(torch.float32)
        self.out_channels = w.shape[0]
        self.register_buffer("weight", w.clone())                    # original shape
        b = module.bias.detach().to(torch.float32).clone() if module.bias is not None else None
        self.register_buffer("bias", b)
        self._mode = "float"
        self.quant: LayerQuant | None = None
        self.wq: np.ndarray | None = None   # integer weights (O x K) under ``quant``
        self._backends: dict = {}           # built backends by name (see ``backend``)
        self.hook = None            # callable(layer, x) -> x or None, used by calibrators

    # -- matrix view ---------------------------------------------------------------------------
    @property
    def O(self) -> int:
        return self.out_channels

    @property
    def K(self) -> int:
        """Columns of W: ``Cin/groups * kh * kw`` (in_features for a linear layer)."""
        return self.weight[0].numel()

    @property
    def K_in(self) -> int:
        """Columns of the layer's im2col input: ``groups * K``."""
        return self.groups * self.K

    def weight_matrix(self) -> np.ndarray:
        """W as an O x K float32 numpy array (PyTorch's ``weight.reshape(O, -1)`` order)."""
        return self.weight.reshape(self.O, -1).numpy()

    def set_weight_matrix(self, w) -> None:
        """Replace W (O x K) — used by reordering; drops any quantization."""
        w = torch.as_tensor(np.asarray(w, dtype=np.float32))
        if tuple(w.shape) != (self.O, self.K):
            raise ValueError(f"layer {self.name}: W must be {self.O}x{self.K}, got {tuple(w.shape)}")
        self.weight = w.reshape(self.weight.shape).clone()
        self.clear_quant()

    def im2col(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as B x K_in x L columns (L output pixels; 1 for linear); group g
        of a grouped conv reads rows ``g*K .. (g+1)*K``."""
        if self.kind == "linear":
            return x.reshape(x.shape[0], -1, 1)
        return F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.kind == "linear":
            return 1, 1
        return conv_out_hw(h, w, self.kernel_size, self.stride, self.padding, self.dilation)

    # -- quantization and backends -------------------------------------------------------------
    def set_quant(self, q: LayerQuant) -> None:
        """Quantize this layer with ``q`` (integer weights formed once; the backends built for
        the previous quantization are dropped). A float layer switches to mode ``kernel``."""
        if (q.grid.O, q.grid.K) != (self.O, self.K):
            raise ValueError(f"layer {self.name}: grid {q.grid.O}x{q.grid.K} != W {self.O}x{self.K}")
        if q.grid.groups != self.groups:
            raise ValueError(f"layer {self.name}: grid has groups={q.grid.groups}, the layer "
                             f"groups={self.groups}")
        q.check()
        self.wq = np.ascontiguousarray(q.weight_int(self.weight_matrix()))
        self.quant = q
        self._backends = {}
        if self.mode == "float":
            self.mode = DEFAULT_QUANT_MODE

    def clear_quant(self) -> None:
        self.quant, self.wq, self._backends = None, None, {}
        self.mode = "float"

    @property
    def mode(self) -> str:
        """The name of the backend this layer runs (``float`` whenever it is not quantized)."""
        return self._mode

    @mode.setter
    def mode(self, name: str) -> None:
        if name not in backend_names():
            raise ValueError(f"layer {self.name}: mode must be one of {backend_names()}, "
                             f"got {name!r}")
        self._mode = name

    def _backend(self, name: str):
        b = self._backends.get(name)
        if b is None:
            b = self._backends[name] = build_backend(name, self)
        return b

    @property
    def backend(self):
        """The backend object this layer runs now (``pimsim.backends.Backend``), built from its
        quantization on first use unless ``set_backend`` built it with options."""
        return self._backend(self.mode if self.quant is not None else "float")

    def set_backend(self, name: str, **options):
        """Build backend ``name`` for this layer with ``options`` (e.g. the hardware) and keep it
        for mode ``name``; the mode itself is not changed. Returns the backend."""
        b = build_backend(name, self, **options)
        self._backends[name] = b
        return b

    def backend_of(self, name: str):
        """The backend ``name`` already built for this layer's quantization, or None."""
        return self._backends.get(name)

    def set_crossbar(self, crossbar, mapping=None) -> None:
        """Prepare mode "crossbar": this layer's integer weights on arrays of ``crossbar``
        (``mapping``: its ``LayerMapping``). The quantization must be ``symmetric``."""
        self.set_backend("crossbar", crossbar=crossbar, mapping=mapping)

    def quantize_input(self, x: torch.Tensor, act_scale: float | None = None) -> torch.Tensor:
        """Integer-valued float32 activations ``clamp(round(x / s_x))`` (Eq. 1)."""
        q = self.quant
        lo, hi = qrange(q.a_bits, q.symmetric)
        s = q.act_scale if act_scale is None else act_scale
        return torch.div(x, s).round_().clamp_(lo, hi)

    # -- execution -----------------------------------------------------------------------------
    def float_forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if weight is None else weight
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def run_backend(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The layer's output on backend ``name`` whatever its mode (built if needed)."""
        return self._backend(name).forward(self, x)

    def fake_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``run_backend("fake", x)``: dequantized weights on dequantized inputs, in torch."""
        return self.run_backend("fake", x)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``run_backend("kernel", x)``: the exact tiled-integer product of Eq. 5."""
        return self.run_backend("kernel", x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook is not None:
            y = self.hook(self, x)
            if y is not None:
                return y
        return self.backend.forward(self, x)

    def extra_repr(self) -> str:
        g = f", tile={self.quant.grid.r}x{self.quant.grid.c}" if self.quant else ""
        gr = f", groups={self.groups}" if self.groups != 1 else ""
        return f"{self.name}: {self.kind} O={self.O} K={self.K}{gr}, mode={self.mode}{g}"


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------

_FUNCTIONAL_GEMMS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv2d, torch.matmul,
                     torch.mm, torch.bmm, operator.matmul}
_UNSUPPORTED_MODULES = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                        nn.ConvTranspose3d, nn.Bilinear)


class Network(nn.Module):
    """A traced model whose Conv2d/Linear layers are ``GemmLayer``s, in execution order."""

    def __init__(self, gm: fx.GraphModule, layers: list[GemmLayer]):
        super().__init__()
        self.gm = gm
        self.layers = layers            # plain list: modules are registered inside gm

    def forward(self, x):
        return self.gm(x)

    @contextmanager
    def hooks(self, hooks: dict):
        """``with net.hooks({name: fn}):`` sets ``hooks[name]`` as those layers' ``hook``
        (``fn(layer, x)`` sees the layer's input; a non-None return replaces its output) and
        removes every hook afterwards, also on error."""
        try:
            for l in self.layers:
                if l.name in hooks:
                    l.hook = hooks[l.name]
            yield self
        finally:
            for l in self.layers:
                l.hook = None

    def run_with_hooks(self, x: torch.Tensor, hooks: dict) -> torch.Tensor:
        """Forward ``x`` without gradients inside ``self.hooks(hooks)``."""
        with self.hooks(hooks), torch.no_grad():
            return self(x)

    def layer(self, name: str) -> GemmLayer:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"no GEMM layer named {name!r}; layers: {[l.name for l in self.layers]}")

    @property
    def quantized_layers(self) -> list[GemmLayer]:
        return [l for l in self.layers if l.quant is not None]

    def set_mode(self, mode: str) -> None:
        """Run every quantized layer on backend ``mode`` (``float``, ``fake``, ``kernel``,
        ``crossbar`` or another registered one); unquantized layers stay ``float``."""
        if mode not in backend_names():
            raise ValueError(f"mode must be one of {backend_names()}, got {mode!r}")
        for l in self.layers:
            l.mode = mode if l.quant is not None else "float"

    def default_float_layers(self) -> list[str]:
        """The first and the last GEMM layer: kept in float by default (paper's setting)."""
        if not self.layers:
            return []
        return sorted({self.layers[0].name, self.layers[-1].name},
                      key=[l.name for l in self.layers].index)


def build_network(model: nn.Module) -> Network:
    """Fold BatchNorm, trace with torch.fx, and wrap every Conv2d/Linear in a ``GemmLayer``."""
    gm = fold_batchnorm(model)
    modules = dict(gm.named_modules())
    layers = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONAL_GEMMS:
            raise UnsupportedModelError(
                f"node {node.name!r}: functional {getattr(node.target, '__name__', node.target)} "
                "is not supported; use an nn.Conv2d / nn.Linear module")
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        if isinstance(mod, _UNSUPPORTED_MODULES):
            raise UnsupportedModelError(f"layer {node.target!r}: {type(mod).__name__} is not supported")
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            if any(l.name == node.target for l in layers):
                raise UnsupportedModelError(
                    f"layer {node.target!r} is called more than once (weight sharing is not supported)")
            layer = GemmLayer(node.target, mod)
            _set_submodule(gm, node.target, layer)
            layers.append(layer)
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no Conv2d or Linear layer")
    gm.recompile()
    return Network(gm, layers).eval()
