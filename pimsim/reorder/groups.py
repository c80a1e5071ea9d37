"""Channel reordering: permutation groups of a traced network, joint and independent reordering,
segments, random orders and the evolutionary search of the paper.

**Permutation groups** (``find_groups``). Union-find over the channel axis (axis 1) of every
tensor of the traced graph ``Network.gm``. Channel-preserving ops tie their tensor inputs and
output to one group: elementwise activations, ``+ - * /`` (with a scalar, or of two tensors of
equal shape), identity, dropout, pooling, unfolded BatchNorm (whose per-channel parameters are
then permuted too), ``getitem`` that keeps the channel axis whole, and ``flatten`` of an N x C x 1
x 1 tensor (after global pooling). A ``GemmLayer`` *produces* the group of its output and
*consumes* the group of its input. Anything else that touches a tensor (channel pad as in the
CIFAR ResNet option-A shortcut, ``cat``, other views, the network input and output, constants)
FREEZES its groups: they keep the identity order, and ``describe_groups`` says why.
A free group's order ``p`` (new channel i = old channel p[i]) permutes the output rows and bias
of every producer and the input channels of every consumer (for a conv, whole kh*kw column
groups of the im2col matrix: ``weight[:, p]``). The float network's function is unchanged.

**Joint reordering** (``Reorderer``) applies orders to the float network (before calibration)
and keeps the original weights, so orders can be changed or reset at any time; only the layers
of the changed groups are touched (and lose their quantization).

**Independent reordering** (``independent_network``; a study only): every layer gets its own row
order and input-channel order. The returned copy of the network quantizes the permuted matrix
``W[p_out][:, cols(p_in)]`` and runs a runtime gather of its input channels before and the
inverse gather of its output channels after the layer (``ChannelGather`` modules in the graph).
Both fake and kernel paths are thus exact; un-permuting the dequantized weights instead would be
exact for the fake path only (the kernel's tiles must be contiguous blocks of W).

**Segments** (``find_segments``): the GEMM layers between two consecutive residual adds form a
block; blocks joined by a free group are merged, so every free group lies in exactly one
segment. In the CIFAR ResNets the option-A shortcut pads channels, so every residual stream is
frozen and the segments are the residual blocks with their one free group (conv1 output =
conv2 input).

**Evolutionary search** (``evolve``), per segment in network order: population
``population`` (the identity order plus random orders), ``generations`` times {score new orders;
keep the top 50%; breed each replacement from a random survivor by ``swaps`` random
transpositions; replace the worst}; the best order is applied, the segment calibrated for real,
and the search moves on. Seeded with ``numpy.random.default_rng(seed)``: same seed, same orders.

Scoring (``SegmentScorer``) never touches the calibration images: once per segment, the
segment's quantized layers are calibrated at their current order and each layer's input
``x`` and float output ``Y*`` are kept; the activation scale ``s_x`` of PTQ-SL step 1 (which
does not depend on the order: a joint permutation of x's channels and W's columns leaves the
layer output unchanged) and the Gram statistics ``H = Xq Xq^T``, ``Gs = Y* Xq^T``, ... are
formed once. An order permutes them (``P H P^T``, ``P_r Gs P^T``), Algorithm 1 of
``pimsim.ptqsl`` runs on the permuted statistics, and the layer's output error
``||Y* - W^ Xq - b||`` follows from the same quadratic form. The segment score is minus the sum
of these per-layer Euclidean errors. Approximation: each layer's input is the one of the
identity-order calibration (permuted), i.e. the change of upstream quantization noise with the
order, and steps 3-4 of PTQ-SL (second activation search, fallback) are left out of the score.
"""

from __future__ import annotations

import copy
import math
import operator
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from tqdm.auto import tqdm

from ..calibrate import method_params, quantize_layer, record_float_outputs, resolve_float_layers
from ..methods import get_method
from ..network import GemmLayer, Network
from ..ptqsl import (GramEval, LayerProblem, algorithm1, candidate_factors, check_params,
                    fake_quant, search_act_scale)
from ..quant import Granularity, max_scale, qrange

METHODS = ("none", "random", "evolution")
DEFAULTS = {"population": 20, "generations": 30, "swaps": 2, "seed": 0}

