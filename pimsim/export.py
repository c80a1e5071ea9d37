"""A calibration as files: export the quantized network's tiles, reload them without calibrating.

``export_tiles(net, cfg, out_dir, ...)`` writes

- ``tiles.safetensors`` (tensors only, no pickle): per quantized layer ``L``
  ``L.weight_int`` (the O x K integers the backends use: int8 up to 8 bits, int16 above),
  ``L.w_scales`` (the tile scales, float64, ``grid.shape``), ``L.act_scale`` (float64, shape
  (1,)), ``L.bias`` (float32, the layer's bias as the network runs it, when it has one),
  ``L.clamp`` (float64 partial-sum limits, when set) and ``L.adc_ranges`` (float64, one per
  array, when calibrated ADC ranges were fitted); ``order.G`` (int64) the channel order of
  every free permutation group ``G`` the run reordered;
- ``manifest.json``: format version, pimsim version and git commit, the resolved config
  without this machine's paths (``portable_config``), ``model.checkpoint``: the checkpoint's
  file name, sha256 and size (``fingerprint``; null without a file), the channel orders,
  and per quantized layer name, kind, O, K, groups, the conv geometry, tile grid (r, c,
  shape), bits, symmetric; with a ``crossbar:`` section the mapping totals and, per layer,
  the placement of every tile (``pimsim.crossbar.LayerMapping.tile_placements``: its pieces'
  array index, word-line and bit-line offsets and sizes);
- ``tiles.csv``: one row per tile: layer, i, j, rows, cols, scale, array (the arrays holding
  the tile, ``;``-separated; empty without a ``crossbar:`` section).

``load_tiles(net, cfg, directory)`` is the reverse (``quant.load`` / ``pimsim run --load``): it
checks that the manifest fits the network and the config (layer names, kind, O, K, groups,
tile grid, bits, symmetric; ``TilesError`` naming the first layer that does not) and the
checkpoint's size and sha256 against the recorded ones (``check_model``), applies the
stored channel orders to the float network (``pimsim.reorder.Reorderer``) and gives every
layer exactly the stored integers, scales and activation scale: no calibration runs.
``apply_adc_ranges`` puts stored ADC ranges on the crossbar layers once they are attached.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from . import __version__
from .network import LayerQuant, Network
from .provenance import provenance
from .quant import qrange

FORMAT = "pimsim-tiles"
FORMAT_VERSION = 1
TENSORS = "tiles.safetensors"
MANIFEST = "manifest.json"
CSV_FILE = "tiles.csv"
CSV_FIELDS = ("layer", "i", "j", "rows", "cols", "scale", "array")


class TilesError(ValueError):
    """An export folder that cannot be written or read, or that does not fit the model; the
    message names the file (and the layer)."""


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------

def _seed_of(cfg):
    try:
        return cfg["quant.seed"]
    except (KeyError, TypeError):
        pass
    try:
        return cfg["quant"]["seed"]             # a resolved config dict
    except (KeyError, TypeError):
        return None


def fingerprint(path) -> dict | None:
    """The model file as a manifest records it: ``{"file": its name, "sha256", "size"}`` (bytes);
    None for no file (a ``model.factory`` model's own initial weights)."""
    if path is None:
        return None
    p = Path(path)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"file": p.name, "sha256": h.hexdigest(), "size": p.stat().st_size}


def _name_only(v):
    """A path of the config as a manifest records it: as given when relative, else its last
    component (an export folder must not carry this machine's folders)."""
    if not isinstance(v, str) or not Path(v).is_absolute():
        return v
    return Path(v).name


def portable_config(resolved: dict) -> dict:
    """The resolved config without this machine's paths: ``model.checkpoint`` by its file name
    (the manifest's ``model`` entry fingerprints it), ``data.dir`` only when relative (the data
    folder is not needed to use an export), ``model.factory``'s FILE, ``data.root`` /
    ``data.path`` / ``data.calib_path`` and ``quant.load`` as given when relative, else by their
    file or folder name."""
    c = copy.deepcopy(resolved)
    m, d, q = c.get("model") or {}, c.get("data") or {}, c.get("quant") or {}
    if m.get("checkpoint") is not None:
        m["checkpoint"] = Path(m["checkpoint"]).name
    f = m.get("factory")
    if isinstance(f, str) and ":" in f:
        file, fn = f.rsplit(":", 1)
        m["factory"] = f"{_name_only(file)}:{fn}"
    if isinstance(d.get("dir"), str) and Path(d["dir"]).is_absolute():
        d["dir"] = None
    for key in ("root", "path", "calib_path"):
        if key in d:
            d[key] = _name_only(d[key])
    if "load" in q:
        q["load"] = _name_only(q["load"])
    return c


