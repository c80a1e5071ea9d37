"""Cost model: memory, compute, array and energy/latency figures of a quantized network on a
crossbar, per layer and in total, derived from the crossbar mapping (``pimsim.crossbar``).

The cost of a run is computed from the traced network that was run and the ``Mapping``
attached to it (``traced_cost``): the output pixels of every layer come from one forward pass
of one zero image of the run's input shape (the data's: ``pimsim.datasets``; 3 x 32 x 32 for
CIFAR) with layer hooks, everything else
from the mapping. ``pimsim cost`` (``config_cost``) builds the same objects as ``pimsim run``
without reading the images — the input shape and class count from ``pimsim.datasets.
input_spec`` (no file for CIFAR, the class folders for an image folder, the array header for
.npz), the config's traced network (``config_network``; random weights, only shapes matter) and its mapping (``config_mapping``: the grids the configured granularity gives the
layers calibration would quantize) — and calls the same code. ``network_cost`` costs bare
``LayerShape``s (no network) the same way.

Per quantized layer (O x K weight matrix, tile grid of ``row_blocks x col_blocks`` tiles,
``P`` output pixels per inference, for a linear layer 1, or T on a B x T x F token input; the
mapping gives ``segments`` = sum_j ceil(c_j / rows) array-row segments and ``arrays``; ``aps = arrays / segments`` arrays
side by side along the bit lines of every segment; ``cyc = input_cycles(a_bits) *
input_passes`` DAC cycles per input vector, where ``input_cycles = ceil((a_bits - 1) /
dac_bits)`` for a signed input and ``cost.input_passes`` its passes, and for an unsigned input
(``quant.act_signed`` unsigned / auto: ``[0, 2^a - 1]``) ``input_cycles = ceil(a_bits /
dac_bits)`` in one pass, whatever ``cost.input_passes`` says):

memory   weight_bits     = O * K * w_bits
         scales          = row_blocks * col_blocks
         scale_bits      = scales * crossbar.scale_bits
         scale_overhead  = scale_bits / weight_bits; scale_vs_channelwise / _vs_layerwise =
                           scale_bits / those of the channelwise / layerwise grid (O and 1 scales)
compute  macs            = O * K * P
         rescale_mults   = O * col_blocks * P     one multiply per output element per column of
                                                  tiles (s_x folded into the tile scales, Eq. 5)
         tile_adds       = O * (col_blocks - 1) * P     adding the scaled tile results
         segment_adds    = O * (segments - col_blocks) * P   adding split arrays' results of one
                                                  column block (before its scale)
         psum_adds       = tile_adds + segment_adds
         digital_ops     = rescale_mults + psum_adds; digital_overhead = digital_ops / macs;
                           digital_vs_channelwise = digital_ops / that of the channelwise grid on
                           the same crossbar
arrays   arrays, utilization (from the mapping); used_columns = segments * (O * cols_per_weight
         + reference columns * aps)
         array_reads     = arrays * cyc * P       one read cycle of every array per input cycle
         adc_conversions = used_columns * cyc * P every used bit line, every cycle (the
                                                  formula pimsim.crossbar.adc_conversions, which
                                                  also counts the array simulation's conversions)
         dac_conversions = g * K * aps * cyc * P  every used word line of every array, every cycle
         shift_adds      = adc_conversions        each ADC result shift-added into its accumulator
         buffer_accesses = g * K * P + O * P + rescale_mults    input reads (broadcast to the
                           arrays of a segment), output writes, one scale read per rescale
                           multiply

Grouped convolution (``groups`` = g > 1; g = 1 otherwise): W is g stacked (O/g) x K matrices,
each group with its own g-th of the input channels and its own arrays (``pimsim.crossbar``
mapping), so every formula above holds as written with O the layer's rows and K a group's
columns (``macs = O * K * P`` counts each group's (O/g) x K products), scales = row_blocks *
col_blocks of the grid whose row blocks restart at every group (layerwise: still 1), and the
mapping's segments, arrays and used columns are summed over the groups; only the input
side is g * K wide (DAC conversions, input reads).
energy   energy_pj = array_reads * array_read_pj + adc_conversions * adc_pj_eff
                     + dac_conversions * dac_pj + rescale_mults * mult_pj
                     + (psum_adds + shift_adds) * add_pj + buffer_accesses * buffer_pj
         ADC energy per conversion scales with the resolution at a constant Walden figure of
         merit (energy per conversion step): adc_pj_eff = adc_pj * 2^(adc_bits - adc_ref_bits),
         where adc_bits = crossbar.adc_bits, or for an ideal ADC (adc_bits = 0) the lossless
         resolution ceil(log2(full_range(crossbar.rows) + 1)) that resolves every column sum of a
         full array; adc_ref_bits = 0 turns the scaling off (adc_pj_eff = adc_pj).
latency  layers run one after another, all arrays of a layer in parallel, output pixels one after
         another; per pixel a = cyc * cycle_ns of array cycles and d = ceil(digital_ops / P /
         digital_lanes) * digital_op_ns of digital work: latency_ns = P * (a + d) (default: the
         digital work of a pixel is not overlapped with the next pixel's array cycles, a
         conservative model), or with overlap_digital: true a two-stage pipeline,
         latency_ns = a + d + (P - 1) * max(a, d)

digital  matrix products that run in digital logic instead of on arrays (the network's
         ``digital_layers``: activation x activation products such as attention's q k^T, and
         modules pimsim cannot map) cost one multiply and one add per MAC:
         energy = macs * (mult_pj + add_pj), latency = ceil(macs / digital_lanes) *
         digital_op_ns; listed as ``digital_layers`` and summed in the totals
         (``digital_layer_macs`` / ``_energy_nj`` / ``_latency_us``, included in energy_nj and
         latency_us).

Totals are sums over layers; ratios are recomputed from the summed figures. The per-operation
constants are the YAML section ``cost:`` (``CostParams``; defaults and their sources there).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

from .quant import Granularity
from .schema import boolean, int_in, keys_of, positive_number, setting

# The ``cost:`` section: one field per constant (default, unit and source, check). Sources:
# ISAAC = Shafiee et al., "ISAAC: A Convolutional Neural Network Accelerator with In-Situ Analog
# Arithmetic in Crossbars", ISCA 2016, Table 2 (32 nm, 128x128 arrays, 100 ns read cycle);
# Horowitz = M. Horowitz, "Computing's energy problem", ISSCC 2014 (45 nm).
@dataclass(frozen=True)
class CostParams:
    """Per-operation energy (pJ) and time (ns) constants: the YAML section ``cost:``, whose
    keys, defaults, checks and docs ``pimsim.config`` reads from these fields."""

    array_read_pj: float = setting(30.0, "pJ per read cycle of one array (ISAAC: 0.3 mW per "
                                   "128x128 array x 100 ns)", positive_number)
    adc_pj: float = setting(1.5625, "pJ per ADC conversion (ISAAC: 8-bit ADC, 2 mW at "
                            "1.28 GS/s)", positive_number)
    adc_ref_bits: int = setting(8, "ADC resolution (bits) at which adc_pj holds; the energy per "
                                "conversion scales as 2^(bits - adc_ref_bits), i.e. a constant "
                                "Walden figure of merit (B. Murmann, ADC Performance Survey "
                                "1997-2024: near-constant energy per conversion step below ~10 "
                                "bits); 0 = adc_pj at every resolution", int_in(0, 16))
    dac_pj: float = setting(0.39, "pJ per DAC conversion of one word line in one cycle (ISAAC: "
                            "1-bit DACs, 4 mW for 8 x 128 DACs x 100 ns)", positive_number)
    mult_pj: float = setting(1.1, "pJ per digital rescale multiply (Horowitz: 16-bit float "
                             "multiply)", positive_number)
    add_pj: float = setting(0.1, "pJ per digital add / shift-add (Horowitz: 32-bit integer add)",
                            positive_number)
    buffer_pj: float = setting(1.25, "pJ per buffer access of one 8-bit element (Horowitz: 10 pJ "
                               "per 64-bit read of an 8 KB SRAM)", positive_number)
    cycle_ns: float = setting(100.0, "ns per array read cycle incl. ADC conversion (ISAAC: "
                              "100 ns)", positive_number)
    digital_op_ns: float = setting(1.0, "ns per digital operation step (1 GHz digital clock)",
                                   positive_number)
    digital_lanes: int = setting(128, "digital operations per step (multiply/add lanes)",
                                 int_in(1))
    input_passes: int = setting(1, "bit-serial passes per signed input vector: 1 = "
                                "non-negative (post-ReLU) inputs, 2 = signed inputs (positive "
                                "and negative parts); unsigned inputs (quant.act_signed) always "
                                "take 1", int_in(1, 2))
    overlap_digital: bool = setting(False, "true: a pixel's digital work (rescale, partial sums) "
                                    "overlaps the next pixel's array cycles (two-stage "
                                    "pipeline); false: one after the other (conservative)",
                                    boolean)

    @classmethod
    def from_config(cls, cfg) -> "CostParams":
        sec = cfg.data.get("cost") or {}
        return cls(**{k: sec[k] for k in (f.name for f in dataclasses.fields(cls)) if k in sec})


# (key, default, unit and source) of the ``cost:`` section, read off CostParams
COST_KEYS = tuple((k, key.default, key.doc) for k, key in keys_of(CostParams).items())


@dataclass(frozen=True)
class LayerShape:
    """A GEMM layer as the cost model sees it: O x K weights, P output pixels per inference;
    ``groups`` of a grouped convolution (W is ``groups`` stacked ``O/groups x K`` matrices)."""

    name: str
    O: int
    K: int
    pixels: int
    groups: int = 1


# CIFAR's image size: the default of the functions below when no input shape is given (a run
# and ``config_cost`` pass the data's, ``pimsim.datasets.input_spec``)
IMAGE_HW = (32, 32)


def network_shapes(net, image_hw=IMAGE_HW, channels: int = 3) -> list[LayerShape]:
    """Shapes and output pixels of every GEMM layer of a ``Network`` (one forward pass of one
    zero image; every layer runs in float meanwhile, whatever its backend)."""
    import torch
    pixels = {}

    def hook(layer, x):
        pixels[layer.name] = layer.positions(x)      # a token linear layer: T columns
        return layer.float_forward(x)

    net.run_with_hooks(torch.zeros(1, channels, *image_hw), {l.name: hook for l in net.layers})
    return [LayerShape(l.name, l.O, l.K, pixels[l.name], l.groups)
            for l in net.layers if l.name in pixels]


@functools.lru_cache(maxsize=16)
def _model_shapes(name: str) -> tuple:
    from .models import build_model
    from .network import build_network
    net = build_network(build_model(name))
    return tuple(network_shapes(net)), tuple(net.default_float_layers())


def model_shapes(name: str, float_layers="auto") -> list[LayerShape]:
    """The quantized layers of zoo model ``name`` at 32 x 32 (random weights: only shapes
    matter) — for tables of results that name a model but have no config (``pimsim plot``,
    notebooks). A run's cost comes from its own network (``traced_cost``)."""
    shapes, default_float = _model_shapes(name)
    keep = set(default_float) if float_layers == "auto" else set(float_layers)
    unknown = keep - {s.name for s in shapes}
    if unknown:
        raise ValueError(f"quant.float_layers: unknown layer(s) {sorted(unknown)}; "
                         f"layers: {[s.name for s in shapes]}")
    return [s for s in shapes if s.name not in keep]


