"""ONNX export of a calibrated network: the fake-quant network as an opset-21 QDQ graph.

``export_onnx(net, path)`` walks pimsim's own traced graph (``Network.gm``, the torch.fx graph
with BatchNorm folded and every Conv2d / Linear a ``GemmLayer``) and writes one ONNX node (or a
few) per graph node with ``onnx.helper``; it does not go through ``torch.onnx.export``.

A quantized layer (``GemmLayer.quant`` set) becomes

- on its input: ``QuantizeLinear`` (scale = the activation scale, zero point 0, int8 for
  ``a_bits <= 8`` else int16) -> ``DequantizeLinear``, then a ``Clip`` to
  ``[lo * s_x, hi * s_x]`` when the integer range ``qrange(a_bits, symmetric)`` is narrower
  than the type's (e.g. 4-bit activations, or the symmetric crossbar range): exactly
  ``round(x / s_x).clamp(lo, hi) * s_x`` of the ``fake`` backend;
- its weight: the stored integers (``GemmLayer.wq``, int8 / int16) -> ``DequantizeLinear`` with
  opset-21 blocked quantization: one scale per (row, block of ``c`` columns of K), i.e. each
  tile's scale repeated over its r rows. A convolution's weight (O, Cin/g, kh, kw) is blocked
  along the input channels (axis 1, ``block_size = c / (kh*kw)``, the scale tensor repeated
  over kh, kw) when ``c`` is a multiple of ``kh*kw``; otherwise the layer is exported as
  im2col + MatMul: a ``Conv`` with a constant one-hot kernel gives the K im2col columns in
  ``weight.reshape(O, -1)`` order (exact: every output is one input times 1), and the (O, K)
  weight blocked along axis 1 with ``block_size = c`` multiplies them (``MatMul``); for a
  grouped convolution the one-hot ``Conv`` has ``group = G`` (each group's K columns in turn)
  and a batched ``MatMul`` (N, G, L, K) x (G, K, Og) multiplies each group's columns by its
  own rows of the blocked weight;
- then ``Conv`` (or ``MatMul`` + ``Add`` for a Linear) with the float bias.

Channel orders of reordering are already in the network's weights (``Reorderer`` permutes the
float network), so they are baked into the exported weights. Float layers are plain
``Conv`` / ``MatMul`` nodes. ONNX has no way to say what the crossbar does beyond that:
ADC clipping and resolution, bit slicing, array-level partial sums and their limits are not in
the graph; the exported model is the ``fake`` backend's network (dequantized weights on
dequantized inputs, float32), not the ``kernel`` / ``crossbar`` arithmetic.

Graph nodes translated: placeholder, output, get_attr (constants), GemmLayer, ReLU / relu,
add / sub / mul, Identity / Dropout, flatten / Flatten, view / reshape with constant shapes,
getitem with slices, F.pad (constant), cat, AdaptiveAvgPool2d(1) / adaptive_avg_pool2d(x, 1),
AvgPool2d, MaxPool2d, mean over the spatial dims, BatchNorm2d (unfolded), Sigmoid, Tanh,
ReLU6 / hardtanh. Anything else: ``UnsupportedModelError`` naming the node.
"""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .network import GemmLayer, Network, UnsupportedModelError
from .quant import act_qrange

