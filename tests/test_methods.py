"""The calibration-method registry (pimsim.methods): built-ins always present, a registered
method is selectable from YAML and runs through calibrate, errors name what is allowed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from pimsim import methods, ptqsl
from pimsim.calibrate import calibrate
from pimsim.config import ConfigError, validate
from pimsim.network import LayerQuant, build_network
from pimsim.simulate import calibration_params

BUILTIN = ["max", "mse", "ptqsl"]


@pytest.mark.parametrize("module", ["pimsim.calibrate", "pimsim.config", "pimsim.ptqsl",
                                    "pimsim.reorder"])
def test_builtins_registered_on_any_import(module):
    """A fresh interpreter that imports only ``module`` sees the three built-in methods as soon
    as it can look one up."""
    code = (f"import {module}, sys\n"
            "from pimsim.methods import get_method, method_names\n"
            "print(method_names(), get_method('ptqsl').needs_target,"
            " get_method('mse').needs_target, get_method('max').needs_target)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['max', 'mse', 'ptqsl'] True False False"


def test_builtin_records():
    assert methods.method_names() == BUILTIN
    assert methods.get_method("ptqsl").fn is ptqsl.ptqsl_method
    assert methods.get_method("mse").fn is ptqsl.mse_method
    assert methods.get_method("ptqsl").check_params is ptqsl.check_params
    assert methods.get_method("max").check_params is None


def tiny_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    return build_network(model.eval())


@pytest.fixture
def toy():
    """A third-party method: half the max scale per tile, activation scale from max|x|; it
    records what it was given. Its check_params refuses the cosine metric."""
    calls = []

    def fn(layer, x, target, gran, w_bits, a_bits, params):
        calls.append((layer.name, target is not None, dict(params)))
        grid = gran.resolve(layer.O, layer.K)
        W = layer.weight_matrix().astype(np.float64)
        s = np.abs(W).max(1, keepdims=True) / (2 ** (w_bits - 1) - 1) * 0.5   # channelwise
        return LayerQuant(grid, s, float(x.abs().max()) / (2 ** (a_bits - 1) - 1), w_bits,
                          a_bits, info={"method": "toy"})

    def check(params):
        if params.get("metric", "euclidean") != "euclidean":
            raise ValueError(f"metric must be euclidean, got {params['metric']!r}")
        return params

    methods.register_method("toy", fn, needs_target=True, check_params=check)
    try:
        yield calls
    finally:
        methods.unregister_method("toy")
    assert methods.method_names() == BUILTIN


def test_registered_method_from_yaml_through_calibrate(toy):
    cfg = validate({"quant": {"calibration": "toy", "tile": "channelwise", "weight_bits": 3,
                              "act_bits": 5, "search": {"candidates": 7}}}, "toy.yaml")
    assert cfg["quant.calibration"] == "toy"
    net = tiny_net()
    w0 = {l.name: l.weight_matrix().astype(np.float64) for l in net.layers}
    x = torch.randn(4, 3, 6, 6)
    info = calibrate(net, x, cfg.granularity, cfg["quant.weight_bits"], cfg["quant.act_bits"],
                     method=cfg["quant.calibration"], float_layers=[], progress=False,
                     params=calibration_params(cfg))
    assert info["float_layers"] == []
    names = [l.name for l in net.layers]
    assert [c[0] for c in toy] == names                       # every layer, in order
    assert all(c[1] for c in toy)                             # needs_target -> a target
    assert toy[0][2] == {"alpha": 0.5, "beta": 1.2, "candidates": 7, "rounds": 3,
                         "mode": "gram", "act_search": "golden", "metric": "euclidean",
                         "alternate": 1, "start": "act", "extend": None}
    for l in net.layers:                                      # the toy's scales, by hand
        expect = np.abs(w0[l.name]).max(1) / 3 * 0.5
        np.testing.assert_allclose(l.quant.w_scales.reshape(-1), expect, rtol=1e-12)
        assert l.quant.info["method"] == "toy" and l.mode == "fake"
    # the first layer's activation scale comes from the raw input
    assert net.layers[0].quant.act_scale == pytest.approx(float(x.abs().max()) / 15)


def test_registered_method_params_checked_by_config(toy):
    with pytest.raises(ConfigError) as e:
        validate({"quant": {"calibration": "toy", "metric": "cosine"}}, "toy.yaml")
    assert str(e.value) == ("toy.yaml: quant.calibration: toy: its options (quant.search, "
                            "quant.metric): metric must be euclidean, got 'cosine'")
    # the same options are fine for a built-in method
    assert validate({"quant": {"calibration": "ptqsl", "metric": "cosine"}})["quant.metric"] \
        == "cosine"


def test_unregistered_method_is_refused():
    with pytest.raises(ConfigError) as e:
        validate({"quant": {"calibration": "toy"}}, "toy.yaml")
    assert str(e.value) == "toy.yaml: quant.calibration: toy: must be one of max, mse, ptqsl"
    with pytest.raises(ValueError, match=r"must be one of \['max', 'mse', 'ptqsl'\], got 'toy'"):
        calibrate(tiny_net(), torch.zeros(1, 3, 6, 6), validate({}).granularity, 4, 8,
                  method="toy", progress=False)
    with pytest.raises(ValueError, match="got 'toy'"):
        methods.unregister_method("toy")


def test_register_errors(toy):
    with pytest.raises(ValueError, match="'toy' is already registered"):
        methods.register_method("toy", lambda *a: None)
    with pytest.raises(ValueError, match="non-empty string"):
        methods.register_method("", lambda *a: None)
    with pytest.raises(ValueError, match="fn must be callable"):
        methods.register_method("other", 3)
    with pytest.raises(ValueError, match="check_params must be callable"):
        methods.register_method("other", lambda *a: None, check_params="no")
    assert "other" not in methods.method_names()
    old = methods.get_method("toy")
    new = methods.register_method("toy", old.fn, needs_target=False, replace=True)
    assert methods.get_method("toy") is new and not new.needs_target


def test_calibrate_checks_params_before_the_pass():
    """A bad option is refused by the method's check_params before the pass, even when no
    layer would reach the method."""
    net = tiny_net()
    with pytest.raises(ValueError, match="candidates"):
        calibrate(net, torch.randn(2, 3, 6, 6), validate({}).granularity, 4, 8,
                  method="ptqsl", float_layers=[l.name for l in net.layers], progress=False,
                  params={"candidates": 0})