def _specs(shapes, gran: Granularity, w_bits: int, a_bits: int):
    from .crossbar import LayerSpec
    return [LayerSpec(s.name, s.O, s.K, gran.resolve(s.O, s.K, s.groups), w_bits, a_bits, gran)
            for s in shapes]


def build_mapping(shapes, gran: Granularity, w_bits: int, a_bits: int, crossbar,
                  strict: bool = True):
    """``Mapping.from_layers`` of ``shapes`` quantized with ``gran``."""
    from .crossbar import Mapping
    return Mapping.from_layers(_specs(shapes, gran, w_bits, a_bits), crossbar, strict=strict)


def adc_resolution(crossbar) -> int:
    """The ADC resolution the cost model charges: ``crossbar.adc_bits``, or for an ideal ADC the
    lossless resolution that resolves every column sum of a full array."""
    if crossbar.adc_bits:
        return int(crossbar.adc_bits)
    return max(1, math.ceil(math.log2(crossbar.full_range(crossbar.rows) + 1)))


def adc_energy_pj(crossbar, params: CostParams) -> float:
    """pJ per ADC conversion at ``adc_resolution(crossbar)`` (see the module docstring)."""
    if not params.adc_ref_bits:
        return float(params.adc_pj)
    return float(params.adc_pj) * 2.0 ** (adc_resolution(crossbar) - params.adc_ref_bits)


