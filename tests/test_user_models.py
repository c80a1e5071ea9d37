"""User models: ``model.factory`` (+ ``model.kwargs``, ``model.checkpoint``, ``model.strict``),
tracing of what real models contain (token Linear, F.linear on a module's own weight, the
torch-only ops), and the matrix products left to digital logic (``digital_layers``: listed,
counted by hand here, costed, refused when strict)."""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fakedata import ROOT, make_fetch_layout
from pimsim.calibrate import calibrate
from pimsim.cli import main
from pimsim.config import ConfigError, validate
from pimsim.cost import CostParams, config_cost
from pimsim.crossbar import Crossbar, attach
from pimsim.models import CheckpointError
from pimsim.network import UnsupportedModelError, build_network
from pimsim.quant import Granularity
from pimsim.testing import restored_threads

EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def _restore_threads():
    with restored_threads():
        yield


MODEL_FILE = '''
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self, width=4, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def build(width=4, classes=3):
    return Net(width, classes)


def broken(width=4):
    raise RuntimeError("no GPU here, width " + str(width))


def not_a_model():
    return 42


VALUE = 3
'''


def _config(tmp_path, model: dict, name="cfg.yaml"):
    """A validated config whose source is a YAML file in ``tmp_path`` (relative factory paths
    resolve beside it)."""
    src = tmp_path / name
    src.write_text("# test\n")
    return validate({"model": model, "quant": {"calibration": "max"}}, str(src))


def _reference_net(**kw):
    ns = {}
    exec(compile(MODEL_FILE, "<model>", "exec"), ns)        # the file's own class, directly
    return ns["Net"](**kw)


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------
# model.factory forms
# --------------------------------------------------------------------------------------------

def test_factory_file_relative_to_yaml(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.py").write_text(MODEL_FILE)
    monkeypatch.chdir("/")                          # not found from the working directory
    cfg = _config(tmp_path, {"factory": "models/mine.py:build", "kwargs": {"width": 6}})
    assert cfg["model.name"] is None and cfg.model_label == "models/mine.py:build"
    m = cfg.build_model()
    assert type(m).__name__ == "Net" and m.conv.out_channels == 6 and not m.training


def test_factory_file_absolute(tmp_path):
    f = tmp_path / "abs_model.py"
    f.write_text(MODEL_FILE)
    other = tmp_path / "elsewhere"
    other.mkdir()
    cfg = _config(other, {"factory": f"{f}:build", "kwargs": {"classes": 5}})
    assert cfg.build_model().fc.out_features == 5


def test_factory_package_module(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "userpkg_h1"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(MODEL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    cfg = _config(tmp_path, {"factory": "userpkg_h1.nets:build", "kwargs": {"width": 2}})
    assert cfg.build_model().conv.out_channels == 2


def test_factory_kwargs_from_set_override(tmp_path):
    (tmp_path / "m.py").write_text(MODEL_FILE)
    src = tmp_path / "c.yaml"
    src.write_text("")
    cfg = validate({"model": {"factory": "m.py:build"}}, str(src), [("model.kwargs.width", 7)])
    assert cfg["model.kwargs"] == {"width": 7} and cfg.build_model().conv.out_channels == 7


# --------------------------------------------------------------------------------------------
# errors: one line, naming the file and the key
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, key, words", [
    ({"factory": "nofile.py:build"}, "model.factory", ["model file not found", "nofile.py"]),
    ({"factory": "no_such_pkg_h1.mod:build"}, "model.factory", ["module no_such_pkg_h1.mod not found"]),
    ({"factory": "m.py:missing"}, "model.factory", ["has no function 'missing'", "build"]),
    ({"factory": "m.py:VALUE"}, "model.factory", ["VALUE is a int, not a function"]),
    ({"factory": "m.py:broken", "kwargs": {"width": 9}}, "model.factory",
     ["broken(width=9) raised RuntimeError: no GPU here, width 9"]),
    ({"factory": "m.py:not_a_model"}, "model.factory", ["returned a int, not a torch.nn.Module"]),
    ({"factory": "m.py:build", "kwargs": {"depth": 3}}, "model.factory",
     ["build(depth=3) raised TypeError", "depth"]),
])
def test_factory_errors_at_build(tmp_path, model, key, words):
    (tmp_path / "m.py").write_text(MODEL_FILE)
    cfg = _config(tmp_path, model)
    with pytest.raises(ConfigError) as e:
        cfg.build_model()
    msg = _one_line(e)
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'}: {key}: "), msg
    for w in words:
        assert w in msg, msg


def test_factory_file_raising_on_import(tmp_path):
    (tmp_path / "bad.py").write_text("import torch\nraise ImportError('needs timm')\n")
    cfg = _config(tmp_path, {"factory": "bad.py:build"})
    with pytest.raises(ConfigError) as e:
        cfg.build_model()
    msg = _one_line(e)
    assert "model.factory" in msg and "bad.py raised ImportError: needs timm" in msg


@pytest.mark.parametrize("model, key, words", [
    ({"factory": "m.py"}, "model.factory", ["FILE.py:FUNCTION"]),
    ({"factory": "m.py:not-a-name"}, "model.factory", ["FILE.py:FUNCTION"]),
    ({"factory": "a b:build"}, "model.factory", ["neither a .py file nor a dotted module"]),
    ({"factory": 3}, "model.factory", ["FILE.py:FUNCTION"]),
    ({"factory": "m.py:build", "name": "resnet20"}, "model.name", ["not both"]),
    ({"kwargs": {"width": 3}}, "model.kwargs", ["only with model.factory"]),
    ({"factory": "m.py:build", "kwargs": [1]}, "model.kwargs", ["must be a mapping"]),
    ({"factory": "m.py:build", "kwargs": {"1x": 1}}, "model.kwargs", ["argument names"]),
    ({"factory": "m.py:build", "strict": "yes"}, "model.strict", ["true or false"]),
])
def test_factory_config_errors(tmp_path, model, key, words):
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, model)
    msg = _one_line(e)
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'}: {key}: "), msg
    for w in words:
        assert w in msg, msg