# --------------------------------------------------------------------------------------------
# graph analysis
# --------------------------------------------------------------------------------------------

_UNARY_FUNCS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.gelu, F.silu, F.elu, F.leaky_relu,
                torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.hardswish,
                torch.clamp, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                F.adaptive_max_pool2d}
_BINARY_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
                 operator.imul, operator.truediv, operator.itruediv, torch.add, torch.sub,
                 torch.mul, torch.div}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "contiguous", "clone",
                  "detach", "float"}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_FLATTEN_METHODS = {"flatten", "view", "reshape", "squeeze"}
_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
                  nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Hardswish, nn.MaxPool2d,
                  nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_CHANNEL_MODULES = (nn.BatchNorm2d, nn.BatchNorm1d)        # per-channel parameters: permuted
_SHAPE_METHODS = {"size", "dim"}                            # read the shape only


@dataclass
class PermGroup:
    """Tensors whose channel axes share one order, and the layers that order touches."""

    name: str
    size: int
    producers: list[str] = field(default_factory=list)       # GemmLayers: output rows, bias
    consumers: list[str] = field(default_factory=list)       # GemmLayers: input channels
    channel_modules: list[str] = field(default_factory=list)  # e.g. unfolded BatchNorm
    frozen: list[str] = field(default_factory=list)          # why the order is fixed
    nodes: list[str] = field(default_factory=list)

    @property
    def free(self) -> bool:
        return not self.frozen and bool(self.producers)

    @property
    def layers(self) -> list[str]:
        return self.producers + [c for c in self.consumers if c not in self.producers]


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def add(self, a):
        self.parent.setdefault(a, a)

    def find(self, a):
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _shape(node) -> tuple | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _is_tensor(node) -> bool:
    s = _shape(node)
    return s is not None and len(s) >= 2


def _tensor_args(node) -> list:
    out = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) if _is_tensor(a) else None)
    return list(dict.fromkeys(out))


def _describe_op(node, modules) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}()"
    return node.op


def _keeps_channels_getitem(node) -> bool:
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis or i is None or not isinstance(i, slice) for i in idx[:2]):
        return False
    return len(idx) < 2 or idx[1] == slice(None, None, None)


def _flattens_1x1(node) -> bool:
    """``flatten``/``view``/``reshape`` of an N x C x 1 x ... x 1 tensor into N x C."""
    src, dst = _shape(node.args[0]), _shape(node)
    return (src is not None and dst is not None and len(dst) == 2 and len(src) >= 2
            and src[:2] == dst and all(d == 1 for d in src[2:]))