def layer_cost(lm, pixels: int, crossbar, params: CostParams, chw=None, lw=None) -> dict:
    """All cost figures of one mapped layer (``chw``/``lw``: its channelwise and layerwise
    mappings on the same crossbar, for the relative figures)."""
    from .crossbar import adc_conversions
    O, K, P = lm.O, lm.K, pixels
    seg = lm.segments
    aps = lm.arrays_per_segment
    passes = 1 if lm.a_unsigned else params.input_passes
    cyc = lm.input_cycles * passes
    scales = lm.row_blocks * lm.col_blocks
    weight_bits = O * K * lm.w_bits
    scale_bits = scales * crossbar.scale_bits
    rescale = O * lm.col_blocks * P
    tile_adds = O * (lm.col_blocks - 1) * P
    seg_adds = O * (seg - lm.col_blocks) * P
    psum = tile_adds + seg_adds
    digital = rescale + psum
    used_cols = lm.used_columns
    array_reads = lm.arrays * cyc * P
    adc = adc_conversions(lm, P, passes)
    dac = lm.groups * K * aps * cyc * P
    shift_adds = adc
    buffer = lm.groups * K * P + O * P + rescale
    e = {"array": array_reads * params.array_read_pj, "adc": adc * adc_energy_pj(crossbar, params),
         "dac": dac * params.dac_pj, "mult": rescale * params.mult_pj,
         "add": (psum + shift_adds) * params.add_pj, "buffer": buffer * params.buffer_pj}
    a_ns = cyc * params.cycle_ns
    d_ns = math.ceil(digital / P / params.digital_lanes) * params.digital_op_ns
    latency_ns = (a_ns + d_ns + (P - 1) * max(a_ns, d_ns) if params.overlap_digital
                  else P * (a_ns + d_ns))
    out = {"name": lm.name, "O": O, "K": K, "groups": lm.groups, "pixels": P, "r": lm.r,
           "c": lm.c,
           "row_blocks": lm.row_blocks, "col_blocks": lm.col_blocks, "scales": scales,
           "weights": O * K, "weight_bits": weight_bits, "scale_bits": scale_bits,
           "macs": O * K * P, "rescale_mults": rescale, "tile_adds": tile_adds,
           "segment_adds": seg_adds, "psum_adds": psum, "digital_ops": digital,
           "arrays": lm.arrays, "segments": seg, "used_cells": lm.used_cells,
           "total_cells": lm.total_cells, "used_columns": used_cols, "input_cycles": cyc,
           "array_reads": array_reads, "adc_conversions": adc, "dac_conversions": dac,
           "shift_adds": shift_adds, "buffer_accesses": buffer,
           "energy_breakdown_nj": {k: v / 1e3 for k, v in e.items()},
           "energy_nj": sum(e.values()) / 1e3, "latency_us": latency_ns / 1e3}
    if chw is not None:
        c = layer_cost(chw, pixels, crossbar, params)
        out["chw_scale_bits"], out["chw_digital_ops"] = c["scale_bits"], c["digital_ops"]
    if lw is not None:
        out["lw_scale_bits"] = lw.row_blocks * lw.col_blocks * crossbar.scale_bits
    _ratios(out)
    return out


