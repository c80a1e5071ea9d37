"""Calibration: choose every quantized layer's tile scales and activation scale.

Layers are calibrated in network order in one pass over the calibration batch: when the pass
reaches a layer, all earlier layers are already quantized, so the layer sees the input the
quantized network really gives it; it picks its scales, quantizes itself, and its quantized
output feeds the next layer. The method is looked up by name in ``pimsim.methods`` (built in:
``max``, ``mse``, ``ptqsl``; ``register_method`` adds more).

Methods that need the float network's output of the layer (``ptqsl``) get it from the same
pass: ``run_lockstep`` runs the float and the quantized network side by side through the
traced graph (two environments of values, each value freed after its last use, a value shared
while both networks still agree), so at a layer it has both the quantized input and the float
target, and no target is held beyond its layer. Memory: about two forward passes' live values
plus one layer's calibration, instead of every layer's float output at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import time

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .methods import get_method
from .network import GemmLayer, LayerQuant, Network
from .quant import ACT_SIGNED, Granularity, act_unsigned

_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul,
                      operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
                      operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul}


def _may_mutate(node: fx.Node, modules: dict) -> bool:
    """Whether ``node`` may change one of its inputs in place (conservative: an ``inplace``
    module or argument, a ``..._`` method or function, ``setitem``, ``+=`` and the like)."""
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__") or name == "__setitem__"
    if node.op != "call_function":
        return False
    t = node.target
    if t in _INPLACE_FUNCTIONS or node.kwargs.get("inplace", False):
        return True
    name = getattr(t, "__name__", "")
    if name.endswith("_") and not name.startswith("__"):
        return True
    try:
        bound = inspect.signature(t).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bool(bound.arguments.get("inplace", False))


def _tensors(v):
    """The tensors in a (possibly nested) value."""
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (list, tuple)):
        for e in v:
            yield from _tensors(e)
    elif isinstance(v, dict):
        for e in v.values():
            yield from _tensors(e)


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, (list, tuple)):
        out = [_clone(e) for e in v]
        return type(v)(*out) if hasattr(v, "_fields") else type(v)(out)
    if isinstance(v, dict):
        return {k: _clone(e) for k, e in v.items()}
    return v


def _overlap(a, b) -> bool:
    """Whether values ``a`` and ``b`` hold tensors on the same storage."""
    pa = {t.untyped_storage().data_ptr() for t in _tensors(a)}
    return any(t.untyped_storage().data_ptr() in pa for t in _tensors(b))


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def run_lockstep(net: Network, images: torch.Tensor, visit: dict, targets=(),
                 stop_after: str | None = None) -> list[str]:
    """Run the quantized network (its layers in their modes) and, where needed, the float
    network (every GEMM layer ``float_forward``) side by side on ``images``, node by node
    through ``net.gm``'s graph, without gradients.

    ``visit[name](layer, x, target)`` is called when the pass reaches that layer, with its
    input ``x`` in the quantized network and, if ``name`` is in ``targets``, its output in the
    float network (else None); afterwards the layer runs on ``x`` in whatever mode ``visit``
    left it, and its output feeds the quantized network. ``x`` and ``target`` are the pass's
    own values: a later in-place op of the model (``ReLU(inplace=True)``) may change them, so
    a visitor that keeps them clones them. The pass ends after ``stop_after`` (default: the
    last layer in ``visit`` or ``targets``). The float network is computed only for the values
    the targets depend on; a value is held once while both networks agree on it (no quantized
    layer upstream) and dropped after its last use. Returns the visited layer names, in order.
    """
    gm = net.gm
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    layer_of = {n: modules[n.target] for n in nodes
                if n.op == "call_module" and isinstance(modules[n.target], GemmLayer)}
    node_of = {l.name: n for n, l in layer_of.items()}
    targets = set(targets)
    wanted = set(visit) | targets
    unknown = sorted(wanted - set(node_of)) + ([stop_after] if stop_after is not None
                                                and stop_after not in node_of else [])
    if unknown:
        raise ValueError(f"no GEMM layer named {unknown}; layers: {sorted(node_of)}")
    if stop_after is None:
        if not wanted:
            return []
        stop = max((node_of[n] for n in wanted), key=nodes.index)
    else:
        stop = node_of[stop_after]
    order = nodes[:nodes.index(stop) + 1]
    # float values needed: everything the targets' inputs depend on
    need_f, stack = set(), [node_of[n] for n in targets]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in need_f:
                need_f.add(a)
                stack.append(a)
    last = {}
    for n in order:
        for a in n.all_input_nodes:
            last[a] = n
    env_q: dict = {}            # the quantized network's values
    env_f: dict = {}            # the float network's, where they differ (``diverged``)
    diverged: set = set()
    placeholders = iter([images])
    done = []

    def fval(a):
        return env_f[a] if a in diverged else env_q[a]

    def run(n, args, kwargs, float_net: bool):
        if n.op == "call_module":
            m = modules[n.target]
            if float_net and isinstance(m, GemmLayer):
                return m.float_forward(*args, **kwargs)
            return m(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, n.target)(*rest, **kwargs)
        raise RuntimeError(f"node {n.name}: unexpected op {n.op!r}")

    with torch.no_grad():
        for n in order:
            if n.op == "placeholder":
                v = next(placeholders, None)
                if v is None:
                    if not n.args:
                        raise ValueError(f"node {n.name}: the network takes more than one input")
                    v = n.args[0]
                env_q[n] = v
            elif n.op == "get_attr":
                env_q[n] = _fetch_attr(gm, n.target)
            elif n.op == "output":
                break
            else:
                is_div = any(a in diverged for a in n.all_input_nodes)
                if is_div and _may_mutate(n, modules):
                    # the node runs in both networks and may change its inputs in place: the
                    # float network gets its own copy of every input value it still needs
                    for a in n.all_input_nodes:
                        if a not in need_f:
                            continue
                        if a not in diverged:
                            env_f[a] = _clone(env_q[a])
                            diverged.add(a)
                        elif _overlap(env_f[a], env_q[a]):
                            env_f[a] = _clone(env_f[a])
                args_q = fx.node.map_arg(n.args, lambda a: env_q[a])
                kwargs_q = fx.node.map_arg(n.kwargs, lambda a: env_q[a])
                layer = layer_of.get(n)
                if layer is not None and layer.name in wanted:
                    t = None
                    if layer.name in targets or n in need_f:
                        args_f = fx.node.map_arg(n.args, fval)
                        kwargs_f = fx.node.map_arg(n.kwargs, fval)
                        t = layer.float_forward(*args_f, **kwargs_f)
                    if layer.name in visit:
                        visit[layer.name](layer, args_q[0],
                                          t if layer.name in targets else None)
                        done.append(layer.name)
                    env_q[n] = layer(*args_q, **kwargs_q)
                    diverged.add(n)
                    if n in need_f:
                        env_f[n] = t
                elif (not is_div and (layer is None or layer.mode == "float")):
                    env_q[n] = run(n, args_q, kwargs_q, False)          # both networks agree
                else:
                    f = None
                    if n in need_f:
                        args_f = fx.node.map_arg(n.args, fval)
                        kwargs_f = fx.node.map_arg(n.kwargs, fval)
                        f = run(n, args_f, kwargs_f, True)
                    env_q[n] = run(n, args_q, kwargs_q, False)
                    diverged.add(n)
                    if n in need_f:
                        env_f[n] = f
            # drop what no later node of the pass reads
            for a in n.all_input_nodes:
                if last.get(a) is n:
                    env_q.pop(a, None)
                    env_f.pop(a, None)
            if n not in last:
                env_q.pop(n, None)
                env_f.pop(n, None)
    return done


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
                   w_bits: int, a_bits: int, params: dict, act_signed: str = "signed") -> None:
    """Quantize ``layer`` with method ``fn`` on its input ``x`` (and float output ``target``)
    and put it in fake mode, so that its quantized output feeds the next layer.
    ``params["symmetric"]`` holds whatever the method does with it. ``act_signed``
    (``quant.act_signed``): whether the input is quantized unsigned, ``[0, 2^b - 1]``
    (``pimsim.quant.act_unsigned`` of the calibration input's minimum); the method gets
    ``params["act_unsigned"] = True`` then (and the result is marked unsigned)."""
    unsigned = act_unsigned(act_signed, layer.name, float(x.min()) if x.numel() else 0.0)
    if unsigned:
        params = {**params, "act_unsigned": True}
    q = fn(layer, x, target, gran, w_bits, a_bits, params)
    if q.act_unsigned != unsigned:
        q = dataclasses.replace(q, act_unsigned=unsigned)
    layer.set_quant(symmetric_quant(q, bool(params.get("symmetric", False))))
    layer.mode = "fake"


def calibrate(net: Network, images: torch.Tensor, gran: Granularity, w_bits: int, a_bits: int,
              method: str = "max", float_layers="auto", progress: bool = True,
              params: dict | None = None, symmetric: bool = False,
              act_signed: str = "signed") -> dict:
    """Quantize every GEMM layer of ``net`` except ``float_layers``, in network order.

    ``images`` is the (normalized) calibration batch; ``params`` method options;
    ``symmetric``: integers in ``[-(2^(b-1)-1), 2^(b-1)-1]``, the range crossbar arrays store
    (the methods search their scales for it); ``act_signed``: ``signed`` (default), ``unsigned``
    or ``auto``, the activation range per layer (``quantize_layer``).
    Returns ``{"calibration_s", "float_layers"}``.
    """
    m = get_method(method)
    if act_signed not in ACT_SIGNED:
        raise ValueError(f"quant.act_signed must be one of {', '.join(ACT_SIGNED)}, "
                         f"got {act_signed!r}")
    params = method_params(params, symmetric)
    if m.check_params is not None:
        m.check_params(params)                    # fail before the pass, not at its first layer
    keep = resolve_float_layers(net, float_layers)
    todo = [l for l in net.layers if l.name not in keep]
    for l in net.layers:
        l.clear_quant()
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"calibrate ({method})", disable=not progress, leave=False)

    def visit(layer: GemmLayer, x: torch.Tensor, target):
        quantize_layer(m.fn, layer, x, target, gran, w_bits, a_bits, params, act_signed)
        bar.update(1)

    try:
        run_lockstep(net, images, {l.name: visit for l in todo},
                     targets={l.name for l in todo} if m.needs_target else ())
    finally:
        bar.close()
    missed = [l.name for l in todo if l.quant is None]
    if missed:
        raise RuntimeError(f"layers never reached by the forward pass: {missed}")
    return {"calibration_s": time.perf_counter() - t0,
            "float_layers": [l.name for l in net.layers if l.name in keep]}

