"""The searches over the segments' channel orders -- the paper's evolutionary search and the
weight-clustering orders of ``pimsim.reorder.cluster`` -- and the segment-wise calibration pass
both interleave with (``search_segments``).

**Evolutionary search** (``evolve``), per segment in network order: population
``population`` (the identity order plus random orders), ``generations`` times {score new orders;
keep the top 50%; breed each replacement from a random survivor by ``swaps`` random
transpositions; replace the worst}; the best order is applied, the segment calibrated for real,
and the search moves on. Seeded with ``numpy.random.default_rng(seed)``: same seed, same orders.

**Cluster** (``cluster``): per segment, the same loop, with the orders chosen from the weights'
tile magnitudes (``pimsim.reorder.cluster``) and checked by the same real score.

Both leave every quantized layer calibrated at the final orders exactly as
``pimsim.calibrate.calibrate`` would calibrate it (each layer was last calibrated after every
order upstream of it was final), so ``pimsim run`` does not calibrate again (tested).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..calibrate import method_params, quantize_layer, resolve_float_layers, run_lockstep
from ..methods import get_method
from ..network import Network
from ..quant import Granularity
from ..schema import defaults_of, int_in, one_of, setting
from .cluster import cluster_segment
from .groups import find_segments
from .permute import Reorderer
from .score import LayerScorer, SegmentScorer

METHODS = ("none", "random", "evolution", "cluster")
SCORES = ("gram", "output")


@dataclass(frozen=True)
class ReorderParams:
    """Channel reordering: the YAML section ``reorder:`` (``pimsim.config`` reads its keys,
    defaults, checks and docs from these fields) and the defaults of ``evolve``."""

    method: str = setting("none", "channel reordering: none, random (one seeded random joint "
                          "order), evolution (the paper's evolutionary search per segment) or "
                          "cluster (orders that group channels of matching tile magnitude, "
                          "pimsim.reorder.cluster)", one_of(METHODS))
    population: int = setting(20, "orders per generation of the search", int_in(2, 10000))
    generations: int = setting(30, "generations per segment", int_in(0, 100000))
    swaps: int = setting(2, "random channel transpositions per mutation", int_in(1, 10000))
    seed: int = setting(0, "seed of the random orders and of the search", int_in(0))
    restarts: int = setting(4, "cluster: random starting orders of the descent, besides the "
                            "current order", int_in(0, 1000))
    score: str = setting("gram", "cluster: how candidate orders are compared: gram (the "
                         "search's Gram score) or output (the error after the segment, "
                         "calibrated for real)", one_of(SCORES))


# the keyword defaults of ``evolve``
DEFAULTS = {k: v for k, v in defaults_of(ReorderParams).items()
            if k not in ("method", "restarts", "score")}


# --------------------------------------------------------------------------------------------
# segment-wise calibration
# --------------------------------------------------------------------------------------------

def calibrate_layers(net: Network, images: torch.Tensor, names: list[str], gran: Granularity,
                     w_bits: int, a_bits: int, method: str = "ptqsl", params: dict | None = None,
                     record=(), stop_after: str | None = None, on_record=None,
                     act_signed: str = "signed") -> dict:
    """Calibrate the named layers (in network order, each seeing the earlier quantized layers
    in fake mode) in one pass (``pimsim.calibrate.run_lockstep``) that stops after
    ``stop_after`` (default: the last named or recorded layer). Returns, for the layers in
    ``record``, ``{name: on_record(layer, input, float target)}``, computed when the pass
    reaches the layer (before it is calibrated); default: copies ``(input, target)``."""
    m = get_method(method)
    params = dict(params or {})
    names = [l.name for l in net.layers if l.name in set(names)]
    record = set(record)
    need = record | (set(names) if m.needs_target else set())
    for n in names:
        net.layer(n).clear_quant()
    kept = {}

    def visit(layer, x, t):
        if layer.name in record:
            if on_record is not None:
                kept[layer.name] = on_record(layer, x, t)
            else:                       # the pass's own values may change after this layer
                kept[layer.name] = (x.clone(), None if t is None else t.clone())
        if layer.name in names:
            quantize_layer(m.fn, layer, x, t, gran, w_bits, a_bits, params, act_signed)

    run_lockstep(net, images, {n: visit for n in set(names) | record}, targets=need,
                 stop_after=stop_after)
    return kept


# --------------------------------------------------------------------------------------------
# the evolutionary search
# --------------------------------------------------------------------------------------------

def check_search_params(population, generations, swaps, seed) -> None:
    check_ints((population, "population", 2), (generations, "generations", 0),
               (swaps, "swaps", 1), (seed, "seed", 0))


def check_ints(*checks) -> None:
    """ValueError naming the first ``(value, name, lowest)`` whose value is not an integer
    >= lowest."""
    for v, what, lo in checks:
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
           population: int = DEFAULTS["population"], generations: int = DEFAULTS["generations"],
           swaps: int = DEFAULTS["swaps"], seed: int = DEFAULTS["seed"],
           progress: bool = True, reorderer: Reorderer | None = None,
           symmetric: bool = False, act_signed: str = "signed") -> dict:
    """Evolutionary channel reordering per segment, in network order (module docstring).
    ``symmetric``: calibrate and score in the symmetric integer range of crossbar arrays;
    ``act_signed``: ``quant.act_signed`` of the calibration (``pimsim.calibrate``).

    Leaves ``net`` with the chosen joint orders and every non-float layer calibrated by
    ``method``, exactly as ``pimsim.calibrate.calibrate`` calibrates it at those orders (so a
    caller need not calibrate again). Returns ``{"method", "orders", "segments", "search_s",
    "scoring_s", ...}`` (``search_s``: the whole call, calibrations included).
    """
    check_search_params(population, generations, swaps, seed)

    def choose(sc, sizes, base, rng, bar, measure):
        return evolve_segment(sc, sizes, base, population, generations, swaps, rng, bar)

    res = search_segments(net, images, gran, w_bits, a_bits, choose, generations, method,
                          params, float_layers, seed, progress, reorderer, symmetric,
                          act_signed, "evolution", "gen")
    res.update(method="evolution", population=population, generations=generations,
               swaps=swaps)
    return res


def cluster(net: Network, images: torch.Tensor, gran: Granularity, w_bits: int, a_bits: int,
            method: str = "ptqsl", params: dict | None = None, float_layers="auto",
            restarts: int = 4, seed: int = DEFAULTS["seed"], progress: bool = True,
            reorderer: Reorderer | None = None, symmetric: bool = False,
            act_signed: str = "signed", score: str = "gram") -> dict:
    """Channel orders from the weights' tile magnitudes (``pimsim.reorder.cluster``), per
    segment in network order, each checked against the current order by the evolutionary
    search's real score. Leaves ``net`` reordered and calibrated as ``evolve`` does; returns
    the same kind of record (``"method": "cluster"``)."""
    check_ints((restarts, "restarts", 0), (seed, "seed", 0))
    if score not in SCORES:
        raise ValueError(f"reorder score must be one of {', '.join(SCORES)}, got {score!r}")

    def choose(sc, sizes, base, rng, bar, measure):
        out = cluster_segment(sc, sizes, base, rng, restarts=restarts,
                              measure=measure if score == "output" else None)
        bar.update(1)
        return out

    res = search_segments(net, images, gran, w_bits, a_bits, choose, 1, method, params,
                          float_layers, seed, progress, reorderer, symmetric, act_signed,
                          "cluster", "segment")
    res.update(method="cluster", restarts=restarts, score=score)
    return res


def output_error(net, images, ro, orders, base, todo, pos, end, nxt, sc, gran, w_bits, a_bits,
                 method, calib_params, act_signed) -> float:
    """The error after a segment at ``orders``: the layers the orders touch are calibrated for
    real (upstream layers keep their calibration), and the next GEMM layer ``nxt``'s float
    output on the quantized network's input is compared with its float network output
    (Euclidean, over the calibration batch). Without a next layer: ``-sc.score(orders)``.
    The orders are put back to ``base`` afterwards (the touched layers are left uncalibrated,
    to be calibrated again by whoever needs them)."""
    if nxt is None:
        return -sc.score(orders)
    def err(layer, x, t):
        with torch.no_grad():
            return float(torch.linalg.vector_norm((layer.float_forward(x) - t).double()))

    ro.set_orders(orders)
    names = [n for n in todo if pos[n] <= end and net.layer(n).quant is None]
    try:
        got = calibrate_layers(net, images, names, gran, w_bits, a_bits, method, calib_params,
                               record=[nxt], stop_after=nxt, on_record=err,
                               act_signed=act_signed)
    finally:
        ro.set_orders(base)
        for n in names:                 # calibrated at ``orders``: not valid at ``base``
            net.layer(n).clear_quant()
    return got[nxt]


def search_segments(net: Network, images: torch.Tensor, gran: Granularity, w_bits: int,
                    a_bits: int, choose, steps: int, method: str, params, float_layers, seed: int,
                    progress: bool, reorderer: Reorderer | None, symmetric: bool,
                    act_signed: str, name: str, unit: str) -> dict:
    """The per-segment loop both searches share: calibrate what a segment's inputs depend on,
    form its layers' scorers when the pass reaches them, let ``choose(scorer, sizes, base,
    rng, bar, measure)`` pick the segment's orders (``bar`` advanced ``steps`` times per
    segment; ``measure(orders)``: the segment's output error at those orders, ``output_error``),
    apply them, and clear the calibration of every layer the change reaches."""
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
    bar = tqdm(total=steps * len(segs), desc=f"reorder ({name})", disable=not progress,
               leave=False, unit=unit)
    t_search = 0.0
    try:
        for seg in segs:
            qlayers = [n for n in seg.layers if n not in keep]
            info = {"segment": seg.index, "groups": seg.groups, "layers": seg.layers}
            if not qlayers:
                seg_info.append({**info, "skipped": "all its layers stay in float"})
                bar.update(steps)
                continue
            # calibrate (at the current orders) whatever the segment's inputs depend on
            end = max(pos[n] for n in seg.layers)
            upto = [n for n in todo if pos[n] <= end and net.layer(n).quant is None]
            # each layer's scorer (its Gram statistics) is formed when the pass reaches it:
            # no segment layer's input and target are held beyond it
            build_s = [0.0]

            def scorer(layer, x, t):
                t1 = time.perf_counter()
                sc_ = LayerScorer(layer, x, t, gran, w_bits, a_bits, search_params)
                build_s[0] += time.perf_counter() - t1
                return sc_
            by_name = calibrate_layers(net, images, upto, gran, w_bits, a_bits, method,
                                       calib_params, record=qlayers, on_record=scorer,
                                       act_signed=act_signed)
            t0 = time.perf_counter() - build_s[0]
            scorers = [by_name[n] for n in qlayers]
            sc = SegmentScorer(scorers, ro)
            sizes = {g: ro.free[g].size for g in seg.groups}
            base = {g: ro.orders[g].copy() for g in seg.groups}
            nxt = next((l.name for l in net.layers if pos[l.name] > end), None)

            def measure(orders, base=base, nxt=nxt, end=end):
                return output_error(net, images, ro, orders, base, todo, pos, end, nxt, sc,
                                    gran, w_bits, a_bits, method, calib_params, act_signed)
            res = choose(sc, sizes, base, rng, bar, measure)
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
            calibrate_layers(net, images, rest, gran, w_bits, a_bits, method, calib_params,
                             act_signed=act_signed)
    finally:
        bar.close()
    net.set_mode("fake")
    return {"method": name, "orders": ro.orders_json(), "segments": seg_info,
            "search_s": time.perf_counter() - t_start, "scoring_s": t_search, "seed": seed,
            "calibrated": {"method": method, "w_bits": w_bits, "a_bits": a_bits,
                           "symmetric": bool(symmetric), "act_signed": act_signed,
                           "float_layers": sorted(keep)}}