def layer_entry(layer) -> dict:
    """The manifest entry of a quantized layer (no placement)."""
    q = layer.quant
    g = q.grid
    e = {"name": layer.name, "kind": layer.kind, "O": layer.O, "K": layer.K,
         "groups": layer.groups, "in_channels": layer.in_channels,
         "grid": {"r": g.r, "c": g.c, "shape": list(g.shape)},
         "w_bits": q.w_bits, "a_bits": q.a_bits, "symmetric": bool(q.symmetric),
         "act_unsigned": bool(q.act_unsigned), "act_scale": float(q.act_scale), "weight_dtype": str(layer.wq.dtype)}
    if layer.kind == "conv":
        e.update(kernel_size=list(layer.kernel_size), stride=list(layer.stride),
                 padding=list(layer.padding), dilation=list(layer.dilation))
    return e


def _tensors(net: Network, orders: dict | None, adc_ranges: dict | None) -> dict:
    out = {}
    for l in net.quantized_layers:
        q = l.quant
        out[f"{l.name}.weight_int"] = np.ascontiguousarray(l.wq)
        out[f"{l.name}.w_scales"] = np.ascontiguousarray(q.w_scales, dtype=np.float64)
        out[f"{l.name}.act_scale"] = np.array([q.act_scale], dtype=np.float64)
        out[f"{l.name}.act_unsigned"] = np.array([int(q.act_unsigned)], dtype=np.int8)
        if l.bias is not None:
            out[f"{l.name}.bias"] = l.bias.detach().numpy().astype(np.float32)
        if q.clamp is not None:
            out[f"{l.name}.clamp"] = np.ascontiguousarray(q.clamp, dtype=np.float64)
        if adc_ranges and l.name in adc_ranges and adc_ranges[l.name] is not None:
            out[f"{l.name}.adc_ranges"] = np.asarray(adc_ranges[l.name], dtype=np.float64)
    for g, p in (orders or {}).items():
        out[f"order.{g}"] = np.asarray(p, dtype=np.int64)
    return out


def adc_ranges_of(net: Network) -> dict:
    """``{layer: per-array ADC ranges}`` of the attached crossbar layers that have fitted ranges."""
    from .crossbar import array_op
    out = {}
    for l in net.quantized_layers:
        op = array_op(l)
        if op is not None and op.ranges is not None:
            out[l.name] = np.asarray(op.ranges, dtype=np.float64)
    return out


