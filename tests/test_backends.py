"""Backends as objects (pimsim.backends), network.py free of backend imports, and one ADC
count shared by the array simulation and the cost model (pimsim.crossbar.adc_conversions)."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pimsim import backends
from pimsim.calibrate import calibrate, symmetric_quant
from pimsim.cost import CostParams, config_cost, traced_cost
from pimsim.crossbar import Crossbar, adc_stats, attach, reset_adc_stats
from pimsim.kernels import tiled_matmul_reference
from pimsim.models import build_model
from pimsim.network import build_network
from pimsim.quant import Granularity
from pimsim.testing import data_dir_or_skip

ROOT = Path(__file__).resolve().parents[1]
BACKEND_MODULES = ("pimsim.crossbar", "pimsim.backends.float", "pimsim.backends.fake",
                   "pimsim.backends.kernel", "pimsim.array_kernels")


def test_network_imports_no_backend():
    """network.py's own imports name only the registry (pimsim.backends), and importing it
    loads no backend module (the built-ins are registered by name, imported on first use)."""
    tree = ast.parse((ROOT / "pimsim" / "network.py").read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mods.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    assert ".backends" in mods
    assert not {m for m in mods if "crossbar" in m or m.startswith(".backends.")}, mods
    code = ("import sys, pimsim.network; "
            f"print([m for m in {BACKEND_MODULES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def _small_net(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 12, 3, stride=2), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(12 * 7 * 7, 5))
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    net = build_network(model)
    calibrate(net, x, Granularity.tile(4, 20), 4, 8, float_layers=[], progress=False)
    return net, x


class ReferenceBackend(backends.IntegerBackend):
    """A backend added by a test: Eq. 5 by the plain NumPy reference of pimsim.kernels."""

    name = "reference"

    def __init__(self, layer):
        self.layer = layer

    def gemm(self, xq, act_scale, bias):
        q = self.layer.quant
        y = tiled_matmul_reference(self.layer.wq, xq.numpy().T, q.w_scales, q.grid, act_scale)
        return (y.T + bias.numpy()).astype(np.float32)

    def conv(self, xq4, act_scale, kernel_size, stride, padding, dilation, bias):
        cols = torch.nn.functional.unfold(xq4, kernel_size, dilation=dilation, padding=padding,
                                          stride=stride)                  # B x K x L
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return self.gemm(rows, act_scale, bias)


def test_registered_backend_runs_through_set_mode():
    """Adding a backend is registering a factory: set_mode selects it, every quantized layer
    holds an instance built from its LayerQuant, and it computes what the kernel backend does."""
    net, x = _small_net()
    backends.register_backend("reference", ReferenceBackend, replace=True)
    try:
        with torch.no_grad():
            net.set_mode("kernel")
            yk = net(x)
            net.set_mode("reference")
            yr = net(x)
        assert all(l.mode == "reference" and isinstance(l.backend, ReferenceBackend)
                   for l in net.layers)
        np.testing.assert_allclose(yr.numpy(), yk.numpy(), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="already registered"):
            backends.register_backend("reference", ReferenceBackend)
    finally:
        backends._FACTORIES.pop("reference", None)
    with pytest.raises(ValueError, match=r"mode must be one of \('float', 'fake', 'kernel', "
                                         r"'crossbar'\), got 'reference'"):
        net.set_mode("reference")


def test_backend_dropped_with_its_quantization():
    """A layer's backends belong to its LayerQuant: a new quantization rebuilds them."""
    net, x = _small_net()
    l = net.layers[1]
    net.set_mode("kernel")
    b0 = l.backend
    assert l.backend is b0                                  # built once, then held
    q = l.quant
    l.set_quant(type(q)(q.grid, q.w_scales * 2, q.act_scale, q.w_bits, q.a_bits))
    assert l.backend is not b0 and l.backend_of("kernel") is l.backend


def test_symmetric_quant_alias_and_hooks_context():
    net, x = _small_net()
    q = net.layers[0].quant
    assert not q.symmetric and q.as_symmetric().symmetric and symmetric_quant(q, False) is q
    assert symmetric_quant(q, True) == q.as_symmetric()
    seen = []
    with net.hooks({net.layers[1].name: lambda layer, inp: seen.append(inp.shape)}):
        with torch.no_grad():
            net(x)
    assert seen == [torch.Size([6, 8, 16, 16])] and all(l.hook is None for l in net.layers)


# --------------------------------------------------------------------------------------------
# ADC conversions: the simulation's counters = the cost model = a count from the crossbar docs
# --------------------------------------------------------------------------------------------