def find_groups(net: Network, example: torch.Tensor | None = None) -> list[PermGroup]:
    """The permutation groups of ``net`` in network order (see the module docstring).

    ``example`` is an input used once to learn the tensor shapes (default: one zero image of
    the first layer's channels, 32 x 32).
    """
    gm = net.gm
    if example is None:
        example = torch.zeros(1, net.layers[0].in_channels, 32, 32)
    saved = {l.name: l.mode for l in net.layers}
    try:
        for l in net.layers:
            l.mode = "float"
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    finally:
        for l in net.layers:
            l.mode = saved[l.name]
    modules = dict(gm.named_modules())
    uf = _UnionFind()
    frozen: dict = {}
    producer_of, consumers, channel_mods = {}, [], []

    def freeze(n, why):
        uf.add(n)
        frozen.setdefault(n, []).append(why)

    for node in gm.graph.nodes:
        if _is_tensor(node) and node.op != "output":
            uf.add(node)
        targs = _tensor_args(node)
        mod = modules.get(node.target) if node.op == "call_module" else None
        if node.op == "placeholder":
            if _is_tensor(node):
                freeze(node, "network input")
            continue
        if node.op == "output":
            for a in targs:
                freeze(a, "network output")
            continue
        if node.op == "get_attr":
            if _is_tensor(node):
                freeze(node, f"constant tensor {node.target!r}")
            continue
        if isinstance(mod, GemmLayer):
            producer_of[node] = mod.name
            src = node.args[0]
            if _is_tensor(src):
                consumers.append((src, mod.name))
                if mod.kind == "linear" and len(_shape(src)) != 2:
                    freeze(src, f"linear layer {mod.name!r} on a {len(_shape(src))}-d input "
                                "(features are not axis 1)")
            continue
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            continue
        why = None
        tie = False
        if isinstance(mod, _UNARY_MODULES) or isinstance(mod, _CHANNEL_MODULES):
            tie = True
            if isinstance(mod, _CHANNEL_MODULES):
                channel_mods.append((node, node.target))
        elif node.op == "call_function" and node.target in _UNARY_FUNCS:
            tie = True
        elif node.op == "call_method" and node.target in _UNARY_METHODS:
            tie = True
        elif ((node.op == "call_function" and node.target in _BINARY_FUNCS)
              or (node.op == "call_method" and node.target in _BINARY_METHODS)):
            shapes = {_shape(a) for a in targs} | {_shape(node)}
            tie = len(shapes) == 1
            if not tie:
                why = "broadcasting between tensors of shapes " + ", ".join(
                    str(list(s)) for s in sorted(shapes, key=str))
        elif node.op == "call_function" and node.target is operator.getitem:
            tie = _is_tensor(node) and _keeps_channels_getitem(node)
        elif ((node.op == "call_function" and node.target is torch.flatten)
              or (node.op == "call_method" and node.target in _FLATTEN_METHODS)
              or isinstance(mod, nn.Flatten)):
            tie = _flattens_1x1(node)
            if not tie:
                why = "reshapes the channel axis (not a flatten of N x C x 1 x 1)"
        if tie and _is_tensor(node):
            for a in targs:
                uf.union(node, a)
            continue
        if not targs and not _is_tensor(node):
            continue
        desc = f"{_describe_op(node, modules)} at node {node.name!r}"
        if why:
            desc += f": {why}"
        for a in targs:
            freeze(a, f"consumed by {desc}")
        if _is_tensor(node):
            freeze(node, f"produced by {desc}")

    # collect groups
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    layer_pos = {l.name: i for i, l in enumerate(net.layers)}
    members: dict = {}
    for n in uf.parent:
        members.setdefault(uf.find(n), []).append(n)
    groups = []
    for root, nodes in members.items():
        nodes.sort(key=order.get)
        prods = sorted({producer_of[n] for n in nodes if n in producer_of}, key=layer_pos.get)
        cons = sorted({c for s, c in consumers if uf.find(s) == root}, key=layer_pos.get)
        cmods = [t for n, t in channel_mods if uf.find(n) == root]
        reasons = list(dict.fromkeys(r for n in nodes for r in frozen.get(n, [])))
        sizes = {_shape(n)[1] for n in nodes}
        if len(sizes) != 1:
            reasons.append(f"channel counts differ: {sorted(sizes)}")
        if not prods and not reasons:
            reasons.append("no GEMM layer produces it")
        name = prods[0] if prods else f"<{nodes[0].name}>"
        groups.append(PermGroup(name, min(sizes), prods, cons, cmods, reasons,
                                [n.name for n in nodes]))
    first = {g.name: min([layer_pos[x] for x in g.producers + g.consumers] or [-1])
             for g in groups}
    groups.sort(key=lambda g: (first[g.name], g.name))
    return groups


def describe_groups(net: Network, groups: list[PermGroup] | None = None) -> str:
    """A text table of the permutation groups: size, free/frozen, producers, consumers, why."""
    groups = find_groups(net) if groups is None else groups
    lines = [f"{'group':<24}{'size':>5}  {'order':<7}producers -> consumers"]
    for g in groups:
        state = "free" if g.free else "frozen"
        lines.append(f"{g.name:<24}{g.size:>5}  {state:<7}{', '.join(g.producers) or '-'} -> "
                     f"{', '.join(g.consumers) or '-'}")
        if g.channel_modules:
            lines.append(f"{'':<38}per-channel modules: {', '.join(g.channel_modules)}")
        for r in g.frozen:
            lines.append(f"{'':<38}frozen: {r}")
    n_free = sum(g.free for g in groups)
    lines.append(f"{n_free} free group(s), {len(groups) - n_free} frozen")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# permutations
# --------------------------------------------------------------------------------------------