SUMMED = ("weights", "weight_bits", "scale_bits", "scales", "macs", "rescale_mults",
          "tile_adds", "segment_adds", "psum_adds", "digital_ops", "arrays", "used_cells",
          "total_cells", "used_columns", "array_reads", "adc_conversions", "dac_conversions",
          "shift_adds", "buffer_accesses", "energy_nj", "latency_us", "chw_scale_bits",
          "chw_digital_ops", "lw_scale_bits")


def _ratios(d: dict) -> None:
    div = lambda a, b: a / b if b else float("nan")  # noqa: E731
    d["scale_overhead"] = div(d["scale_bits"], d["weight_bits"])
    d["digital_overhead"] = div(d["digital_ops"], d["macs"])
    d["utilization"] = div(d["used_cells"], d["total_cells"])
    if "chw_scale_bits" in d:
        d["scale_vs_channelwise"] = div(d["scale_bits"], d["chw_scale_bits"])
        d["digital_vs_channelwise"] = div(d["digital_ops"], d["chw_digital_ops"])
    if "lw_scale_bits" in d:
        d["scale_vs_layerwise"] = div(d["scale_bits"], d["lw_scale_bits"])


def mapping_cost(mapping, pixels: dict, params: CostParams | None = None,
                 granularity=None) -> dict:
    """Per-layer and total cost of the layers of ``mapping`` (a ``pimsim.crossbar.Mapping``),
    ``pixels[name]`` output pixels per inference each; ``granularity`` labels the result.

    Returns ``{"granularity", "w_bits", "a_bits", "crossbar", "params", "adc_bits", "adc_pj",
    "layers", "totals"}`` (bit widths: those of the first layer; None for an empty mapping).
    """
    from .crossbar import LayerSpec, Mapping
    params = params or CostParams()
    crossbar = mapping.crossbar

    def regrid(gran):
        return Mapping.from_layers([LayerSpec(lm.name, lm.O, lm.K,
                                              gran.resolve(lm.O, lm.K, lm.groups),
                                              lm.w_bits, lm.a_bits, gran)
                                    for lm in mapping.layers], crossbar, strict=False)
    chw, lw = regrid(Granularity.channelwise()), regrid(Granularity.layerwise())
    layers = [layer_cost(lm, pixels[lm.name], crossbar, params, c, l)
              for lm, c, l in zip(mapping.layers, chw.layers, lw.layers)]
    totals = {k: sum(l[k] for l in layers) for k in SUMMED}
    totals["energy_breakdown_nj"] = {k: sum(l["energy_breakdown_nj"][k] for l in layers)
                                     for k in layers[0]["energy_breakdown_nj"]} if layers else {}
    _ratios(totals)
    first = mapping.layers[0] if mapping.layers else None
    return {"granularity": None if granularity is None else str(granularity),
            "w_bits": first and first.w_bits, "a_bits": first and first.a_bits,
            "crossbar": dataclasses.asdict(crossbar), "params": dataclasses.asdict(params),
            "adc_bits": adc_resolution(crossbar), "adc_pj": adc_energy_pj(crossbar, params),
            "layers": layers, "totals": totals}


