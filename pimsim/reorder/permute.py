"""Applying channel orders: joint orders on the float network, independent orders with runtime
gathers, and the permutation helpers both use.

**Joint reordering** (``Reorderer``) applies orders to the float network (before calibration)
and keeps the original weights, so orders can be changed or reset at any time; only the layers
of the changed groups are touched (and lose their quantization).

**Independent reordering** (``independent_network``; a study only): every layer gets its own row
order and input-channel order. The returned copy of the network quantizes the permuted matrix
``W[p_out][:, cols(p_in)]`` and runs a runtime gather of its input channels before and the
inverse gather of its output channels after the layer (``ChannelGather`` modules in the graph).
Both fake and kernel paths are thus exact; un-permuting the dequantized weights instead would be
exact for the fake path only (the kernel's tiles must be contiguous blocks of W).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from ..network import GemmLayer, Network
from .groups import PermGroup, find_groups


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

    def output_group(self, layer: str) -> str | None:
        """The free group whose order permutes ``layer``'s output rows (None: no free group)."""
        return self._out.get(layer)

    def input_group(self, layer: str) -> str | None:
        """The free group whose order permutes ``layer``'s input channels (None: none)."""
        return self._in.get(layer)

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