def check_order(order, size: int, what: str = "order") -> np.ndarray:
    """``order`` as an int64 array, or ValueError unless it is a permutation of 0..size-1."""
    p = np.asarray(order)
    if p.shape != (size,) or not np.issubdtype(p.dtype, np.integer) \
            or not np.array_equal(np.sort(p), np.arange(size)):
        raise ValueError(f"{what} must be a permutation of 0..{size - 1}, got "
                         f"{np.asarray(order).tolist()!r}"[:300])
    return p.astype(np.int64)


def column_index(order: np.ndarray, kk: int) -> np.ndarray:
    """im2col columns of input-channel order ``order`` when each channel has ``kk = kh*kw``
    columns: whole column groups move together."""
    return (np.asarray(order, dtype=np.int64)[:, None] * kk + np.arange(kk)).reshape(-1)


def _kk(layer: GemmLayer) -> int:
    return layer.K // layer.in_channels


class Reorderer:
    """Joint channel orders on the float network, keeping the original weights.

    ``set_orders({group: order})`` sets the order of free groups (relative to the original
    network); ``reset()`` restores the identity; ``orders`` is the current order of every free
    group. Layers whose weights change lose their quantization.
    """

    def __init__(self, net: Network, groups: list[PermGroup] | None = None):
        self.net = net
        self.groups = find_groups(net) if groups is None else groups
        self.free = {g.name: g for g in self.groups if g.free}
        self._w0 = {l.name: (l.weight.clone(), None if l.bias is None else l.bias.clone())
                    for l in net.layers}
        mods = dict(net.gm.named_modules())
        self._m0 = {t: {k: v.detach().clone() for k, v in
                        list(mods[t].named_parameters(recurse=False))
                        + list(mods[t].named_buffers(recurse=False)) if v.dim() == 1}
                    for g in self.free.values() for t in g.channel_modules}
        self._out = {p: g.name for g in self.free.values() for p in g.producers}
        self._in = {c: g.name for g in self.free.values() for c in g.consumers}
        self.orders = {name: np.arange(g.size) for name, g in self.free.items()}

    def identity(self) -> dict:
        return {name: np.arange(g.size) for name, g in self.free.items()}

    def random_orders(self, rng: np.random.Generator, names=None) -> dict:
        """A uniformly random order for each named free group (default: all)."""
        names = list(self.free) if names is None else names
        return {n: rng.permutation(self.free[n].size) for n in names}

    def reset(self) -> None:
        self.set_orders(self.identity())

    def set_orders(self, orders: dict) -> None:
        """Set the given groups' orders; other groups keep theirs."""
        new = {}
        for name, p in orders.items():
            if name not in self.free:
                frozen = [g.name for g in self.groups if not g.free]
                raise KeyError(f"{name!r} is not a free permutation group; free: "
                               f"{list(self.free)}; frozen: {frozen}")
            new[name] = check_order(p, self.free[name].size, f"order of group {name!r}")
        changed = [n for n, p in new.items() if not np.array_equal(p, self.orders[n])]
        self.orders.update(new)
        layers = {l for n in changed for l in self.free[n].layers}
        for l in self.net.layers:
            if l.name in layers:
                self._rebuild(l)
        mods = dict(self.net.gm.named_modules())
        for n in changed:
            p = torch.from_numpy(self.orders[n])
            for t in self.free[n].channel_modules:
                for k, v in self._m0[t].items():
                    getattr(mods[t], k).data.copy_(v[p])

    def _rebuild(self, l: GemmLayer) -> None:
        w, b = self._w0[l.name]
        if l.name in self._out:
            p = torch.from_numpy(self.orders[self._out[l.name]])
            w = w[p]
            b = None if b is None else b[p]
        if l.name in self._in:
            w = w[:, torch.from_numpy(self.orders[self._in[l.name]])]
        l.set_weight_matrix(w.reshape(l.O, -1).numpy())
        l.bias = None if b is None else b.clone()

    def orders_json(self) -> dict:
        return {n: [int(i) for i in p] for n, p in self.orders.items()}


class ChannelGather(nn.Module):
    """``x[:, index]``: the runtime gather of independent reordering."""

    def __init__(self, index):
        super().__init__()
        self.register_buffer("index", torch.as_tensor(np.asarray(index), dtype=torch.long))

    def forward(self, x):
        return x.index_select(1, self.index)