def network_cost(shapes, gran: Granularity, w_bits: int, a_bits: int, crossbar,
                 params: CostParams | None = None, strict: bool = True) -> dict:
    """Per-layer and total cost of the quantized layers ``shapes`` with granularity ``gran``
    (``mapping_cost`` of their mapping)."""
    mapping = build_mapping(shapes, gran, w_bits, a_bits, crossbar, strict)
    res = mapping_cost(mapping, {s.name: s.pixels for s in shapes}, params, gran)
    res["w_bits"], res["a_bits"] = w_bits, a_bits
    return res


def digital_layer_cost(digital_layers, params: CostParams | None = None) -> list[dict]:
    """The cost of the matrix products that run in digital logic instead of on arrays
    (``Network.digital_layers``: name, op, macs per inference): one multiply and one add per
    MAC, ``energy_nj = macs * (mult_pj + add_pj) / 1e3``, on the ``digital_lanes`` lanes,
    ``latency_us = ceil(macs / digital_lanes) * digital_op_ns / 1e3``."""
    params = params or CostParams()
    return [{**d, "energy_nj": d["macs"] * (params.mult_pj + params.add_pj) / 1e3,
             "latency_us": math.ceil(d["macs"] / params.digital_lanes) * params.digital_op_ns
             / 1e3} for d in digital_layers]


