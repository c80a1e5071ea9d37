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
import math
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
from .quant import TileGrid, act_qrange, int_dtype, qrange, quantize_weight

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
    owner = root.get_submodule(parent) if parent else root
    if name in owner._parameters or name in owner._buffers:
        delattr(owner, name)                # a tensor replaced by the layer that uses it
    setattr(owner, name, module)


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
    act_unsigned: bool = False      # activations in [0, 2^b - 1] (quant.act_signed unsigned/auto)

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
        """The layer's input as B x K_in x L columns (L output pixels; for linear the positions
        of the extra dims: a B x T x F token input gives B x F x T, a B x F input B x F x 1);
        group g of a grouped conv reads rows ``g*K .. (g+1)*K``."""
        if self.kind == "linear":
            return x.reshape(x.shape[0], -1, self.K).transpose(1, 2)
        return F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)

    def positions(self, x: torch.Tensor) -> int:
        """Output columns per input sample for input ``x`` (batch dim first): the output
        pixels of a convolution, the positions of a linear layer's extra dims (T of a
        B x T x F token input; 1 for B x F)."""
        if self.kind == "linear":
            return math.prod(x.shape[1:-1])
        return math.prod(self.out_hw(x.shape[2], x.shape[3]))

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.kind == "linear":
            return 1, 1
        return conv_out_hw(h, w, self.kernel_size, self.stride, self.padding, self.dilation)

    # -- quantization and backends -------------------------------------------------------------
    def set_quant(self, q: LayerQuant, wq: np.ndarray | None = None) -> None:
        """Quantize this layer with ``q`` (integer weights formed once; the backends built for
        the previous quantization are dropped). A float layer switches to mode ``kernel``.
        ``wq``: use these O x K integers (e.g. reloaded by ``pimsim.export``) instead of
        quantizing W; ValueError unless they lie in the range of ``q``'s bits."""
        if (q.grid.O, q.grid.K) != (self.O, self.K):
            raise ValueError(f"layer {self.name}: grid {q.grid.O}x{q.grid.K} != W {self.O}x{self.K}")
        if q.grid.groups != self.groups:
            raise ValueError(f"layer {self.name}: grid has groups={q.grid.groups}, the layer "
                             f"groups={self.groups}")
        q.check()
        if wq is None:
            self.wq = np.ascontiguousarray(q.weight_int(self.weight_matrix()))
        else:
            wq = np.asarray(wq)
            lo, hi = qrange(q.w_bits, q.symmetric)
            if wq.shape != (self.O, self.K) or wq.dtype.kind != "i":
                raise ValueError(f"layer {self.name}: integer weights must be {self.O}x{self.K} "
                                 f"integers, got {wq.dtype} {wq.shape}")
            if wq.size and (wq.min() < lo or wq.max() > hi):
                raise ValueError(f"layer {self.name}: integer weights outside {lo}..{hi} of "
                                 f"{q.w_bits} bits")
            self.wq = np.ascontiguousarray(wq.astype(int_dtype(q.w_bits)))
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
        """Integer-valued float32 activations ``clamp(round(x / s_x))`` (Eq. 1), in
        ``act_qrange`` (unsigned ``[0, 2^b - 1]`` when ``quant.act_unsigned``)."""
        q = self.quant
        lo, hi = act_qrange(q.a_bits, q.symmetric, q.act_unsigned)
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

# Matrix products pimsim does not put on arrays: they run in torch and are listed as digital
# work (``Network.digital_layers``): activation x activation products, functional GEMMs whose
# weight is not a parameter, and the modules pimsim cannot map.
_DIGITAL_FUNCTIONS = {
    torch.matmul: "matmul", operator.matmul: "matmul", torch.mm: "mm", torch.bmm: "bmm",
    torch.mv: "mv", torch.dot: "dot", torch.inner: "inner", torch.tensordot: "tensordot",
    torch.einsum: "einsum", torch.addmm: "addmm", torch.baddbmm: "baddbmm",
    torch.addbmm: "addbmm", F.scaled_dot_product_attention: "scaled_dot_product_attention",
    F.linear: "linear", F.bilinear: "bilinear", F.conv1d: "conv1d", F.conv2d: "conv2d",
    F.conv3d: "conv3d", F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d", F.conv_transpose3d: "conv_transpose3d",
}
_DIGITAL_METHODS = {"matmul": "matmul", "__matmul__": "matmul", "mm": "mm", "bmm": "bmm",
                    "mv": "mv", "dot": "dot", "addmm": "addmm", "baddbmm": "baddbmm"}