OPSET = 21
IR_VERSION = 10
INPUT = "input"
OUTPUT = "logits"
_INT64_MAX = np.iinfo(np.int64).max


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'pimsim[onnx]' "
                          "(or pip install onnx onnxruntime)") from None
    return onnx, TensorProto, helper, numpy_helper


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _Builder:
    def __init__(self, net: Network):
        self.onnx, self.TP, self.helper, self.nh = _onnx()
        self.net = net
        self.nodes, self.inits = [], []
        self.names: dict = {}           # fx node -> ONNX value name
        self.n = 0
        self.shapes: dict = {}          # GemmLayer name -> input shape on the example
        self.out_shapes: dict = {}      # GemmLayer name -> output shape on the example
        self.layer_io: dict = {}        # GemmLayer name -> (ONNX input, ONNX output) names

    def fresh(self, base: str) -> str:
        self.n += 1
        return f"{base.replace('.', '_')}_{self.n}"

    def const(self, arr, base: str) -> str:
        name = self.fresh(base)
        self.inits.append(self.nh.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs, base: str, **attrs) -> str:
        out = self.fresh(base)
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    # -- quantized input --------------------------------------------------------------------
    def act_qdq(self, x: str, layer: GemmLayer) -> str:
        q = layer.quant
        lo, hi = act_qrange(q.a_bits, q.symmetric, q.act_unsigned)
        if q.act_unsigned:
            dt = np.uint8 if q.a_bits <= 8 else np.uint16
        else:
            dt = np.int8 if q.a_bits <= 8 else np.int16
        s = self.const(np.array(q.act_scale, dtype=np.float32), f"{layer.name}.act_scale")
        zp = self.const(np.array(0, dtype=dt), f"{layer.name}.act_zero_point")
        xq = self.node("QuantizeLinear", [x, s, zp], f"{layer.name}.input_q")
        xd = self.node("DequantizeLinear", [xq, s, zp], f"{layer.name}.input_dq")
        info = np.iinfo(dt)
        if (lo, hi) != (info.min, info.max):
            s32 = np.float32(q.act_scale)
            mn = self.const(np.array(np.float32(lo) * s32, dtype=np.float32), f"{layer.name}.lo")
            mx = self.const(np.array(np.float32(hi) * s32, dtype=np.float32), f"{layer.name}.hi")
            xd = self.node("Clip", [xd, mn, mx], f"{layer.name}.input_clip")
        return xd

    def weight_dq(self, layer: GemmLayer, shape4: bool) -> tuple[str, str]:
        """The dequantized weight: (value name, 'conv' | 'matrix')."""
        q, g = layer.quant, layer.quant.grid
        rows = np.asarray(q.w_scales, dtype=np.float64)[g.row_block_index()]   # (O, ncb)
        rows = rows.astype(np.float32)
        wq = np.ascontiguousarray(layer.wq)
        if shape4:
            kh, kw = layer.kernel_size
            kk = kh * kw
            cin = layer.K // kk
            scale = np.ascontiguousarray(np.broadcast_to(
                rows[:, :, None, None], (layer.O, rows.shape[1], kh, kw)))
            wi = self.const(wq.reshape(layer.O, cin, kh, kw), f"{layer.name}.weight_int")
            si = self.const(scale, f"{layer.name}.weight_scale")
            return self.node("DequantizeLinear", [wi, si], f"{layer.name}.weight", axis=1,
                             block_size=g.c // kk), "conv"
        wi = self.const(wq, f"{layer.name}.weight_int")
        si = self.const(np.ascontiguousarray(rows), f"{layer.name}.weight_scale")
        return self.node("DequantizeLinear", [wi, si], f"{layer.name}.weight", axis=1,
                         block_size=g.c), "matrix"

    # -- layers -----------------------------------------------------------------------------
    def conv_attrs(self, layer: GemmLayer) -> dict:
        ph, pw = layer.padding
        return {"kernel_shape": list(layer.kernel_size), "strides": list(layer.stride),
                "pads": [ph, pw, ph, pw], "dilations": list(layer.dilation),
                "group": layer.groups}

    def gemm_layer(self, layer: GemmLayer, x: str) -> str:
        bias = None if layer.bias is None else self.const(
            layer.bias.detach().numpy().astype(np.float32), f"{layer.name}.bias")
        if layer.quant is None:
            if layer.kind == "conv":
                w = self.const(layer.weight.numpy().astype(np.float32), f"{layer.name}.weight")
                return self.node("Conv", [x, w] + ([bias] if bias else []), layer.name,
                                 **self.conv_attrs(layer))
            w = self.const(np.ascontiguousarray(layer.weight.numpy().T), f"{layer.name}.weight_t")
            y = self.node("MatMul", [x, w], layer.name)
            return self.node("Add", [y, bias], f"{layer.name}.bias_add") if bias else y
        xd = self.act_qdq(x, layer)
        if layer.kind == "linear":
            w, _ = self.weight_dq(layer, shape4=False)
            wt = self.node("Transpose", [w], f"{layer.name}.weight_t", perm=[1, 0])
            y = self.node("MatMul", [xd, wt], layer.name)
            return self.node("Add", [y, bias], f"{layer.name}.bias_add") if bias else y
        kh, kw = layer.kernel_size
        if layer.quant.grid.c % (kh * kw) == 0:
            w, _ = self.weight_dq(layer, shape4=True)
            return self.node("Conv", [xd, w] + ([bias] if bias else []), layer.name,
                             **self.conv_attrs(layer))
        return self.im2col_layer(layer, xd, bias)

    def im2col_layer(self, layer: GemmLayer, xd: str, bias) -> str:
        """c not a multiple of kh*kw: one-hot Conv (im2col) -> MatMul with the blocked (O, K)
        weight -> bias -> back to (N, O, Ho, Wo). A grouped layer (G groups of Og rows, each
        with its own K = Cin/G*kh*kw columns): the one-hot Conv has group=G and gives group g's
        K columns as channels g*K .. (g+1)*K; the (O, K) weight, dequantized tile by tile like
        an ungrouped one, is cut into the groups' (Og, K) matrices, and a batched MatMul
        (N, G, L, K) x (G, K, Og) multiplies every group's columns by its own rows."""
        kh, kw = layer.kernel_size
        K, G = layer.K, layer.groups
        cin_g = layer.in_channels // G                # K = cin_g * kh * kw
        eye = np.zeros((K, cin_g, kh, kw), dtype=np.float32)
        eye.reshape(K, K)[np.arange(K), np.arange(K)] = 1.0      # k = c*kh*kw + i*kw + j
        if G > 1:                                    # the same one-hot kernel for every group
            eye = np.tile(eye, (G, 1, 1, 1))
        e = self.const(eye, f"{layer.name}.im2col_kernel")
        cols = self.node("Conv", [xd, e], f"{layer.name}.im2col",
                         **self.conv_attrs(layer))                     # N, G*K, Ho, Wo
        h, w_ = self.shapes[layer.name][2:]
        ho, wo = layer.out_hw(h, w_)
        w, _ = self.weight_dq(layer, shape4=False)                     # O, K
        if G == 1:
            flat = self.node("Reshape", [cols, self.const(np.array([0, K, -1], np.int64),
                                                          "shape")], f"{layer.name}.cols")
            xt = self.node("Transpose", [flat], f"{layer.name}.cols_t", perm=[0, 2, 1])  # N,L,K
            wt = self.node("Transpose", [w], f"{layer.name}.weight_t", perm=[1, 0])      # K, O
            y = self.node("MatMul", [xt, wt], f"{layer.name}.matmul")                    # N,L,O
            if bias:
                y = self.node("Add", [y, bias], f"{layer.name}.bias_add")
            y = self.node("Transpose", [y], f"{layer.name}.y_t", perm=[0, 2, 1])         # N,O,L
        else:
            og = layer.O // G
            flat = self.node("Reshape", [cols, self.const(np.array([0, G, K, -1], np.int64),
                                                          "shape")], f"{layer.name}.cols")
            xt = self.node("Transpose", [flat], f"{layer.name}.cols_t",
                           perm=[0, 1, 3, 2])                                 # N, G, L, K
            wg = self.node("Reshape", [w, self.const(np.array([G, og, K], np.int64), "shape")],
                           f"{layer.name}.weight_g")                          # G, Og, K
            wt = self.node("Transpose", [wg], f"{layer.name}.weight_t", perm=[0, 2, 1])
            y = self.node("MatMul", [xt, wt], f"{layer.name}.matmul")         # N, G, L, Og
            if bias:
                bg = self.node("Reshape", [bias, self.const(np.array([G, 1, og], np.int64),
                                                            "shape")], f"{layer.name}.bias_g")
                y = self.node("Add", [y, bg], f"{layer.name}.bias_add")
            y = self.node("Transpose", [y], f"{layer.name}.y_t", perm=[0, 1, 3, 2])  # N,G,Og,L
        return self.node("Reshape", [y, self.const(np.array([0, layer.O, ho, wo], np.int64),
                                                   "shape")], layer.name)

    # -- other nodes ------------------------------------------------------------------------
    def unsupported(self, n, what=None):
        t = what or (n.target if isinstance(n.target, str) else getattr(n.target, "__name__",
                                                                        str(n.target)))
        raise UnsupportedModelError(f"ONNX export: node {n.name!r} ({n.op} {t}) has no ONNX "
                                    "translation in pimsim.onnx_export (see its docstring for "
                                    "the supported operations)")

    def value(self, a, base="const"):
        """ONNX name of an fx argument: a node's value, or a float constant."""
        import torch.fx as fx
        if isinstance(a, fx.Node):
            return self.names[a]
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return self.const(np.array(a, dtype=np.float32), base)
        raise UnsupportedModelError(f"ONNX export: argument {a!r} is not a tensor or number")

    def module_node(self, n, mod, args, kwargs) -> str:
        x = self.names[args[0]]
        if isinstance(mod, GemmLayer):
            y = self.gemm_layer(mod, x)
            self.layer_io[mod.name] = (x, y)
            return y
        if isinstance(mod, (nn.Identity, nn.Dropout)):
            return self.node("Identity", [x], n.name)
        if isinstance(mod, nn.ReLU):
            return self.node("Relu", [x], n.name)
        if isinstance(mod, nn.Sigmoid):
            return self.node("Sigmoid", [x], n.name)
        if isinstance(mod, nn.Tanh):
            return self.node("Tanh", [x], n.name)
        if isinstance(mod, nn.Hardtanh):               # ReLU6 too
            return self.clip(x, mod.min_val, mod.max_val, n.name)
        if isinstance(mod, nn.Flatten):
            return self.flatten(n, x, mod.start_dim, mod.end_dim)
        if isinstance(mod, nn.AdaptiveAvgPool2d) and _pair(mod.output_size) == (1, 1):
            return self.node("GlobalAveragePool", [x], n.name)
        if isinstance(mod, (nn.AvgPool2d, nn.MaxPool2d)):
            return self.pool(n, x, type(mod) is nn.MaxPool2d, mod.kernel_size, mod.stride,
                             mod.padding, getattr(mod, "dilation", 1), mod.ceil_mode,
                             getattr(mod, "count_include_pad", True))
        if isinstance(mod, nn.BatchNorm2d) and mod.running_mean is not None:
            c = mod.num_features
            w = mod.weight.detach().numpy() if mod.weight is not None else np.ones(c, np.float32)
            b = mod.bias.detach().numpy() if mod.bias is not None else np.zeros(c, np.float32)
            ins = [x] + [self.const(v.astype(np.float32), f"{n.name}.bn") for v in
                         (w, b, mod.running_mean.numpy(), mod.running_var.numpy())]
            return self.node("BatchNormalization", ins, n.name, epsilon=float(mod.eps))
        self.unsupported(n, type(mod).__name__)

    def clip(self, x, lo, hi, base):
        return self.node("Clip", [x, self.const(np.array(lo, np.float32), "lo"),
                                  self.const(np.array(hi, np.float32), "hi")], base)

    def flatten(self, n, x, start, end):
        if end not in (-1,) or start != 1:
            self.unsupported(n, f"flatten(start_dim={start}, end_dim={end})")
        return self.node("Flatten", [x], n.name, axis=1)

    def pool(self, n, x, is_max, k, s, p, d, ceil_mode, count_include_pad):
        k, s, p, d = _pair(k), _pair(s if s is not None else k), _pair(p), _pair(d)
        attrs = {"kernel_shape": list(k), "strides": list(s), "pads": [p[0], p[1], p[0], p[1]],
                 "ceil_mode": int(bool(ceil_mode))}
        if is_max:
            return self.node("MaxPool", [x], n.name, dilations=list(d), **attrs)
        return self.node("AveragePool", [x], n.name, count_include_pad=int(count_include_pad),
                         **attrs)

    def function_node(self, n, args, kwargs) -> str:
        t = n.target
        if t in (F.relu, torch.relu):
            return self.node("Relu", [self.names[args[0]]], n.name)
        if t in (torch.sigmoid, F.sigmoid):
            return self.node("Sigmoid", [self.names[args[0]]], n.name)
        if t in (operator.add, torch.add, operator.sub, torch.sub, operator.mul, torch.mul):
            if kwargs.get("alpha", 1) != 1:
                self.unsupported(n, "add with alpha")
            op = {operator.add: "Add", torch.add: "Add", operator.sub: "Sub", torch.sub: "Sub",
                  operator.mul: "Mul", torch.mul: "Mul"}[t]
            return self.node(op, [self.value(args[0]), self.value(args[1])], n.name)
        if t is torch.flatten:
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return self.flatten(n, self.names[args[0]], start, end)
        if t is operator.getitem:
            return self.getitem(n, args)
        if t is F.pad:
            pad = args[1] if len(args) > 1 else kwargs["pad"]
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            value = args[3] if len(args) > 3 else kwargs.get("value", None)
            if mode != "constant":
                self.unsupported(n, f"pad mode {mode!r}")
            return self.pad(n, self.names[args[0]], pad, 0.0 if value is None else value)
        if t is torch.cat:
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            return self.node("Concat", [self.names[a] for a in args[0]], n.name, axis=int(dim))
        if t is F.adaptive_avg_pool2d and _pair(args[1] if len(args) > 1
                                                else kwargs["output_size"]) == (1, 1):
            return self.node("GlobalAveragePool", [self.names[args[0]]], n.name)
        if t in (F.avg_pool2d, F.max_pool2d):
            names = ("input", "kernel_size", "stride", "padding")
            a = dict(zip(names, args))
            a.update(kwargs)
            return self.pool(n, self.names[args[0]], t is F.max_pool2d, a["kernel_size"],
                             a.get("stride"), a.get("padding", 0), a.get("dilation", 1),
                             a.get("ceil_mode", False), a.get("count_include_pad", True))
        self.unsupported(n)

    def method_node(self, n, args, kwargs) -> str:
        x = self.names[args[0]]
        if n.target == "relu":
            return self.node("Relu", [x], n.name)
        if n.target in ("reshape", "view"):
            shape = args[1:] if not (len(args) == 2 and isinstance(args[1], (tuple, list))) \
                else args[1]
            if not all(isinstance(v, int) for v in shape):
                self.unsupported(n, "reshape to a computed shape")
            shape = list(shape)
            shape[0] = 0 if shape[0] != -1 else -1      # keep the batch size
            return self.node("Reshape", [x, self.const(np.array(shape, np.int64), "shape")],
                             n.name)
        if n.target == "flatten":
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return self.flatten(n, x, start, end)
        if n.target == "mean":
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
            dims = [dims] if isinstance(dims, int) else list(dims)
            return self.node("ReduceMean", [x, self.const(np.array(dims, np.int64), "axes")],
                             n.name, keepdims=int(bool(keep)))
        if n.target in ("add", "mul", "sub"):
            return self.node(n.target.capitalize(), [x, self.value(args[1])], n.name)
        self.unsupported(n)

    def getitem(self, n, args) -> str:
        x, idx = self.names[args[0]], args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        starts, ends, axes, steps = [], [], [], []
        for ax, sl in enumerate(idx):
            if not isinstance(sl, slice):
                self.unsupported(n, f"indexing with {sl!r}")
            if sl == slice(None):
                continue
            step = 1 if sl.step is None else sl.step
            if not all(isinstance(v, (int, type(None))) for v in (sl.start, sl.stop)) \
                    or step <= 0:
                self.unsupported(n, f"slice {sl!r}")
            starts.append(0 if sl.start is None else sl.start)
            ends.append(_INT64_MAX if sl.stop is None else sl.stop)
            axes.append(ax)
            steps.append(step)
        if not axes:
            return self.node("Identity", [x], n.name)
        c = [self.const(np.array(v, np.int64), "slice") for v in (starts, ends, axes, steps)]
        return self.node("Slice", [x, *c], n.name)

    def pad(self, n, x, pad, value) -> str:
        pad = list(pad)
        if len(pad) % 2:
            self.unsupported(n, f"pad {pad}")
        rank = 4
        begin, end = [0] * rank, [0] * rank
        for i in range(len(pad) // 2):           # torch: last dim first, (before, after)
            begin[rank - 1 - i], end[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
        return self.node("Pad", [x, self.const(np.array(begin + end, np.int64), "pads"),
                                 self.const(np.array(value, np.float32), "pad_value")],
                         n.name, mode="constant")

    # -- the graph --------------------------------------------------------------------------
    def record_shapes(self, input_shape):
        def hook(layer, x):
            self.shapes[layer.name] = tuple(x.shape)
            y = layer.float_forward(x)
            self.out_shapes[layer.name] = tuple(y.shape)
            return y
        saved = {l.name: l.mode for l in self.net.layers}
        try:
            for l in self.net.layers:
                l.mode = "float"
            y = self.net.run_with_hooks(torch.zeros(1, *input_shape),
                                        {l.name: hook for l in self.net.layers})
        finally:
            for l in self.net.layers:
                l.mode = saved[l.name]
        if not isinstance(y, torch.Tensor):
            raise UnsupportedModelError("ONNX export: the network's output is not one tensor")
        self.out_shape = tuple(y.shape[1:])

    def build(self, input_shape, expose: bool = False):
        import torch.fx as fx
        self.record_shapes(input_shape)
        gm = self.net.gm
        modules = dict(gm.named_modules())
        out_name = None
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                if INPUT in self.names.values():
                    self.unsupported(n, "a second input")
                self.names[n] = INPUT
            elif n.op == "get_attr":
                obj = gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                self.names[n] = self.const(obj.detach().numpy(), n.target)
            elif n.op == "output":
                a = n.args[0]
                if not isinstance(a, fx.Node):
                    self.unsupported(n, "an output that is not one tensor")
                out_name = self.names[a]
            elif n.op == "call_module":
                self.names[n] = self.module_node(n, modules[n.target], n.args, n.kwargs)
            elif n.op == "call_function":
                self.names[n] = self.function_node(n, n.args, n.kwargs)
            elif n.op == "call_method":
                self.names[n] = self.method_node(n, n.args, n.kwargs)
        self.nodes.append(self.helper.make_node("Identity", [out_name], [OUTPUT], name=OUTPUT))
        h = self.helper
        inp = h.make_tensor_value_info(INPUT, self.TP.FLOAT, ["N", *input_shape])
        outp = h.make_tensor_value_info(OUTPUT, self.TP.FLOAT, ["N", *self.out_shape])
        outs = [outp]
        if expose:                  # every GEMM layer's input and output as graph outputs too
            for name, (xi, yo) in self.layer_io.items():
                for v, what, shape in ((xi, "input", self.shapes[name]),
                                       (yo, "output", self.out_shapes[name])):
                    alias = f"{name}:{what}"
                    self.nodes.append(h.make_node("Identity", [v], [alias], name=alias))
                    outs.append(h.make_tensor_value_info(alias, self.TP.FLOAT,
                                                         ["N", *shape[1:]]))
        graph = h.make_graph(self.nodes, "pimsim", [inp], outs, initializer=self.inits)
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)],
                             producer_name="pimsim")
        model.ir_version = IR_VERSION
        return model


def build_onnx(net: Network, input_shape=None, expose: bool = False):
    """The ``onnx.ModelProto`` of ``net`` (module docstring), checked by ``onnx.checker``.
    ``input_shape``: one sample's shape (default ``net.input_shape``); the batch is dynamic.
    ``expose``: also output every GEMM layer's input and output (``"<layer>:input"``,
    ``"<layer>:output"``), to check the graph layer by layer."""
    b = _Builder(net)
    model = b.build(tuple(input_shape or net.input_shape), expose)
    b.onnx.checker.check_model(model)
    return model


def export_onnx(net: Network, path, input_shape=None) -> Path:
    """Write ``build_onnx(net, input_shape)`` to ``path``; returns the path."""
    model = build_onnx(net, input_shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def onnx_available() -> bool:
    """Whether the ``onnx`` package can be imported (the optional ``.[onnx]`` extra)."""
    import importlib
    try:
        importlib.import_module("onnx")
    except ImportError:
        return False
    return True
