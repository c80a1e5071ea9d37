"""A torch model as pimsim sees it: BatchNorm folded, traced by torch.fx into GEMM layers.

``build_network(model)`` folds every BatchNorm2d into the convolution that feeds it, traces the
model with ``torch.fx`` and replaces each Conv2d / Linear by a ``GemmLayer``: the layer's im2col
weight matrix W (O x K, K in ``weight.reshape(O, -1)`` order) plus its convolution geometry.
Everything else in the graph (ReLU, residual adds, pooling, flatten, ...) runs as in torch.
A ``GemmLayer`` runs in float, in fake-quant (dequantized weights and inputs, torch conv), on
the tiled-integer kernel of Eq. 5 (``pimsim.kernels``) or, in mode ``crossbar``, on simulated
crossbar arrays (``pimsim.crossbar.CrossbarGemm``, set up by ``pimsim.crossbar.attach``).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .kernels import TiledGemm, conv_out_hw
from .quant import TileGrid, qrange, quantize_weight

MODES = ("float", "fake", "kernel", "crossbar")


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


class GemmLayer(nn.Module):
    """A Conv2d or Linear seen as ``Y = W X + b`` with W the O x K im2col weight matrix."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__()
        self.name = name
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise UnsupportedModelError(
                    f"layer {name!r}: grouped convolution (groups={module.groups}) is not "
                    "supported yet")
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
        elif isinstance(module, nn.Linear):
            self.kind = "linear"
            self.in_channels = module.in_features
            self.kernel_size = (1, 1)
        else:
            raise UnsupportedModelError(f"layer {name!r}: {type(module).__name__} is not a GEMM")
        w = module.weight.detach().to(torch.float32)
        self.out_channels = w.shape[0]
        self.register_buffer("weight", w.clone())                    # original shape
        b = module.bias.detach().to(torch.float32).clone() if module.bias is not None else None
        self.register_buffer("bias", b)
        self.mode = "float"
        self.quant: LayerQuant | None = None
        self._op: TiledGemm | None = None
        self._w_fake: torch.Tensor | None = None
        self.xbar = None            # pimsim.crossbar.CrossbarGemm of mode "crossbar"
        self.hook = None            # callable(layer, x) -> x or None, used by calibrators

    # -- matrix view ---------------------------------------------------------------------------
    @property
    def O(self) -> int:
        return self.out_channels

    @property
    def K(self) -> int:
        return self.weight[0].numel()

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
        """The layer's input as B x K x L columns (L output pixels; 1 for linear)."""
        if self.kind == "linear":
            return x.reshape(x.shape[0], -1, 1)
        return F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.kind == "linear":
            return 1, 1
        return conv_out_hw(h, w, self.kernel_size, self.stride, self.padding, self.dilation)

    # -- quantization --------------------------------------------------------------------------
    def set_quant(self, q: LayerQuant) -> None:
        """Quantize this layer with ``q`` (integer weights and kernel operator built once)."""
        if (q.grid.O, q.grid.K) != (self.O, self.K):
            raise ValueError(f"layer {self.name}: grid {q.grid.O}x{q.grid.K} != W {self.O}x{self.K}")
        w = self.weight_matrix()
        wq = q.weight_int(w)
        self.quant = q
        self._op = TiledGemm(wq, q.grid, q.w_scales, w_bits=q.w_bits, a_bits=q.a_bits,
                             clamp=q.clamp)
        wdeq = wq.astype(np.float32) * q.grid.expand(q.w_scales).astype(np.float32)
        self._w_fake = torch.from_numpy(wdeq).reshape(self.weight.shape)
        if self.mode == "float":
            self.mode = "kernel"

    def clear_quant(self) -> None:
        self.quant, self._op, self._w_fake, self.xbar = None, None, None, None
        self.mode = "float"

    def set_crossbar(self, crossbar, mapping=None) -> None:
        """Prepare mode "crossbar": this layer's integer weights on arrays of ``crossbar``
        (``mapping``: its ``LayerMapping``). The quantization must be ``symmetric``."""
        from .crossbar import CrossbarGemm
        q = self.quant
        if q is None or not q.symmetric:
            raise ValueError(f"layer {self.name}: crossbar mode needs a symmetric quantization")
        self.xbar = CrossbarGemm(self._op.wq, q.grid, q.w_scales, crossbar, q.w_bits, q.a_bits,
                                 mapping=mapping, name=self.name)

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
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)

    def fake_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantized weights on dequantized inputs, in torch (fast, float32 rounding)."""
        xq = self.quantize_input(x) * np.float32(self.quant.act_scale)
        return self.float_forward(xq, self._w_fake)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exact tiled-integer product of Eq. 5 on the Numba/BLAS kernel.

        The kernel forms the pixel-major im2col rows chunk by chunk and returns Y^T, which is
        the conv output in channels-last memory format: no transposition anywhere.
        """
        q = self.quant
        B = x.shape[0]
        xq = self.quantize_input(x)                                      # integers, as float32
        if self.kind == "linear":              # any leading dims, like F.linear
            y = self._op(xq.reshape(-1, self.K), q.act_scale, bias=self.bias, layout="NK")
            return torch.from_numpy(y).view(*x.shape[:-1], self.O)
        ho, wo = self.out_hw(x.shape[2], x.shape[3])
        y = self._op.conv(xq, q.act_scale, self.kernel_size, self.stride, self.padding,
                          self.dilation, bias=self.bias)                  # (B*ho*wo) x O
        return torch.from_numpy(y).view(B, ho, wo, self.O).permute(0, 3, 1, 2)

    def crossbar_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer computed on its crossbar arrays (``pimsim.crossbar.CrossbarGemm``)."""
        if self.xbar is None:
            raise ValueError(f"layer {self.name}: mode crossbar needs set_crossbar() first")
        q = self.quant
        B = x.shape[0]
        xq = self.quantize_input(x)
        if self.kind == "linear":
            y = self.xbar(xq.reshape(-1, self.K), q.act_scale, bias=self.bias)
            return torch.from_numpy(y).view(*x.shape[:-1], self.O)
        ho, wo = self.out_hw(x.shape[2], x.shape[3])
        y = self.xbar.conv(xq, q.act_scale, self.kernel_size, self.stride, self.padding,
                           self.dilation, bias=self.bias)
        return torch.from_numpy(y).view(B, ho, wo, self.O).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook is not None:
            y = self.hook(self, x)
            if y is not None:
                return y
        if self.mode == "float" or self.quant is None:
            return self.float_forward(x)
        if self.mode == "fake":
            return self.fake_forward(x)
        if self.mode == "crossbar":
            return self.crossbar_forward(x)
        return self.kernel_forward(x)

    def extra_repr(self) -> str:
        g = f", tile={self.quant.grid.r}x{self.quant.grid.c}" if self.quant else ""
        return f"{self.name}: {self.kind} O={self.O} K={self.K}, mode={self.mode}{g}"


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

    def run_with_hooks(self, x: torch.Tensor, hooks: dict) -> torch.Tensor:
        """Forward ``x`` without gradients with ``hooks[name]`` set on those layers (see
        ``GemmLayer.hook``); every hook is removed afterwards, also on error."""
        try:
            for l in self.layers:
                if l.name in hooks:
                    l.hook = hooks[l.name]
            with torch.no_grad():
                return self(x)
        finally:
            for l in self.layers:
                l.hook = None

    def layer(self, name: str) -> GemmLayer:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"no GEMM layer named {name!r}; layers: {[l.name for l in self.layers]}")

    @property
    def quantized_layers(self) -> list[GemmLayer]:
        return [l for l in self.layers if l.quant is not None]

    def set_mode(self, mode: str) -> None:
        """Run every quantized layer in ``mode``: ``float``, ``fake``, ``kernel`` or ``crossbar``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
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
