"""Graph analysis of channel reordering: permutation groups and segments of a traced network.

**Permutation groups** (``find_groups``). Union-find over the channel axis (axis 1) of every
tensor of the traced graph ``Network.gm``. Channel-preserving ops tie their tensor inputs and
output to one group: elementwise activations, ``+ - * /`` (with a scalar, or of two tensors of
equal shape), identity, dropout, pooling, unfolded BatchNorm (whose per-channel parameters are
then permuted too), ``getitem`` that keeps the channel axis whole, and ``flatten`` of an N x C x 1
x 1 tensor (after global pooling). A ``GemmLayer`` *produces* the group of its output and
*consumes* the group of its input. Anything else that touches a tensor (channel pad as in the
CIFAR ResNet option-A shortcut, ``cat``, other views, the network input and output, constants)
FREEZES its groups: they keep the identity order, and ``describe_groups`` says why.
Grouped convolutions: a depthwise conv with one output per channel (``groups = in_channels
= out_channels``) computes output channel i from input channel i alone, so it ties its input
and output into one group, like an elementwise op; it is a producer of that group (its
filters and bias move with the order) but not a consumer (no im2col column moves: each
filter reads its own channel wherever it sits). Any other grouped conv (fewer groups, or a
channel multiplier) FREEZES its input and its output: a permutation would have to keep every
channel inside its group and the groups' orders consistent with each other.
A free group's order ``p`` (new channel i = old channel p[i]) permutes the output rows and bias
of every producer and the input channels of every consumer (for a conv, whole kh*kw column
groups of the im2col matrix: ``weight[:, p]``). The float network's function is unchanged.

**Segments** (``find_segments``): the GEMM layers between two consecutive residual adds form a
block; blocks joined by a free group are merged, so every free group lies in exactly one
segment. In the CIFAR ResNets the option-A shortcut pads channels, so every residual stream is
frozen and the segments are the residual blocks with their one free group (conv1 output =
conv2 input).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..network import GemmLayer, Network

# --------------------------------------------------------------------------------------------
# permutation groups
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
            if getattr(mod, "groups", 1) > 1:
                if mod.groups == mod.in_channels == mod.O and _is_tensor(src):
                    uf.union(node, src)         # depthwise: channel i -> channel i
                else:
                    why = f"grouped convolution {mod.name!r} (groups={mod.groups})"
                    if _is_tensor(src):
                        freeze(src, f"input of {why}")
                    freeze(node, f"output of {why}")
                continue
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