_DIGITAL_MODULES = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                    nn.ConvTranspose3d, nn.Bilinear, nn.MultiheadAttention, nn.RNNBase,
                    nn.RNNCellBase, nn.Transformer, nn.TransformerEncoder,
                    nn.TransformerDecoder, nn.TransformerEncoderLayer,
                    nn.TransformerDecoderLayer)
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_CELL_GATES = {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}


def _rnn_macs(mod: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of an RNN / LSTM / GRU module (or cell) on input ``x``: every
    gate's input and hidden matrix products at every step of every layer and direction (and
    the LSTM output projection)."""
    vectors = x.numel() // x.shape[-1]               # steps x batch
    if isinstance(mod, nn.RNNCellBase):
        gates = _CELL_GATES.get(type(mod), 1)
        return vectors * gates * mod.hidden_size * (mod.input_size + mod.hidden_size)
    gates = _RNN_GATES.get(mod.mode, 1)
    h = mod.hidden_size
    p = getattr(mod, "proj_size", 0) or h
    dirs = 2 if mod.bidirectional else 1
    per = 0
    for i in range(mod.num_layers):
        inp = mod.input_size if i == 0 else p * dirs
        per += dirs * (gates * h * (inp + p) + (h * p if p != h else 0))
    return vectors * per


def _dot_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


def _mv_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1]


def _count_macs(run) -> tuple:
    """Multiply-accumulates of the matrix products (mm, bmm, convolution, attention, ...) that
    ``run()`` executes (returned with its output), counted by torch's FlopCounterMode (2 flops per MAC). Gradients are on
    meanwhile so that modules take their decomposed path (the fused inference kernels of
    nn.MultiheadAttention and the Transformer layers are not counted by the flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten
    with FlopCounterMode(display=False, custom_mapping={aten.dot: _dot_flops,
                                                        aten.mv: _mv_flops}) as fc:
        with torch.enable_grad():
            out = run()
    return out, fc.get_total_flops() // 2


class _DigitalCounter(fx.Interpreter):
    """Runs the traced graph once and records the MACs of the nodes named in ``nodes``."""

    def __init__(self, gm: fx.GraphModule, nodes):
        super().__init__(gm)
        self.nodes = set(nodes)
        self.macs: dict = {}

    def run_node(self, n):
        if n.name not in self.nodes:
            return super().run_node(n)
        mod = self.module.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(mod, (nn.RNNBase, nn.RNNCellBase)):
            args, _ = self.fetch_args_kwargs_from_env(n)
            x = args[0]
            if not isinstance(x, torch.Tensor):
                raise UnsupportedModelError(f"layer {n.target!r}: {type(mod).__name__} on a "
                                            f"{type(x).__name__} input cannot be counted")
            self.macs[n.name] = _rnn_macs(mod, x)
            return super().run_node(n)
        out, self.macs[n.name] = _count_macs(lambda: super(_DigitalCounter, self).run_node(n))
        return out


def _bind(node: fx.Node, names, defaults) -> dict:
    """A call's arguments by parameter name (``defaults`` for those not given)."""
    vals = dict(defaults)
    vals.update(zip(names, node.args))
    vals.update(node.kwargs)
    return vals


_LINEAR_ARGS = (("input", "weight", "bias"), {"bias": None})
_CONV2D_ARGS = (("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _parameter_gemm(gm: fx.GraphModule, node: fx.Node):
    """For ``F.linear`` / ``F.conv2d`` whose weight (and bias, if any) are tensors of the model
    (``get_attr`` nodes): ``(input node, weight target, bias target or None, an nn.Linear /
    nn.Conv2d with those tensors and the call's geometry)``; None otherwise (the product then
    runs digitally)."""
    if node.op != "call_function" or node.target not in (F.linear, F.conv2d):
        return None
    names, defaults = _LINEAR_ARGS if node.target is F.linear else _CONV2D_ARGS
    a = _bind(node, names, defaults)
    w, b = a.get("weight"), a.get("bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    if any(isinstance(a[k], fx.Node) for k in names[3:]):
        return None                                 # geometry computed at run time
    weight = _attr(gm, w.target)
    bias = _attr(gm, b.target) if b is not None else None
    if not isinstance(weight, torch.Tensor) or (bias is not None and not isinstance(bias, torch.Tensor)):
        return None
    if node.target is F.linear:
        if weight.dim() != 2:
            return None
        mod = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        if weight.dim() != 4:
            return None
        g = a["groups"]
        mod = nn.Conv2d(weight.shape[1] * g, weight.shape[0], tuple(weight.shape[2:]),
                        stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
                        groups=g, bias=bias is not None, device="meta")
    mod.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        mod.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return a["input"], w.target, (b.target if b is not None else None), mod


def _digital_op(node: fx.Node, modules: dict) -> tuple[str, str] | None:
    """``(name, op)`` when ``node`` is a matrix product pimsim leaves to digital logic."""
    if node.op == "call_function" and node.target in _DIGITAL_FUNCTIONS:
        return node.name, _DIGITAL_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _DIGITAL_METHODS:
        return node.name, _DIGITAL_METHODS[node.target]
    if node.op == "call_module" and isinstance(modules[node.target], _DIGITAL_MODULES):
        return node.target, type(modules[node.target]).__name__
    return None


DEFAULT_INPUT_SHAPE = (3, 32, 32)      # one sample of CIFAR-10: the example input by default


class Network(nn.Module):
    """A traced model whose Conv2d/Linear layers are ``GemmLayer``s, in execution order.

    ``digital_layers``: the matrix products that run in torch instead of on arrays (see
    ``build_network``), one dict each: ``name`` (module path, or the graph node's name for a
    function), ``op`` and ``macs`` (multiply-accumulates per inference, i.e. per input sample,
    measured on one example input of shape ``input_shape``; ``count_digital`` measures them
    again for another input shape)."""

    def __init__(self, gm: fx.GraphModule, layers: list[GemmLayer], digital=(),
                 input_shape=DEFAULT_INPUT_SHAPE):
        super().__init__()
        self.gm = gm
        self.layers = layers            # plain list: modules are registered inside gm
        self.digital_nodes = list(digital)          # [(node name, name, op)] in graph order
        self.input_shape = tuple(input_shape)
        self.digital_layers: list[dict] = []
        if self.digital_nodes:
            self.count_digital(self.input_shape)

    def count_digital(self, input_shape) -> list[dict]:
        """Measure the MACs of the digital layers on one example input of ``input_shape`` (one
        sample, no batch dim; zeros: only shapes matter) with every GEMM layer in float, and
        make them ``digital_layers`` (and ``input_shape`` this shape). Returns the list."""
        input_shape = tuple(int(v) for v in input_shape)
        macs = {}
        if self.digital_nodes:
            counter = _DigitalCounter(self.gm, [n for n, _, _ in self.digital_nodes])
            saved = {l.name: l.mode for l in self.layers}
            try:
                for l in self.layers:
                    l.mode = "float"
                with torch.no_grad():
                    counter.run(torch.zeros(1, *input_shape))
            except UnsupportedModelError:
                raise
            except Exception as e:  # noqa: BLE001 — re-raised naming the input shape
                raise UnsupportedModelError(
                    f"cannot run the model on an example input of shape {input_shape} to count "
                    f"its digital layers ({type(e).__name__}: {' '.join(str(e).split())})") from e
            finally:
                for l in self.layers:
                    l.mode = saved[l.name]
            macs = counter.macs
        self.input_shape = input_shape
        self.digital_layers = [{"name": name, "op": op, "macs": int(macs.get(node, 0))}
                               for node, name, op in self.digital_nodes]
        return self.digital_layers

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


def build_network(model: nn.Module, input_shape=DEFAULT_INPUT_SHAPE,
                  strict: bool = False) -> Network:
    """Fold BatchNorm, trace with torch.fx, and wrap every Conv2d/Linear in a ``GemmLayer``.

    ``F.linear`` / ``F.conv2d`` called with tensors of the model as weight and bias (e.g.
    ``F.linear(x, self.fc.weight, self.fc.bias)``) become GemmLayers too, named after the
    module owning the weight (``fc``) when it is a Linear / Conv2d used only so, else after the
    tensor. Matrix products pimsim does not put on arrays -- activation x activation
    (``matmul`` / ``@``, ``bmm``, ``einsum``, ``F.scaled_dot_product_attention``, ...),
    functional GEMMs on computed weights, and modules it cannot map (nn.MultiheadAttention,
    LSTM / GRU / RNN, Conv1d / Conv3d / ConvTranspose, Transformer layers) -- run in torch and
    are listed in ``Network.digital_layers`` with their MACs on one example input of
    ``input_shape`` (one sample, e.g. ``(3, 32, 32)``); ``strict=True`` refuses them instead
    (UnsupportedModelError naming the first). A layer called more than once (weight sharing)
    is refused. ``x.view(shape)`` runs as ``x.reshape(shape)`` (the same values; the integer
    backends' channels-last outputs cannot always be viewed)."""
    gm = fold_batchnorm(model)
    modules = dict(gm.named_modules())
    original = dict(model.named_modules())          # gm holds stubs of modules used by get_attr
    called = {}
    attr_uses = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            called[node.target] = called.get(node.target, 0) + 1
        elif node.op == "get_attr":
            attr_uses[node.target] = attr_uses.get(node.target, 0) + len(node.users)
    layers, digital = [], []
    taken = set()                                   # weight tensors / modules already mapped

    def add_layer(name: str, mod: nn.Module) -> GemmLayer:
        if name in taken or any(l.name == name for l in layers):
            raise UnsupportedModelError(
                f"layer {name!r} is called more than once (weight sharing is not supported)")
        taken.add(name)
        layer = GemmLayer(name, mod)
        layers.append(layer)
        return layer

    for node in list(gm.graph.nodes):
        found = _parameter_gemm(gm, node)
        if found is not None:
            x, wt, bt, mod = found
            owner, _, leaf = wt.rpartition(".")
            owner_mod = original.get(owner) if owner else None
            by_owner = (leaf == "weight" and isinstance(owner_mod, (nn.Linear, nn.Conv2d))
                        and owner not in called and attr_uses.get(wt, 0) == 1
                        and (bt is None or bt == f"{owner}.bias")
                        and (owner_mod.bias is None or attr_uses.get(f"{owner}.bias", 0) == 1))
            name = owner if by_owner else wt
            if attr_uses.get(wt, 0) > 1 or name in called or owner in called or wt in taken:
                raise UnsupportedModelError(
                    f"layer {name!r}: its weight is used more than once (weight sharing is "
                    "not supported)")
            layer = add_layer(name, mod)
            taken.add(wt)
            _set_submodule(gm, name, layer)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (x,))
            node.replace_all_uses_with(new)
            args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
            gm.graph.erase_node(node)
            for a in args:
                if a.op == "get_attr" and not a.users:
                    gm.graph.erase_node(a)
            continue
        if (node.op == "call_method" and node.target == "view"
                and not any(isinstance(a, torch.dtype) for a in node.args[1:])):
            node.target = "reshape"     # integer backends give channels-last outputs: a view
            continue                    # of them may need a copy, which reshape makes
        op = _digital_op(node, modules)
        if op is not None:
            if strict:
                raise UnsupportedModelError(
                    f"{'layer' if node.op == 'call_module' else 'node'} {op[0]!r}: {op[1]} is "
                    "not put on crossbar arrays (it would run digitally); strict mode refuses it")
            digital.append((node.name, *op))
            continue
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            layer = add_layer(node.target, mod)
            _set_submodule(gm, node.target, layer)
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no Conv2d or Linear layer")
    gm.graph.lint()
    gm.recompile()
    return Network(gm, layers, digital, input_shape).eval()