def add_digital_layers(res: dict, digital: list[dict]) -> dict:
    """Put the ``digital_layer_cost`` entries ``digital`` into a cost result: ``"digital_layers"``
    and, in the totals, ``digital_layer_macs`` / ``_energy_nj`` / ``_latency_us`` (also added
    to ``energy_nj`` and ``latency_us``, and as ``digital_layers`` to the energy breakdown when
    there are any: layers run one after another). Returns ``res``."""
    t = res["totals"]
    t["digital_layer_macs"] = sum(d["macs"] for d in digital)
    t["digital_layer_energy_nj"] = sum(d["energy_nj"] for d in digital)
    t["digital_layer_latency_us"] = sum(d["latency_us"] for d in digital)
    if digital:
        t["energy_nj"] += t["digital_layer_energy_nj"]
        t["latency_us"] += t["digital_layer_latency_us"]
        t["energy_breakdown_nj"]["digital_layers"] = t["digital_layer_energy_nj"]
    res["digital_layers"] = digital
    return res


def traced_cost(net, mapping, params: CostParams | None = None, granularity=None,
                image_hw=IMAGE_HW, channels: int = 3) -> dict:
    """The cost of ``net`` (a traced ``pimsim.network.Network``) placed by ``mapping`` (the
    ``Mapping`` attached to it, or ``config_mapping``'s), for ``channels`` x ``image_hw`` input
    images, with its digital layers (``net.digital_layers``, measured again when the network's
    example input had another size) counted as digital work (``add_digital_layers``)."""
    pixels = {s.name: s.pixels for s in network_shapes(net, image_hw, channels)}
    res = mapping_cost(mapping, pixels, params, granularity)
    digital = net.digital_layers
    if digital and tuple(net.input_shape) != (channels, *image_hw):
        digital = net.count_digital((channels, *image_hw))
    return add_digital_layers(res, digital_layer_cost(digital, params or CostParams()))


def crossbar_of(cfg):
    """``(Crossbar, strict)``: the config's ``crossbar:`` section (strict placement), else the
    default ``Crossbar()`` standing in (``strict=False``: oversized tiles are split)."""
    from .crossbar import Crossbar
    xb = getattr(cfg, "crossbar", None)
    return (xb, True) if xb is not None else (Crossbar(), False)


def config_network(cfg, checkpoint=None, num_classes: int | None = None, input_shape=None):
    """The traced ``Network`` of the config's model (``cfg.build_model``: ``model.name`` with
    ``num_classes`` outputs, default the data's, or ``model.factory``; the weights of
    ``checkpoint``, else random / the factory model's own: the cost needs only shapes),
    ``model.strict`` refusing digital layers, their MACs measured on one input of
    ``input_shape`` (one sample; default the data's, ``pimsim.datasets.input_spec``).
    ``pimsim run`` builds its network with it too (``pimsim.simulate.prepare``)."""
    from .network import build_network
    if num_classes is None or input_shape is None:
        from .datasets import input_spec
        n, shape = input_spec(cfg)
        num_classes = n if num_classes is None else num_classes
        input_shape = shape if input_shape is None else input_shape
    return build_network(cfg.build_model(checkpoint, num_classes=num_classes),
                         input_shape=tuple(input_shape), strict=cfg["model.strict"])