# --------------------------------------------------------------------------------------------
# checkpoints of factory models
# --------------------------------------------------------------------------------------------

def _trained_state(seed=3):
    torch.manual_seed(seed)
    net = _reference_net(width=4, classes=3)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("form", ["plain", "state_dict", "module_prefix", "safetensors"])
def test_checkpoint_forms_load_the_same_tensors(tmp_path, form):
    (tmp_path / "m.py").write_text(MODEL_FILE)
    state = _trained_state()
    if form == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pt"
        obj = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
               "module_prefix": {"module." + k: v for k, v in state.items()}}[form]
        torch.save(obj, path)
    cfg = _config(tmp_path, {"factory": "m.py:build", "checkpoint": path.name})
    from pimsim.config import resolve_checkpoint
    ckpt = resolve_checkpoint(cfg, None)
    assert ckpt == path
    got = cfg.build_model(ckpt).state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def test_checkpoint_null_keeps_the_initial_weights(tmp_path):
    (tmp_path / "m.py").write_text(MODEL_FILE)
    cfg = _config(tmp_path, {"factory": "m.py:build"})
    from pimsim.config import resolve_checkpoint
    assert resolve_checkpoint(cfg, None) is None
    torch.manual_seed(11)
    a = cfg.build_model().state_dict()
    torch.manual_seed(11)
    b = _reference_net().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("edit, words", [
    (lambda s: {k: v for k, v in s.items() if k != "fc.bias"}, ["missing keys: fc.bias"]),
    (lambda s: {**s, "extra.weight": torch.zeros(2)}, ["unexpected keys: extra.weight"]),
    (lambda s: {**s, "fc.weight": torch.zeros(3, 8)}, ["shape mismatch: fc.weight (3, 8) vs model (3, 4)"]),
])
def test_checkpoint_not_fitting(tmp_path, edit, words):
    (tmp_path / "m.py").write_text(MODEL_FILE)
    torch.save(edit(_trained_state()), tmp_path / "w.pt")
    cfg = _config(tmp_path, {"factory": "m.py:build", "checkpoint": "w.pt"})
    with pytest.raises(CheckpointError) as e:
        cfg.build_model(tmp_path / "w.pt")
    msg = _one_line(e)
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'}: model.checkpoint: {tmp_path / 'w.pt'}"), msg
    for w in words:
        assert w in msg, msg


def test_checkpoint_never_runs_code(tmp_path):
    from fakedata import Payload
    (tmp_path / "m.py").write_text(MODEL_FILE)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": Payload(marker)}, tmp_path / "evil.pt")
    cfg = _config(tmp_path, {"factory": "m.py:build", "checkpoint": "evil.pt"})
    with pytest.raises(CheckpointError):
        cfg.build_model(tmp_path / "evil.pt")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# tracing: token Linear, F.linear on a module's weight, ops that just run in torch
# --------------------------------------------------------------------------------------------