def independent_network(net: Network, orders: dict) -> Network:
    """A copy of ``net`` (unquantized) where layer ``name`` of ``orders = {name: (row_order,
    in_order)}`` (either may be None) holds ``W[row_order][:, cols(in_order)]``, with a gather
    of its input channels before it and the inverse gather of its output after it."""
    new = copy.deepcopy(net)
    for l in new.layers:
        l.clear_quant()
    gm = new.gm
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name, (pr, pc) in orders.items():
        l = new.layer(name)
        node = nodes[name]
        w, b = l.weight, l.bias
        safe = name.replace(".", "_")
        if pc is not None:
            pc = check_order(pc, l.in_channels, f"input order of {name!r}")
            w = w[:, torch.from_numpy(pc)]
            gname = f"reorder_in_{safe}"
            gm.add_submodule(gname, ChannelGather(pc))
            with gm.graph.inserting_before(node):
                g = gm.graph.call_module(gname, (node.args[0],))
            node.args = (g,) + tuple(node.args[1:])
        if pr is not None:
            pr = check_order(pr, l.O, f"row order of {name!r}")
            w = w[torch.from_numpy(pr)]
            b = None if b is None else b[torch.from_numpy(pr)]
            sname = f"reorder_out_{safe}"
            gm.add_submodule(sname, ChannelGather(np.argsort(pr)))
            with gm.graph.inserting_after(node):
                s = gm.graph.call_module(sname, (node,))
            node.replace_all_uses_with(s, delete_user_cb=lambda u, s=s: u is not s)
        l.set_weight_matrix(w.reshape(l.O, -1).numpy())
        l.bias = None if b is None else b.clone()
    gm.graph.lint()
    gm.recompile()
    return new


def random_independent_orders(net: Network, names, rng: np.random.Generator) -> dict:
    """A random row order and input-channel order for each named layer."""
    return {n: (rng.permutation(net.layer(n).O), rng.permutation(net.layer(n).in_channels))
            for n in names}


# --------------------------------------------------------------------------------------------
# segments
# --------------------------------------------------------------------------------------------

@dataclass
class Segment:
    """Free groups searched together, and the GEMM layers their orders touch."""

    index: int
    groups: list[str]
    layers: list[str]


def find_segments(net: Network, groups: list[PermGroup] | None = None) -> list[Segment]:
    """Segments of the free groups, ordered by their first layer. The GEMM layers between two
    consecutive residual adds form a block; the free groups whose layers all lie in one block
    form that block's segment; a free group spanning several blocks (a residual stream that is
    not frozen, e.g. in ResNet-18 with conv shortcuts) is a segment of its own. Every free group
    is in exactly one segment; a layer may be touched by more than one segment."""
    groups = find_groups(net) if groups is None else groups
    block, n_adds = {}, 0
    for node in net.gm.graph.nodes:
        if node.op == "call_module" and isinstance(net.gm.get_submodule(node.target), GemmLayer):
            block[node.target] = n_adds
        is_add = ((node.op == "call_function" and node.target in _ADD_FUNCS)
                  or (node.op == "call_method" and node.target in ("add", "add_")))
        if is_add and sum(isinstance(a, fx.Node) for a in node.args) >= 2:
            n_adds += 1
    pos = {l.name: i for i, l in enumerate(net.layers)}
    segs: dict = {}
    for g in groups:
        if not g.free:
            continue
        ids = {block[l] for l in g.layers}
        key = ("block", ids.pop()) if len(ids) == 1 else ("group", g.name)
        segs.setdefault(key, []).append(g)
    out = []
    for key, gs in segs.items():
        layers = sorted({l for g in gs for l in g.layers}, key=pos.get)
        out.append((pos[layers[0]], pos[layers[-1]], [g.name for g in gs], layers))
    out.sort(key=lambda t: t[:2])
    return [Segment(i, g, l) for i, (_, _, g, l) in enumerate(out)]


# --------------------------------------------------------------------------------------------
# scoring orders without the samples
# --------------------------------------------------------------------------------------------