def export_tiles(net: Network, cfg, out_dir, mapping=None, orders: dict | None = None,
                 adc_ranges: dict | None = None, extra: dict | None = None,
                 checkpoint=None) -> dict:
    """Write ``tiles.safetensors``, ``manifest.json`` and ``tiles.csv`` of the calibrated ``net``
    into ``out_dir`` (made if needed). ``cfg``: the run's ``Config`` (or a resolved config
    dict; recorded by ``portable_config``, without this machine's paths); ``mapping``: the
    ``pimsim.crossbar.Mapping`` the layers sit on (placements written only then); ``orders``:
    ``{group: order}`` applied by reordering; ``adc_ranges``: ``{layer: ranges}`` (default:
    those fitted on the attached layers); ``checkpoint``: the file the model's weights came
    from (None: none), recorded as ``model.checkpoint`` = ``fingerprint(checkpoint)``.
    Returns the manifest."""
    from safetensors.numpy import save_file

    from .provenance import git_commit
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TilesError(f"--out {out} is a file; give a folder for the export")
    if not net.quantized_layers:
        raise TilesError("the network has no quantized layer to export")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TilesError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    if adc_ranges is None:
        adc_ranges = adc_ranges_of(net)
    resolved = portable_config(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    try:
        model = {"checkpoint": fingerprint(checkpoint)}
    except OSError as e:
        raise TilesError(f"model checkpoint {checkpoint}: cannot read it to fingerprint it "
                         f"({e.strerror or e})") from None
    layers = []
    for l in net.quantized_layers:
        e = layer_entry(l)
        if mapping is not None:
            lm = mapping.layer(l.name)
            e["arrays"] = lm.arrays
            e["placement"] = lm.tile_placements(mapping.crossbar, l.quant.grid)
        layers.append(e)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "pimsim": __version__,
        "commit": git_commit(), "config": resolved,
        # the weights the calibration belongs to (reload refuses other ones)
        "model": model,
        "float_layers": [l.name for l in net.layers if l.quant is None],
        "orders": {g: [int(i) for i in p] for g, p in (orders or {}).items()},
        "adc_ranges": sorted(adc_ranges),
        "layers": layers,
        # who wrote it, when and how (the command, seed and threads of this process)
        "provenance": provenance(seeds=[_seed_of(cfg)]),
    }
    if mapping is not None:
        manifest["crossbar"] = {"crossbar": mapping.crossbar.to_dict(), "arrays": mapping.arrays,
                                "utilization": mapping.utilization}
    if extra:
        manifest.update(extra)
    try:
        save_file(_tensors(net, orders, adc_ranges), str(out / TENSORS),
                  metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(out / TENSORS, 0o666 & ~mask)      # safetensors writes 0600; like the others
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        write_csv(net, out / CSV_FILE, mapping)
    except OSError as e:
        raise TilesError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return manifest


def write_csv(net: Network, path, mapping=None) -> None:
    """``tiles.csv``: one row per scale tile of every quantized layer."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for l in net.quantized_layers:
            g, s = l.quant.grid, np.asarray(l.quant.w_scales)
            arrays = {}
            if mapping is not None:
                for p in mapping.layer(l.name).tile_placements(mapping.crossbar, g):
                    arrays.setdefault((p["i"], p["j"]), []).extend(
                        piece["array"] for piece in p["pieces"])
            for i, j, rows, cols in g.tiles():
                a = arrays.get((i, j))
                w.writerow([l.name, i, j, rows.stop - rows.start, cols.stop - cols.start,
                            repr(float(s[i, j])),
                            "" if a is None else ";".join(map(str, sorted(set(a))))])


# --------------------------------------------------------------------------------------------
# reload
# --------------------------------------------------------------------------------------------

def read_manifest(directory) -> dict:
    """The manifest of export folder ``directory``; TilesError naming the path otherwise."""
    d = Path(directory)
    if not d.is_dir():
        raise TilesError(f"quant.load: {d}: no such folder (give a folder written by "
                         "pimsim export)")
    mf = d / MANIFEST
    if not mf.is_file():
        raise TilesError(f"quant.load: {mf}: missing (not a pimsim export folder)")
    try:
        m = json.loads(mf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TilesError(f"quant.load: {mf}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise TilesError(f"quant.load: {mf}: not a pimsim tiles manifest (format must be "
                         f"{FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise TilesError(f"quant.load: {mf}: format_version {m.get('format_version')!r}; "
                         f"this pimsim reads {FORMAT_VERSION}")
    if not isinstance(m.get("layers"), list):
        raise TilesError(f"quant.load: {mf}: 'layers' must be a list")
    return m


def read_tensors(directory) -> dict:
    """The tensors of ``directory/tiles.safetensors`` as numpy arrays; TilesError naming the file
    when it is missing or not a valid safetensors file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    f = Path(directory) / TENSORS
    if not f.is_file():
        raise TilesError(f"quant.load: {f}: missing")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise TilesError(f"quant.load: {f}: not a valid safetensors file "
                         f"({' '.join(str(e).split())})") from None


def _expected(cfg, net: Network) -> tuple[list, dict]:
    """The layers the config quantizes (names in order) and the config's bits / grid."""
    from .calibrate import resolve_float_layers
    keep = resolve_float_layers(net, cfg["quant.float_layers"])
    layers = [l for l in net.layers if l.name not in keep]
    # a crossbar: section means the symmetric range (pimsim.simulate.symmetric_range)
    return layers, {"w_bits": cfg["quant.weight_bits"], "a_bits": cfg["quant.act_bits"],
                    "symmetric": cfg.crossbar is not None}


def check_manifest(manifest: dict, cfg, net: Network, where: str) -> None:
    """TilesError naming the first layer of the model (or the manifest) that does not fit:
    other name, kind, O, K, groups, tile grid (from the config's granularity), bits, or
    symmetric range. ``where`` names the manifest file."""
    layers, want = _expected(cfg, net)
    entries = manifest["layers"]
    gran = cfg.granularity
    for n, l in enumerate(layers):
        if n >= len(entries):
            raise TilesError(f"quant.load: {where}: layer {l.name}: not in the manifest (it has "
                             f"{len(entries)} quantized layers, the model {len(layers)})")
        e = entries[n]
        if not isinstance(e, dict):
            raise TilesError(f"quant.load: {where}: layers[{n}] must be a mapping")
        if e.get("name") != l.name:
            raise TilesError(f"quant.load: {where}: layer {l.name}: the manifest has "
                             f"{e.get('name')!r} in its place (a manifest of another model?)")
        grid = gran.resolve(l.O, l.K, l.groups)
        checks = [("kind", l.kind), ("O", l.O), ("K", l.K), ("groups", l.groups),
                  ("w_bits", want["w_bits"]), ("a_bits", want["a_bits"]),
                  ("symmetric", want["symmetric"])]
        for k, v in checks:
            if e.get(k) != v:
                raise TilesError(f"quant.load: {where}: layer {l.name}: {k} {e.get(k)!r} in the "
                                 f"manifest, {v!r} in the model/config")
        eg = e.get("grid") or {}
        if (eg.get("r"), eg.get("c")) != (grid.r, grid.c):
            raise TilesError(f"quant.load: {where}: layer {l.name}: tile grid "
                             f"{eg.get('r')}x{eg.get('c')} in the manifest, {grid.r}x{grid.c} "
                             f"from quant.tile")
    if len(entries) > len(layers):
        raise TilesError(f"quant.load: {where}: layer {entries[len(layers)].get('name')!r} of the "
                         f"manifest is not a quantized layer of the model")


def _short(sha) -> str:
    return f"{sha[:16]}..." if isinstance(sha, str) else repr(sha)


def check_model(manifest: dict, checkpoint, where: str) -> None:
    """TilesError unless the model's weights are those the calibration was made with: the
    manifest's ``model.checkpoint`` fingerprint (file name, sha256, size) against the file
    ``checkpoint`` this run loads (None: no file, a ``model.factory`` model's own initial
    weights). Compared by size and sha256, not by path or name. A manifest without a
    ``model`` entry (written before pimsim recorded it) is not checked."""
    if "model" not in manifest:
        return
    m = manifest["model"]
    rec = m.get("checkpoint", ...) if isinstance(m, dict) else ...
    if rec is not None and not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str)
                                and isinstance(rec.get("size"), int)):
        raise TilesError(f"quant.load: {where}: model.checkpoint must be null or "
                         "{file, sha256, size}")
    if rec is None and checkpoint is None:
        return
    if rec is None:
        raise TilesError(f"quant.load: {where}: the calibration was made on the model's own "
                         f"initial weights (no checkpoint); this run loads checkpoint "
                         f"{checkpoint}")
    if checkpoint is None:
        raise TilesError(f"quant.load: {where}: the calibration was made with checkpoint "
                         f"{rec.get('file')!r} (sha256 {_short(rec['sha256'])}); this run has "
                         "no checkpoint (the model's own initial weights)")
    p = Path(checkpoint)
    try:
        same = p.stat().st_size == rec["size"] and fingerprint(p)["sha256"] == rec["sha256"]
    except OSError as e:
        raise TilesError(f"quant.load: model checkpoint {p}: cannot read it ({e.strerror or e})"
                         ) from None
    if not same:
        have = fingerprint(p)
        raise TilesError(f"quant.load: {where}: model checkpoint {p} (sha256 "
                         f"{_short(have['sha256'])}, {have['size']} bytes) is not the one the "
                         f"calibration was made with: {rec.get('file')!r} (sha256 "
                         f"{_short(rec['sha256'])}, {rec['size']} bytes)")