RESNET20_LAYERS = ([(16, 144, 1024)] * 6 + [(32, 144, 256)] + [(32, 288, 256)] * 5
                   + [(64, 288, 64)] + [(64, 576, 64)] * 5)      # (O, K, output pixels at 32x32)


def _expected_conversions(xb: Crossbar, c: int, r: int, w_bits: int, a_bits: int,
                          images: int) -> int:
    """From the crossbar's description: every cycle converts every used bit line; an input
    vector (one output pixel of one image) is applied bit-serially, ceil((a-1)/dac) cycles per
    sign pass (1 pass: the inputs are post-ReLU); each column block of c inputs is cut into
    ceil(c/rows) segments of its own arrays, each holding all O rows; a weight uses 2 * slices
    bit lines (differential) or slices bit lines plus `slices` reference columns per array
    (offset), slices = ceil(magnitude bits / cell_bits)."""
    total = 0
    for O, K, P in RESNET20_LAYERS:
        cycles = math.ceil((a_bits - 1) / xb.dac_bits)
        blocks = [min(c, K - j) for j in range(0, K, c)]
        segments = sum(math.ceil(cj / xb.rows) for cj in blocks)
        if xb.signed == "differential":
            cols = O * 2 * math.ceil((w_bits - 1) / xb.cell_bits)
        else:
            s = math.ceil(w_bits / xb.cell_bits)
            per_array = (xb.cols - s) // (r * s)          # row blocks side by side
            arrays = math.ceil(math.ceil(O / r) / per_array)
            cols = O * s + s * arrays
        total += P * images * cycles * segments * cols
    return total


@pytest.mark.parametrize("xb", [
    Crossbar(rows=64, cols=64, cell_bits=2, dac_bits=2, adc_bits=5, signed="differential"),
    Crossbar(rows=32, cols=64, cell_bits=2, dac_bits=1, adc_bits=0, signed="offset"),
])
def test_adc_conversions_simulated_equal_cost_model(xb):
    """ResNet-20 (random weights) on simulated arrays, 2 images: the conversions the crossbar
    backend counted = the cost model's adc_conversions x images = the count by hand."""
    torch.manual_seed(0)
    net = build_network(build_model("resnet20"))
    images = 2
    x = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    w_bits, a_bits, (r, c) = 4, 8, (16, 48)
    gran = Granularity.tile(r, c)
    calibrate(net, x, gran, w_bits, a_bits, progress=False, symmetric=True)
    mapping = attach(net, xb, gran, strict=False)        # 48-input tiles split on 32 rows
    net.set_mode("crossbar")
    reset_adc_stats(net)
    with torch.no_grad():
        net(x)
    counted = sum(n for _, n in adc_stats(net).values())
    res = traced_cost(net, mapping, CostParams(input_passes=1), gran)
    assert len(res["layers"]) == len(RESNET20_LAYERS) == len(adc_stats(net))
    assert [(l["O"], l["K"], l["pixels"]) for l in res["layers"]] == RESNET20_LAYERS
    want = _expected_conversions(xb, c, r, w_bits, a_bits, images)
    assert counted == want
    assert res["totals"]["adc_conversions"] * images == want
    for l in res["layers"]:                   # per layer too
        assert adc_stats(net)[l["name"]][1] == l["adc_conversions"] * images


# --------------------------------------------------------------------------------------------
# pimsim cost and pimsim run report the same cost
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,backend", [("isaac.yaml", "crossbar"),
                                            ("method2-r4-m4.yaml", "kernel")])
def test_cli_cost_equals_run_cost(tmp_path, config, backend):
    data_dir_or_skip()
    from pimsim.cli import main
    from pimsim.config import load
    cfg_path = ROOT / "hwconfigs" / config
    sets = ["--set", "quant.calibration=max", "--set", "quant.calib_images=16",
            "--set", "eval.threads=1", "--set", f"eval.backend={backend}"]
    run_out, cost_out = tmp_path / "run.json", tmp_path / "cost.json"
    assert main(["run", str(cfg_path), "--limit", "4", "-q", "--out", str(run_out)] + sets) == 0
    assert main(["cost", str(cfg_path), "--out", str(cost_out)] + sets) == 0
    run_cost = json.loads(run_out.read_text())["cost"]
    cost = json.loads(cost_out.read_text())["totals"]
    assert run_cost == cost
    # and both are the figures of the config's network: not a table of zeros
    direct = config_cost(load(cfg_path, [s for s in sets if s != "--set"]))["totals"]
    assert direct == cost and cost["adc_conversions"] > 0 and cost["arrays"] > 0