def probe_unsigned(net, layers, act_signed: str) -> dict:
    """``{layer name: unsigned}`` for an uncalibrated network under ``quant.act_signed``: for
    ``auto`` / ``unsigned``, the inputs of ``layers`` on 4 standard-normal images (seed 0)
    through the float network decide (``pimsim.quant.act_unsigned`` of their minimum): a
    post-ReLU input is never negative, any other input is with probability ~1."""
    import torch

    from .quant import act_unsigned
    if act_signed == "signed" or not layers:
        return {l.name: False for l in layers}
    mins = {}

    def hook(name):
        def record(module, args):
            mins[name] = min(mins.get(name, math.inf), float(args[0].min()))
        return record
    hooks = [l.register_forward_pre_hook(hook(l.name)) for l in layers]
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            net(torch.randn(4, *net.input_shape, generator=g))
    finally:
        for h in hooks:
            h.remove()
    return {l.name: act_unsigned(act_signed, l.name, mins.get(l.name, 0.0)) for l in layers}


def config_mapping(cfg, net):
    """The ``Mapping`` of ``net`` as the config places it, on ``crossbar_of(cfg)``: the layers
    calibration quantizes (all but ``quant.float_layers``) with their grids — ``layer.quant``
    where ``net`` is calibrated, else ``cfg.granularity.resolve(O, K)``, the grid calibration
    gives them — and bit widths; for a calibrated network with a ``crossbar:`` section the
    same placement as ``pimsim.crossbar.attach``."""
    from .calibrate import resolve_float_layers
    from .crossbar import LayerSpec, Mapping
    xb, strict = crossbar_of(cfg)
    gran, wb, ab = cfg.granularity, cfg["quant.weight_bits"], cfg["quant.act_bits"]
    if net.quantized_layers:
        specs = [LayerSpec(l.name, l.O, l.K, l.quant.grid, l.quant.w_bits, l.quant.a_bits,
                           a_unsigned=l.quant.act_unsigned) for l in net.quantized_layers]
    else:
        keep = resolve_float_layers(net, cfg["quant.float_layers"])
        todo = [l for l in net.layers if l.name not in keep]
        uns = probe_unsigned(net, todo, cfg["quant.act_signed"])
        specs = [LayerSpec(l.name, l.O, l.K, gran.resolve(l.O, l.K, l.groups), wb, ab,
                           a_unsigned=uns[l.name]) for l in todo]
    return Mapping.from_layers(specs, xb, strict=strict, granularity=gran)


def config_cost(cfg, net=None, mapping=None, input_shape=None) -> dict:
    """The cost of a validated ``Config``: of ``net`` (default: ``config_network(cfg)``) placed
    by ``mapping`` (default: ``config_mapping(cfg, net)``) — a run passes the network it ran,
    the mapping attached to it and its data's input shape — with the ``cost:`` constants, for
    ``input_shape`` (C, H, W) images (default: the data's, ``pimsim.datasets.input_spec``,
    read without the images)."""
    if net is None or input_shape is None:
        from .datasets import input_spec
        num_classes, shape = input_spec(cfg)
        input_shape = shape if input_shape is None else input_shape
        net = (config_network(cfg, num_classes=num_classes, input_shape=input_shape)
               if net is None else net)
    mapping = config_mapping(cfg, net) if mapping is None else mapping
    c, h, w = input_shape
    res = traced_cost(net, mapping, CostParams.from_config(cfg), cfg.granularity, (h, w), c)
    res["input_shape"] = [int(c), int(h), int(w)]
    res["w_bits"], res["a_bits"] = cfg["quant.weight_bits"], cfg["quant.act_bits"]
    res["model"] = cfg.model_label
    res["strict"] = crossbar_of(cfg)[1]
    return res