def _tensor(t: dict, key: str, f, shape=None, kinds="f"):
    if key not in t:
        raise TilesError(f"quant.load: {f}: tensor {key!r} missing")
    a = t[key]
    if a.dtype.kind not in kinds:
        raise TilesError(f"quant.load: {f}: tensor {key!r} has dtype {a.dtype}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise TilesError(f"quant.load: {f}: tensor {key!r} has shape {tuple(a.shape)}, "
                         f"expected {tuple(shape)}")
    return a


_UNCHECKED = object()


def load_tiles(net: Network, cfg, directory, example_shape=None, checkpoint=_UNCHECKED) -> dict:
    """Quantize ``net`` (float, freshly built from the config's model) with the calibration stored
    in ``directory``: check the manifest against ``cfg`` and ``net`` (``check_manifest``) and,
    when ``checkpoint`` is given (the file ``net``'s weights came from, None for none), against
    the model's weights (``check_model``), apply the stored channel orders, then give every layer the stored integers, tile scales,
    activation scale (and partial-sum clamp). Returns ``{"manifest", "orders", "adc_ranges",
    "float_layers"}``; ``adc_ranges`` ({layer: ranges}) for ``apply_adc_ranges``."""
    d = Path(directory)
    manifest = read_manifest(d)
    where = str(d / MANIFEST)
    check_manifest(manifest, cfg, net, where)
    if checkpoint is not _UNCHECKED:
        check_model(manifest, checkpoint, where)
    t = read_tensors(d)
    f = str(d / TENSORS)
    orders = {k[len("order."):]: v for k, v in t.items() if k.startswith("order.")}
    if orders:
        import torch

        from .reorder import Reorderer, find_groups
        shape = example_shape or net.input_shape
        ro = Reorderer(net, find_groups(net, torch.zeros(1, *shape)))
        try:
            ro.set_orders(orders)
        except (KeyError, ValueError) as e:
            raise TilesError(f"quant.load: {f}: channel orders do not fit the model: "
                             f"{e.args[0] if e.args else e}") from None
    layers, want = _expected(cfg, net)
    gran = cfg.granularity
    ranges = {}
    for l in layers:
        grid = gran.resolve(l.O, l.K, l.groups)
        wq = _tensor(t, f"{l.name}.weight_int", f, (l.O, l.K), "i")
        lo, hi = qrange(want["w_bits"], want["symmetric"])
        if wq.size and (wq.min() < lo or wq.max() > hi):
            raise TilesError(f"quant.load: {f}: layer {l.name}: integer weights outside "
                             f"{lo}..{hi} of {want['w_bits']} bits")
        s = _tensor(t, f"{l.name}.w_scales", f, grid.shape).astype(np.float64)
        a = _tensor(t, f"{l.name}.act_scale", f, (1,)).astype(np.float64)
        clamp = t.get(f"{l.name}.clamp")
        uns = t.get(f"{l.name}.act_unsigned")       # absent in exports made before act_signed
        unsigned = bool(uns is not None and int(np.asarray(uns).reshape(-1)[0]))
        q = LayerQuant(grid, s, float(a[0]), want["w_bits"], want["a_bits"],
                       clamp=None if clamp is None else clamp.astype(np.float64),
                       info={"loaded": str(d)}, symmetric=want["symmetric"],
                       act_unsigned=unsigned)
        try:
            q.check()
            if not (np.isfinite(a).all() and a[0] > 0):
                raise ValueError("activation scale must be finite and > 0")
        except ValueError as e:
            raise TilesError(f"quant.load: {f}: layer {l.name}: {e}") from None
        l.set_quant(q, wq=wq)               # the stored integers, not those of W
        if f"{l.name}.adc_ranges" in t:
            ranges[l.name] = t[f"{l.name}.adc_ranges"].astype(np.float64)
    return {"manifest": manifest, "orders": {g: [int(i) for i in p] for g, p in orders.items()},
            "adc_ranges": ranges, "float_layers": [l.name for l in net.layers if l.quant is None]}


def apply_adc_ranges(net: Network, ranges: dict, source: str = "") -> None:
    """Put stored per-array ADC ranges on the attached crossbar layers (``CrossbarGemm.set_ranges``);
    TilesError naming the layer when the count of arrays differs."""
    from .crossbar import array_op
    for name, r in ranges.items():
        op = array_op(net.layer(name))
        if op is None:
            continue
        if r.shape != (op.n_arrays,):
            raise TilesError(f"quant.load: {source}: layer {name}: {r.size} ADC ranges stored, "
                             f"the layer sits on {op.n_arrays} arrays")
        op.set_ranges(r)