class _Tokens(nn.Module):
    """Patch embedding -> B x T x F tokens -> a Linear on the tokens -> pooled head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.tok = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)            # B x T x 8
        return self.head(F.gelu(self.tok(t)).mean(1))


def _capture(net, x, name):
    got = {}

    def hook(layer, xin):
        got["x"] = xin.detach().clone()
        return None
    net.run_with_hooks(x, {name: hook})
    return got["x"]


def _dequantized_reference(layer, xin):
    """F.linear on the dequantized operands, built here from the integer weights, the tile
    scales repeated over each r x c tile by hand, and round/clamp of the input."""
    q = layer.quant
    O, K = layer.O, layer.K
    s = np.zeros((O, K))
    for i in range(math.ceil(O / q.grid.r)):
        for j in range(math.ceil(K / q.grid.c)):
            s[i * q.grid.r:(i + 1) * q.grid.r, j * q.grid.c:(j + 1) * q.grid.c] = q.w_scales[i, j]
    lo = -(2 ** (q.a_bits - 1)) + (1 if q.symmetric else 0)
    hi = 2 ** (q.a_bits - 1) - 1
    xq = np.clip(np.round(xin.double().numpy() / q.act_scale), lo, hi) * q.act_scale
    w = layer.wq.astype(np.float64) * s
    return F.linear(torch.from_numpy(xq), torch.from_numpy(w),
                    layer.bias.double()).numpy()


@pytest.mark.parametrize("method", ["max", "ptqsl"])
def test_token_linear_backends_match_f_linear(method):
    torch.manual_seed(0)
    model = _Tokens().eval()
    x = torch.randn(3, 3, 8, 8)
    net = build_network(model)
    assert [l.kind for l in net.layers] == ["conv", "linear", "linear"]
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-5)
    calibrate(net, x, Granularity.tile(4, 4), 4, 8, method=method, float_layers=["embed"],
              progress=False, params={"candidates": 10, "rounds": 1} if method == "ptqsl" else None,
              symmetric=True)
    tok = net.layer("tok")
    xin = _capture(net, x, "tok")
    assert xin.shape == (3, 16, 8)                              # B x T x F
    want = _dequantized_reference(tok, xin)
    assert want.shape == (3, 16, 6)
    attach(net, Crossbar(rows=8, cols=16), Granularity.tile(4, 4))   # ideal ADC: exact
    with torch.no_grad():
        for mode in ("fake", "kernel", "crossbar"):
            got = tok.run_backend(mode, xin).double().numpy()
            assert got.shape == (3, 16, 6), mode
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), mode


def test_token_linear_cost_counts_every_token():
    net = build_network(_Tokens())
    from pimsim.cost import network_shapes
    shapes = {s.name: s for s in network_shapes(net, (8, 8))}
    assert shapes["tok"].pixels == 16 and shapes["head"].pixels == 1
    assert shapes["embed"].pixels == 16


class _OwnWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = F.conv2d(F.relu(self.conv(x)), self.proj.weight, self.proj.bias, stride=2)
        return F.linear(y.mean((2, 3)), self.fc.weight, self.fc.bias)


def test_functional_call_with_module_weight_is_that_modules_gemm():
    torch.manual_seed(1)
    model = _OwnWeight().eval()
    net = build_network(model)
    assert [(l.name, l.kind) for l in net.layers] == [("conv", "conv"), ("proj", "conv"),
                                                      ("fc", "linear")]
    assert net.layer("proj").stride == (2, 2) and net.digital_layers == []
    x = torch.randn(2, 3, 8, 8)
    ref = F.linear(F.conv2d(F.relu(F.conv2d(x, model.conv.weight, model.conv.bias, padding=1)),
                            model.proj.weight, model.proj.bias, stride=2).mean((2, 3)),
                   model.fc.weight, model.fc.bias)
    with torch.no_grad():
        assert torch.allclose(net(x), ref, atol=1e-6)
    calibrate(net, x, Granularity.channelwise(), 8, 8, float_layers=[], progress=False)
    assert net.layer("proj").quant is not None


class _SharedFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return F.linear(self.fc(y), self.fc.weight)


def test_weight_sharing_through_functional_refused():
    with pytest.raises(UnsupportedModelError, match="fc"):
        build_network(_SharedFunctional())


class _TorchOps(nn.Module):
    """Everything here runs in torch: activations, LayerNorm, Dropout, Identity, pooling,
    cat, flatten / view / reshape, mean."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.acts = nn.Sequential(nn.ReLU6(), nn.Hardswish(), nn.SiLU(), nn.GELU(), nn.Identity(),
                                  nn.Dropout(0.5))
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.mpool = nn.AdaptiveMaxPool2d(2)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        y = torch.cat([self.acts(self.a(x)), F.silu(self.b(x))], 1)       # B x 8 x H x W
        y = self.pool(y) + self.mpool(y)
        y = y.view(y.shape[0], -1).reshape(-1, 32)
        y = self.norm(torch.flatten(y, 1))
        return self.fc(y) + y.mean(1, keepdim=True)