# --------------------------------------------------------------------------- printing


def _si(v: float) -> str:
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.2f}{unit}"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.3g}"


TABLE = (("layer", "name", 16, str), ("O", "O", 5, str), ("K", "K", 5, str),
         ("P", "pixels", 5, str), ("tile", None, 9, None), ("scales", "scales", 7, str),
         ("scale kbit", "scale_bits", 11, lambda v: f"{v / 1e3:.2f}"),
         ("sc/w %", "scale_overhead", 7, lambda v: f"{100 * v:.2f}"),
         ("MACs", "macs", 8, _si), ("rescale", "rescale_mults", 8, _si),
         ("psum add", "psum_adds", 9, _si), ("dig/MAC %", "digital_overhead", 10,
                                             lambda v: f"{100 * v:.2f}"),
         ("arrays", "arrays", 7, str), ("util %", "utilization", 7, lambda v: f"{100 * v:.1f}"),
         ("ADC conv", "adc_conversions", 9, _si), ("E nJ", "energy_nj", 9, lambda v: f"{v:.1f}"),
         ("t us", "latency_us", 8, lambda v: f"{v:.1f}"))


def format_table(res: dict) -> str:
    """A per-layer table and a totals line of a ``network_cost`` result."""
    def row(d, name):
        cells = []
        for head, key, w, fmt in TABLE:
            if key is None:
                v = f"{d['r']}x{d['c']}" if "r" in d else ""
            elif key == "name":
                v = name
            elif key in ("O", "K", "pixels") and key not in d:
                v = ""
            else:
                v = fmt(d[key])
            cells.append(f"{v:>{w}}" if key != "name" else f"{v:<{w}}")
        return "".join(cells)
    head = "".join(f"{h:>{w}}" if k != "name" else f"{h:<{w}}" for h, k, w, _ in TABLE)
    lines = [head] + [row(l, l["name"]) for l in res["layers"]] + [row(res["totals"], "total")]
    t = res["totals"]
    lines.append(
        f"scale memory {t['scale_bits'] / 8 / 1024:.2f} KiB = {100 * t['scale_overhead']:.2f}% of "
        f"the {t['weight_bits'] / 8 / 1024:.1f} KiB of weights; {t['scale_vs_channelwise']:.2f}x "
        f"channelwise, {t['scale_vs_layerwise']:.1f}x layerwise")
    lines.append(
        f"digital ops (rescale + partial sums) {_si(t['digital_ops'])} = "
        f"{100 * t['digital_overhead']:.2f}% of {_si(t['macs'])} MACs; "
        f"{t['digital_vs_channelwise']:.2f}x channelwise")
    if res.get("digital_layers"):
        lines.append(
            f"digital layers (not on arrays): {len(res['digital_layers'])}, "
            f"{_si(t['digital_layer_macs'])} MACs, {t['digital_layer_energy_nj']:.1f} nJ, "
            f"{t['digital_layer_latency_us']:.1f} us (included below): "
            + ", ".join(f"{d['name']} ({d['op']}, {_si(d['macs'])})"
                        for d in res["digital_layers"]))
    eb = ", ".join(f"{k} {v:.1f}" for k, v in t["energy_breakdown_nj"].items())
    lines.append(f"arrays {t['arrays']}, utilization {100 * t['utilization']:.1f}%, "
                 f"energy {t['energy_nj']:.1f} nJ per inference ({eb}), "
                 f"latency {t['latency_us']:.1f} us")
    lines.append(f"ADC: {res['adc_bits']}-bit"
                 + (" (lossless for an ideal ADC)" if not res["crossbar"]["adc_bits"] else "")
                 + f", {res['adc_pj']:.4g} pJ per conversion")
    return "\n".join(lines)


def to_json(res: dict) -> str:
    return json.dumps(res, indent=2) + "\n"