def permute_stats(st: dict, bias: np.ndarray, rows, cols) -> tuple[dict, np.ndarray]:
    """Gram statistics (``LayerProblem.gram_stats``) and bias of the layer whose output rows
    are reordered by ``rows`` and im2col columns by ``cols`` (None: unchanged):
    ``H -> P H P^T``, ``Gs -> P_r Gs P^T``, ``u -> P u``, ``ys, yy, b -> P_r (.)``."""
    H, Gs, u, ys, yy = st["H"], st["Gs"], st["u"], st["ys"], st["yy"]
    if cols is not None:
        H = H[np.ix_(cols, cols)]
        Gs = Gs[:, cols]
        u = u[cols]
    if rows is not None:
        Gs, ys, yy, bias = Gs[rows], ys[rows], yy[rows], bias[rows]
    return {"H": H, "Gs": Gs, "u": u, "ys": ys, "yy": yy, "N": st["N"]}, bias


def gram_error(W_hat: np.ndarray, st: dict, bias: np.ndarray) -> float:
    """``||Y* - W^ Xq - b 1^T||`` (Euclidean, over all samples) from the Gram statistics."""
    r2 = st["yy"] - 2 * bias * st["ys"] + st["N"] * bias * bias
    G = st["Gs"] - np.outer(bias, st["u"])
    e2 = float(r2.sum() - 2 * (W_hat * G).sum() + (W_hat * (W_hat @ st["H"])).sum())
    return math.sqrt(max(e2, 0.0))


def ptqsl_weight_error(W: np.ndarray, grid, w_bits: int, factors: np.ndarray, rounds: int,
                       st: dict, bias: np.ndarray,
                       symmetric: bool = False) -> tuple[float, np.ndarray]:
    """Algorithm 1 (Euclidean) on Gram statistics, then the resulting output error and scales."""
    S, _ = algorithm1(W, grid, w_bits, factors, rounds, GramEval(st, bias, "euclidean"),
                      "euclidean", symmetric=symmetric)
    lo, hi = qrange(w_bits, symmetric)
    return gram_error(fake_quant(W, grid.expand(S), lo, hi), st, bias), S


class LayerScorer:
    """One quantized layer of a segment: its statistics at the current (identity) order and
    the output error of PTQ-SL weights under other orders."""

    def __init__(self, layer: GemmLayer, x: torch.Tensor, target: torch.Tensor,
                 gran: Granularity, w_bits: int, a_bits: int, params: dict | None = None):
        p = check_params({**(params or {}), "metric": "euclidean", "mode": "gram"})
        self.name, self.kk = layer.name, _kk(layer)
        self.grid = gran.resolve(layer.O, layer.K)
        self.w_bits, self.rounds, self.symmetric = w_bits, p["rounds"], p["symmetric"]
        self.factors = candidate_factors(p)
        prob = LayerProblem(layer, x, target, a_bits, self.symmetric)
        W32 = layer.weight_matrix()
        self.W = W32.astype(np.float64)
        s_max = float(max_scale(prob.x_absmax, a_bits))
        self.act_scale, _, _ = search_act_scale(prob, W32, self.factors * s_max, s_max,
                                                "euclidean", p["act_search"])
        self.stats = prob.gram_stats(self.act_scale)
        self.bias = prob.bias

    def error(self, rows=None, in_order=None) -> float:
        """PTQ-SL output error with output rows in order ``rows`` and input channels in order
        ``in_order`` (relative to the order the statistics were taken at)."""
        cols = None if in_order is None else column_index(in_order, self.kk)
        st, b = permute_stats(self.stats, self.bias, rows, cols)
        W = self.W
        if rows is not None:
            W = W[rows]
        if cols is not None:
            W = W[:, cols]
        return ptqsl_weight_error(W, self.grid, self.w_bits, self.factors, self.rounds, st, b,
                                  self.symmetric)[0]