def test_torch_ops_trace_and_run():
    torch.manual_seed(2)
    model = _TorchOps().eval()
    x = torch.randn(4, 3, 6, 6)
    net = build_network(model)
    assert [l.name for l in net.layers] == ["a", "b", "fc"] and net.digital_layers == []
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(net(x), ref, atol=1e-5)
    calibrate(net, x, Granularity.channelwise(), 8, 8, float_layers=[], progress=False)
    net.set_mode("kernel")
    with torch.no_grad():
        got = net(x)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


# --------------------------------------------------------------------------------------------
# digital layers
# --------------------------------------------------------------------------------------------

class _Attention(nn.Module):
    """A single-head attention block on patch tokens: q, k, v projections on arrays, the two
    activation x activation products q k^T and attn v digital."""

    def __init__(self, d=8):
        super().__init__()
        self.d = d
        self.embed = nn.Conv2d(3, d, 4, stride=4)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)            # B x T x d
        q, k, v = self.q(t), self.k(t), self.v(t)
        att = (q @ k.transpose(-2, -1) / self.d ** 0.5).softmax(-1)
        return self.head((att @ v).mean(1))


def test_attention_products_listed_with_hand_mac_count():
    net = build_network(_Attention(), input_shape=(3, 16, 16))
    T, d = (16 // 4) ** 2, 8
    assert [l.name for l in net.layers] == ["embed", "q", "k", "v", "head"]
    assert net.digital_layers == [
        {"name": "matmul", "op": "matmul", "macs": T * T * d},          # q k^T
        {"name": "matmul_1", "op": "matmul", "macs": T * T * d},        # attn v
    ]
    # another input size: measured again (T = 64)
    again = net.count_digital((3, 32, 32))
    assert [d_["macs"] for d_ in again] == [64 * 64 * d] * 2


def test_digital_modules_listed_with_hand_mac_count():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.rnn = nn.GRU(8, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)        # 1 x 4 x 8
            a, _ = self.mha(t, t, t)
            return self.head(self.rnn(a)[0].mean(1))

    net = build_network(M(), input_shape=(3, 8, 8))
    T, E, H = 4, 8, 5
    mha = 3 * T * E * E + 2 * T * T * E + T * E * E     # in-projections, q k^T and a v, out
    gru = T * 3 * H * (E + H)
    assert net.digital_layers == [{"name": "mha", "op": "MultiheadAttention", "macs": mha},
                                  {"name": "rnn", "op": "GRU", "macs": gru}]


def test_strict_refuses_digital_layers():
    with pytest.raises(UnsupportedModelError) as e:
        build_network(_Attention(), input_shape=(3, 16, 16), strict=True)
    msg = _one_line(e)
    assert "'matmul'" in msg and "strict" in msg


def test_cost_counts_digital_layers(tmp_path):
    f = tmp_path / "att.py"
    f.write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_user_models import _Attention
        def build():
            return _Attention()
    '''))
    cfg = validate({"model": {"factory": f"{f}:build"}, "quant": {"float_layers": []}},
                   str(tmp_path / "c.yaml"))
    res = config_cost(cfg)
    T, d = 64, 8                                              # 32 x 32 images, 4 x 4 patches
    macs = 2 * T * T * d
    p = CostParams()
    t = res["totals"]
    assert t["digital_layer_macs"] == macs
    assert t["digital_layer_energy_nj"] == pytest.approx(macs * (p.mult_pj + p.add_pj) / 1e3)
    lat = sum(math.ceil(T * T * d / p.digital_lanes) * p.digital_op_ns for _ in range(2)) / 1e3
    assert t["digital_layer_latency_us"] == pytest.approx(lat)
    arrays_energy = sum(l["energy_nj"] for l in res["layers"])
    assert t["energy_nj"] == pytest.approx(arrays_energy + t["digital_layer_energy_nj"])
    assert [x["name"] for x in res["digital_layers"]] == ["matmul", "matmul_1"]
    assert {l["name"]: l["pixels"] for l in res["layers"]}["q"] == T


# --------------------------------------------------------------------------------------------
# end to end: the example through the CLI, a model with attention, strict
# --------------------------------------------------------------------------------------------

QUICK = ["--backend", "fake", "--set", "quant.calibration=max", "--set", "quant.calib_images=8",
         "--set", "eval.threads=1", "-q"]


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    return make_fetch_layout(tmp_path_factory.mktemp("data"), n_train=20, n_test=50)


def test_example_runs_through_cli(fake_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["run", str(EXAMPLES / "tiny_cnn.yaml"), "--limit", "50", "--data-dir",
               str(fake_data), "--out", str(out), *QUICK])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    res = json.loads(out.read_text())
    assert res["checkpoint"] is None and res["config"]["model"]["checkpoint"] is None
    assert res["config"]["model"]["factory"] == "tiny_cnn.py:build"
    assert res["config"]["model"]["kwargs"] == {"num_classes": 10, "width": 16}
    assert res["digital_layers"] == [] and res["images"] == 50
    assert [l["name"] for l in res["layers"]] == ["features.3", "features.6"]
    assert 0.0 <= res["top1"] <= 1.0
    assert "model tiny_cnn.py:build" in printed.out
    assert "checkpoint none: the model's own initial weights" in printed.out

    cost_out = tmp_path / "c.json"
    assert main(["cost", str(EXAMPLES / "tiny_cnn.yaml"), "--out", str(cost_out)]) == 0
    cost = json.loads(cost_out.read_text())
    assert cost["model"] == "tiny_cnn.py:build"
    # same layers, same per-inference cost as the run
    assert cost["totals"]["macs"] == res["cost"]["macs"]
    assert cost["totals"]["energy_nj"] == pytest.approx(res["cost"]["energy_nj"])


def test_attention_model_run_lists_digital_layers(fake_data, tmp_path, capsys):
    (tmp_path / "att.py").write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_user_models import _Attention
        def build(d=8):
            return _Attention(d)
    '''))
    (tmp_path / "att.yaml").write_text("model:\n  factory: att.py:build\n  kwargs: {d: 4}\n")
    out = tmp_path / "r.json"
    rc = main(["run", str(tmp_path / "att.yaml"), "--limit", "20", "--data-dir", str(fake_data),
               "--out", str(out), *QUICK])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    res = json.loads(out.read_text())
    T, d = 64, 4
    assert [{k: x[k] for k in ("name", "op", "macs")} for x in res["digital_layers"]] == [
        {"name": "matmul", "op": "matmul", "macs": T * T * d},
        {"name": "matmul_1", "op": "matmul", "macs": T * T * d}]
    p = CostParams()
    assert res["digital_layers"][0]["energy_nj"] == pytest.approx(
        T * T * d * (p.mult_pj + p.add_pj) / 1e3)
    assert res["cost"]["digital_layer_macs"] == 2 * T * T * d
    assert "digital layers" in printed.out and "matmul_1 (matmul, 16384 MACs)" in printed.out

    rc = main(["run", str(tmp_path / "att.yaml"), "--limit", "20", "--data-dir",
               str(fake_data), "--set", "model.strict=true", *QUICK])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "'matmul'" in err and "strict" in err


def test_factory_error_through_cli_one_line(fake_data, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("model:\n  factory: gone.py:build\n")
    rc = main(["cost", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert re.search(r"c\.yaml: model\.factory: gone\.py:build: model file not found", err), err


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The Python example of README's "Bring your own model" runs as written (data folder and
    model path pointed at test stand-ins: a fake CIFAR layout, the examples/ file)."""
    text = (ROOT / "README.md").read_text()
    sec = text[text.index("## Bring your own model"):]
    code = re.search(r"```python\n(.*?)```", sec, re.S).group(1)
    data = make_fetch_layout(tmp_path / "data", n_train=130, n_test=20)
    assert '"path/to/data"' in code and '"examples/tiny_cnn.py:build"' in code
    code = code.replace('"path/to/data"', repr(str(data)))
    monkeypatch.chdir(ROOT)                      # the example's relative model path
    torch.set_num_threads(1)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert 0.0 <= ns["top1"] <= 1.0 and ns["net"].digital_layers == []
    assert ns["cost"]["totals"]["energy_nj"] > 0
    assert {l.name for l in ns["net"].quantized_layers} == {l["name"] for l in
                                                          ns["cost"]["layers"]}