class SegmentScorer:
    """Score = -(sum of the PTQ-SL output errors of the segment's quantized layers)."""

    def __init__(self, scorers: list[LayerScorer], reorderer: Reorderer):
        self.scorers = scorers
        self.out = {s.name: reorderer._out.get(s.name) for s in scorers}
        self.inp = {s.name: reorderer._in.get(s.name) for s in scorers}
        self.base = {n: reorderer.orders[n].copy() for n in reorderer.orders}
        self.evaluations = 0

    def score(self, orders: dict) -> float:
        """``orders``: absolute orders of the segment's groups (others at the base order)."""
        self.evaluations += 1
        total = 0.0
        for s in self.scorers:
            rows = self._rel(orders, self.out[s.name])
            cols = self._rel(orders, self.inp[s.name])
            total += s.error(rows, cols)
        return -total

    def _rel(self, orders, group):
        """The order relative to the one the statistics were taken at."""
        if group is None or group not in orders:
            return None
        rel = np.argsort(self.base[group])[orders[group]]
        return None if np.array_equal(rel, np.arange(len(rel))) else rel


# --------------------------------------------------------------------------------------------
# segment-wise calibration
# --------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def calibrate_layers(net: Network, images: torch.Tensor, names: list[str], gran: Granularity,
                     w_bits: int, a_bits: int, method: str = "ptqsl", params: dict | None = None,
                     record=(), stop_after: str | None = None) -> dict:
    """Calibrate the named layers (in network order, each seeing the earlier quantized layers
    in fake mode) in one forward pass that stops after ``stop_after`` (default: the last named
    layer). Returns ``{name: (input, float target)}`` for the layers in ``record``."""
    m = get_method(method)
    params = dict(params or {})
    names = [l.name for l in net.layers if l.name in set(names)]
    need = set(record) | (set(names) if m.needs_target else set())
    targets = record_float_outputs(net, images, need) if need else {}
    for n in names:
        net.layer(n).clear_quant()
    pos = {l.name: i for i, l in enumerate(net.layers)}
    last = stop_after or max(list(names) + list(record), key=pos.get, default=None)
    kept = {}

    def hook(layer, x):
        layer.hook = None
        t = targets.get(layer.name)
        if layer.name in record:
            kept[layer.name] = (x, t)
        if layer.name in names:
            quantize_layer(m.fn, layer, x, t, gran, w_bits, a_bits, params)
        if layer.name == last:
            raise _Stop
        return None

    hooked = set(names) | set(record) | ({last} if last else set())
    if not hooked:
        return kept
    try:
        net.run_with_hooks(images, {n: hook for n in hooked})
    except _Stop:
        pass
    return kept


# --------------------------------------------------------------------------------------------
# the evolutionary search
# --------------------------------------------------------------------------------------------

def check_search_params(population, generations, swaps, seed) -> None:
    for v, what, lo in ((population, "population", 2), (generations, "generations", 0),
                        (swaps, "swaps", 1), (seed, "seed", 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"reorder {what} must be an integer >= {lo}, got {v!r}")


def _mutate(parent: dict, sizes: dict, swaps: int, rng: np.random.Generator) -> dict:
    """A copy of ``parent`` with ``swaps`` random transpositions (group drawn by size)."""
    child = {n: p.copy() for n, p in parent.items()}
    names = [n for n in child if sizes[n] > 1]
    if not names:
        return child
    w = np.array([sizes[n] for n in names], dtype=np.float64)
    for _ in range(swaps):
        n = names[int(rng.choice(len(names), p=w / w.sum()))] if len(names) > 1 else names[0]
        i, j = rng.choice(sizes[n], size=2, replace=False)
        child[n][i], child[n][j] = child[n][j], child[n][i]
    return child


def evolve_segment(scorer: SegmentScorer, sizes: dict, base: dict, population: int,
                   generations: int, swaps: int, rng: np.random.Generator, bar=None) -> dict:
    """The evolutionary search of one segment. Returns best orders, scores and counts."""
    def key(o):
        return b"".join(o[n].tobytes() for n in sorted(o))

    cache = {}

    def score(o):
        k = key(o)
        if k not in cache:
            cache[k] = scorer.score(o)
        return cache[k]

    pop = [{n: p.copy() for n, p in base.items()}]
    pop += [{n: rng.permutation(sizes[n]) for n in base} for _ in range(population - 1)]
    scores = [score(o) for o in pop]
    base_score = scores[0]
    keep = population - population // 2
    history = [max(scores)]
    for _ in range(generations):
        rank = sorted(range(len(pop)), key=lambda i: -scores[i])      # stable: ties keep order
        pop, scores = [pop[i] for i in rank[:keep]], [scores[i] for i in rank[:keep]]
        while len(pop) < population:
            child = _mutate(pop[int(rng.integers(keep))], sizes, swaps, rng)
            pop.append(child)
            scores.append(score(child))
        history.append(max(scores))
        if bar is not None:
            bar.update(1)
    best = max(range(len(pop)), key=lambda i: (scores[i], -i))
    return {"orders": pop[best], "score": scores[best], "identity_score": base_score,
            "history": history, "evaluations": len(cache)}


def evolve(net: Network, images: torch.Tensor, gran: Granularity, w_bits: int, a_bits: int,
           method: str = "ptqsl", params: dict | None = None, float_layers="auto",
           population: int = 20, generations: int = 30, swaps: int = 2, seed: int = 0,
           progress: bool = True, reorderer: Reorderer | None = None,
           symmetric: bool = False) -> dict:
    """Evolutionary channel reordering per segment, in network order (module docstring).
    ``symmetric``: calibrate and score in the symmetric integer range of crossbar arrays.

    Leaves ``net`` with the chosen joint orders and every non-float layer calibrated by
    ``method``. Returns ``{"method", "orders", "segments", "search_s", "scoring_s", ...}``
    (``search_s``: the whole call, calibrations included).
    """
    check_search_params(population, generations, swaps, seed)
    t_start = time.perf_counter()
    ro = reorderer or Reorderer(net)
    segs = find_segments(net, ro.groups)
    keep = resolve_float_layers(net, float_layers)
    todo = [l.name for l in net.layers if l.name not in keep]
    for l in net.layers:
        l.clear_quant()
    pos = {l.name: i for i, l in enumerate(net.layers)}
    rng = np.random.default_rng(seed)
    calib_params = method_params(params, symmetric)
    search_params = {k: v for k, v in calib_params.items() if k != "metric"}
    seg_info = []
    bar = tqdm(total=generations * len(segs), desc="reorder (evolution)", disable=not progress,
               leave=False, unit="gen")
    t_search = 0.0
    try:
        for seg in segs:
            qlayers = [n for n in seg.layers if n not in keep]
            info = {"segment": seg.index, "groups": seg.groups, "layers": seg.layers}
            if not qlayers:
                seg_info.append({**info, "skipped": "all its layers stay in float"})
                bar.update(generations)
                continue
            # calibrate (at the current orders) whatever the segment's inputs depend on
            end = max(pos[n] for n in seg.layers)
            upto = [n for n in todo if pos[n] <= end and net.layer(n).quant is None]
            kept = calibrate_layers(net, images, upto, gran, w_bits, a_bits, method,
                                    calib_params, record=qlayers)
            t0 = time.perf_counter()
            scorers = [LayerScorer(net.layer(n), *kept[n], gran, w_bits, a_bits, search_params)
                       for n in qlayers]
            del kept
            sc = SegmentScorer(scorers, ro)
            sizes = {g: ro.free[g].size for g in seg.groups}
            base = {g: ro.orders[g].copy() for g in seg.groups}
            res = evolve_segment(sc, sizes, base, population, generations, swaps, rng, bar)
            t_search += time.perf_counter() - t0
            changed = [g for g in seg.groups if not np.array_equal(res["orders"][g], base[g])]
            ro.set_orders(res["orders"])
            if changed:     # the touched layers and all after them see new inputs
                first = min(pos[l] for g in changed for l in ro.free[g].layers)
                for n in todo:
                    if pos[n] >= first:
                        net.layer(n).clear_quant()
            seg_info.append({**info, "identity_score": res["identity_score"],
                             "score": res["score"], "evaluations": res["evaluations"],
                             "history": [float(h) for h in res["history"]]})
        rest = [n for n in todo if net.layer(n).quant is None]
        if rest:
            calibrate_layers(net, images, rest, gran, w_bits, a_bits, method, calib_params)
    finally:
        bar.close()
    net.set_mode("fake")
    return {"method": "evolution", "orders": ro.orders_json(), "segments": seg_info,
            "search_s": time.perf_counter() - t_start, "scoring_s": t_search,
            "population": population, "generations": generations, "swaps": swaps, "seed": seed}
