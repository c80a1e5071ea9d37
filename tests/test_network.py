"""Tests of pimsim.network: BatchNorm folding, fx tracing into GemmLayers, and the float / fake /
kernel execution paths, against torch and against hand computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimsim.calibrate import calibrate
from pimsim.kernels import (
    TiledGemm,
    conv_out_hw,
    im2col,
    partial_sums_reference,
    tiled_matmul_reference,
)
from pimsim.models import build_model
from pimsim.network import GemmLayer, UnsupportedModelError, build_network, fold_batchnorm
from pimsim.quant import Granularity, TileGrid

ROOT = Path(__file__).resolve().parents[1]
PROP = settings(deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (float64)."""
    got = torch.as_tensor(np.asarray(got)).double() if not isinstance(got, torch.Tensor) else got.double()
    want = torch.as_tensor(np.asarray(want)).double() if not isinstance(want, torch.Tensor) else want.double()
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    return float((got - want).abs().max() / want.abs().max())


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats and affine parameters in every BatchNorm (moderate ranges)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1.0)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


# --------------------------------------------------------------------------------------------
# A custom model covering the supported layer zoo
# --------------------------------------------------------------------------------------------

class Custom(nn.Module):
    """Conv/BN/ReLU stem, MaxPool, a two-branch block joined by an add, a BatchNorm that follows
    the add (not foldable), a padding-0 dilated conv without bias, AvgPool, flatten and two
    Linears (the last without bias).

    Modules are *defined* in a different order than they are *executed* (conv_b before conv_a,
    fc2 before fc1), so the layer list must follow the graph, not ``named_modules``.
    Input 2 x 3 x 30 x 34 -> stem 30x34 -> maxpool 15x17 -> branches 8x9 -> conv_c 4x5 ->
    avgpool 2x2 -> 48 features.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=True)              # conv with bias + BN
        self.stem_bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        # branch b (defined first, executed second): 1x1 conv, stride 2, no bias
        self.conv_b = nn.Conv2d(8, 16, 1, stride=2, bias=False)
        self.bn_b = nn.BatchNorm2d(16)
        # branch a: stride 2, dilation 2, padding 2, no bias; then a 3x1 conv with bias
        self.conv_a = nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2, bias=False)
        self.bn_a = nn.BatchNorm2d(16)
        self.conv_a2 = nn.Conv2d(16, 16, (3, 1), padding=(1, 0), bias=True)
        self.bn_a2 = nn.BatchNorm2d(16)
        self.post_bn = nn.BatchNorm2d(16)                                 # follows the add
        self.conv_c = nn.Conv2d(16, 12, 3, padding=0, dilation=2, bias=False)  # no BN, no bias
        self.avg = nn.AvgPool2d(2)
        self.fc2 = nn.Linear(10, 7, bias=False)
        self.fc1 = nn.Linear(48, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.stem_bn(self.stem(x))))
        a = self.relu(self.bn_a(self.conv_a(x)))
        a = self.bn_a2(self.conv_a2(a))
        b = self.bn_b(self.conv_b(x))
        y = self.post_bn(F.relu(a + b))
        y = self.avg(F.relu(self.conv_c(y)))
        y = torch.flatten(y, 1)
        return self.fc2(F.relu(self.fc1(y)))


# name: (O, K, kind)
CUSTOM_LAYERS = {
    "stem": (8, 3 * 3 * 3, "conv"),
    "conv_a": (16, 8 * 3 * 3, "conv"),
    "conv_a2": (16, 16 * 3 * 1, "conv"),
    "conv_b": (16, 8 * 1 * 1, "conv"),
    "conv_c": (12, 16 * 3 * 3, "conv"),
    "fc1": (10, 48, "linear"),
    "fc2": (7, 10, "linear"),
}
CUSTOM_INPUT = (2, 3, 30, 34)


def custom_model(seed=0) -> Custom:
    torch.manual_seed(seed)
    return randomize_bn(Custom(), seed)


def custom_input(seed=1, shape=CUSTOM_INPUT) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def random_resnet20(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build_model("resnet20"), seed)


# --------------------------------------------------------------------------------------------
# Real data (skipped when missing)
# --------------------------------------------------------------------------------------------

def _data_dir():
    from pimsim.data import DataNotFoundError, find_data_dir
    try:
        d = find_data_dir()
    except DataNotFoundError as e:
        return None, f"CIFAR-10 data not found ({str(e).splitlines()[0]})"
    if not (d / "models" / "resnet20-cifar10jpg.th").is_file():
        return None, f"checkpoint {d / 'models' / 'resnet20-cifar10jpg.th'} missing"
    return d, ""


@pytest.fixture(scope="module")
def data_dir():
    d, why = _data_dir()
    if d is None:
        pytest.skip(why)
    return d


@pytest.fixture(scope="module")
def trained_resnet20(data_dir):
    return build_model("resnet20", checkpoint=data_dir / "models" / "resnet20-cifar10jpg.th")


# --------------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------------

def _no_bn_left(gm) -> bool:
    return not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())


def test_fold_batchnorm_random_resnet20_exact():
    model = random_resnet20()
    x = custom_input(3, (4, 3, 32, 32))
    gm = fold_batchnorm(model)
    assert _no_bn_left(gm), "every BatchNorm of ResNet-20 follows a conv and must be folded"
    with torch.no_grad():
        want, got = model(x), gm(x)
    assert rel_err(got, want) <= 1e-5
    # the input model is not modified (folding works on a copy)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.conv1.bias is None


def test_fold_batchnorm_trained_checkpoint_exact(trained_resnet20):
    x = custom_input(4, (8, 3, 32, 32))
    gm = fold_batchnorm(trained_resnet20)
    assert _no_bn_left(gm)
    with torch.no_grad():
        assert rel_err(gm(x), trained_resnet20(x)) <= 1e-5


def test_fold_batchnorm_custom_keeps_unfoldable_bn():
    model = custom_model()
    gm = fold_batchnorm(model)
    bns = [n for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns == ["post_bn"], bns                  # the BN after the add cannot be folded
    x = custom_input()
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


def test_fold_batchnorm_model_in_train_mode_is_folded_as_eval():
    """fold_batchnorm works on an eval-mode copy: a model left in train mode is folded with its
    running statistics and the result equals the model in eval mode."""
    model = random_resnet20(5).train()
    gm = fold_batchnorm(model)
    x = custom_input(6, (3, 3, 32, 32))
    with torch.no_grad():
        want = model.eval()(x)
        assert rel_err(gm(x), want) <= 1e-5


def test_fold_batchnorm_bn_without_affine():
    model = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5, affine=False), nn.ReLU())
    randomize_bn(model, 7)
    gm = fold_batchnorm(model)
    assert _no_bn_left(gm)
    x = custom_input(8, (2, 3, 9, 9))
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5


class _SharedConv(nn.Module):
    """One conv called twice, once followed by a BatchNorm: folding must not change the other call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


def test_fold_batchnorm_shared_conv_keeps_function():
    """Folding a BN into a conv whose *module* is called elsewhere too would change that other
    call: fold_batchnorm leaves such a BN unfolded (conv weights untouched) and keeps the
    function; build_network then refuses the model for its weight sharing, naming the conv."""
    model = randomize_bn(_SharedConv(), 9)
    x = custom_input(10, (2, 3, 8, 8))
    gm = fold_batchnorm(model)
    assert isinstance(gm.get_submodule("bn"), nn.BatchNorm2d)
    assert torch.equal(gm.get_submodule("conv").weight, model.conv.weight)
    assert gm.get_submodule("conv").bias is None
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5
    with pytest.raises(UnsupportedModelError, match="'conv' is called more than once"):
        build_network(model)


def test_fold_batchnorm_bn_without_running_stats():
    """A BatchNorm2d with track_running_stats=False normalizes with batch statistics even in eval
    mode, so it cannot be folded: fold_batchnorm leaves it in the graph, conv untouched."""
    model = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False),
                          nn.BatchNorm2d(5, track_running_stats=False), nn.ReLU()).eval()
    x = custom_input(11, (4, 3, 9, 9))
    gm = fold_batchnorm(model)
    assert isinstance(gm.get_submodule("1"), nn.BatchNorm2d)          # left as it is
    assert torch.equal(gm.get_submodule("0").weight, model[0].weight)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) <= 1e-5
        # it still normalizes with the batch's statistics: an image's output depends on its batch
        assert rel_err(gm(x[:2]), model(x[:2])) <= 1e-5
        assert rel_err(gm(x[:2]), gm(x)[:2]) > 1e-3


# --------------------------------------------------------------------------------------------
# build_network: float path equals torch
# --------------------------------------------------------------------------------------------

def test_build_network_resnet20_equals_torch():
    model = random_resnet20(1)
    net = build_network(model)
    x = custom_input(12, (4, 3, 32, 32))
    with torch.no_grad():
        assert rel_err(net(x), model(x)) <= 1e-5


def test_build_network_custom_equals_torch():
    model = custom_model()
    net = build_network(model)
    assert all(isinstance(l, GemmLayer) for l in net.layers)
    for shape in (CUSTOM_INPUT, (1, 3, 31, 35)):         # odd sizes too (ragged pooling/stride)
        x = custom_input(13, shape)
        with torch.no_grad():
            assert rel_err(net(x), model(x)) <= 1e-5


def test_build_network_does_not_modify_model():
    model = custom_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_network(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert isinstance(model.stem, nn.Conv2d) and isinstance(model.stem_bn, nn.BatchNorm2d)


def test_layer_list_custom():
    net = build_network(custom_model())
    names = [l.name for l in net.layers]
    # execution order (the forward pass), not definition order
    assert names == ["stem", "conv_a", "conv_a2", "conv_b", "conv_c", "fc1", "fc2"]
    for l in net.layers:
        O, K, kind = CUSTOM_LAYERS[l.name]
        assert (l.O, l.K, l.kind) == (O, K, kind), l.name
        assert l.weight_matrix().shape == (O, K)
    assert net.default_float_layers() == ["stem", "fc2"]
    geo = net.layer("conv_a")
    assert (geo.kernel_size, geo.stride, geo.padding, geo.dilation) == ((3, 3), (2, 2), (2, 2), (2, 2))
    geo = net.layer("conv_a2")
    assert (geo.kernel_size, geo.padding) == ((3, 1), (1, 0))
    assert net.layer("conv_b").bias is not None          # BN folding gives every folded conv a bias
    assert net.layer("conv_c").bias is None              # no BN, no bias: stays without
    assert net.layer("fc2").bias is None and net.layer("fc1").bias is not None
    with pytest.raises(KeyError):
        net.layer("nope")


def test_layer_list_resnet20():
    model = random_resnet20(2)
    net = build_network(model)
    expect = ["conv1"]
    for s in (1, 2, 3):
        for b in range(3):
            expect += [f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2"]
    expect += ["linear"]
    assert [l.name for l in net.layers] == expect
    mods = dict(model.named_modules())
    for l in net.layers:
        m = mods[l.name]
        if isinstance(m, nn.Conv2d):
            assert l.O == m.out_channels
            assert l.K == m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        else:
            assert (l.O, l.K) == (m.out_features, m.in_features)
    assert net.default_float_layers() == ["conv1", "linear"]


def test_layer_names_in_sequential_and_single_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 2, 1)))
    net = build_network(randomize_bn(model, 4))
    assert [l.name for l in net.layers] == ["0", "3.0"]
    assert net.default_float_layers() == ["0", "3.0"]
    single = build_network(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)))
    assert [l.name for l in single.layers] == ["1"]
    assert single.default_float_layers() == ["1"]


def test_weight_matrix_is_folded_weight_in_pytorch_order():
    model = custom_model()
    net = build_network(model)
    conv, bn = model.conv_a2, model.bn_a2
    k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    w = conv.weight.detach().double() * k.view(-1, 1, 1, 1)
    b = (conv.bias.detach().double() - bn.running_mean.double()) * k + bn.bias.detach().double()
    layer = net.layer("conv_a2")
    np.testing.assert_allclose(layer.weight_matrix(), w.reshape(16, -1).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.bias.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Kernel path vs fake path vs a hand computation
# --------------------------------------------------------------------------------------------

def _capture_inputs(net, x) -> dict:
    """The input each GemmLayer sees in one forward pass of ``net`` (current modes)."""
    seen = {}

    def hook(layer, inp):
        seen[layer.name] = inp.detach().clone()
        return None

    for l in net.layers:
        l.hook = hook
    try:
        with torch.no_grad():
            net(x)
    finally:
        for l in net.layers:
            l.hook = None
    return seen


def _hand_reference(layer: GemmLayer, x: torch.Tensor) -> np.ndarray:
    """Eq. 5 by hand in float64: quantize, unfold, int64 tile products, rescale, bias."""
    q = layer.quant
    grid = q.grid
    lo, hi = -(1 << (q.w_bits - 1)), (1 << (q.w_bits - 1)) - 1
    w = layer.weight_matrix().astype(np.float64)
    wq = np.clip(np.rint(w / grid.expand(q.w_scales)), lo, hi).astype(np.int64)
    np.testing.assert_array_equal(q.weight_int(layer.weight_matrix()).astype(np.int64), wq)
    xq = layer.quantize_input(x)
    assert torch.equal(xq, torch.round(xq)) and xq.abs().max() <= (1 << (q.a_bits - 1))
    B = x.shape[0]
    if layer.kind == "linear":
        X = xq.reshape(B, -1).T.numpy().astype(np.int64)                # K x N
        out_shape = (B, layer.O)
    else:
        cols = F.unfold(xq, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)                            # B x K x L
        ho, wo = layer.out_hw(x.shape[2], x.shape[3])
        assert cols.shape == (B, layer.K, ho * wo)
        X = cols.permute(1, 0, 2).reshape(layer.K, -1).numpy().astype(np.int64)
    # int64 tile products, then float64 rescale + sum, done by hand
    y = np.zeros((layer.O, X.shape[1]), dtype=np.float64)
    for i, j, rows, cs in grid.tiles():
        p = wq[rows, cs] @ X[cs, :]
        y[rows] += q.w_scales[i, j] * p
    y = q.act_scale * y
    if layer.bias is not None:
        y = y + layer.bias.numpy().astype(np.float64)[:, None]
    # the library's NumPy reference agrees with the hand computation
    ref = tiled_matmul_reference(wq, X, q.w_scales, grid, q.act_scale,
                                 bias=None if layer.bias is None else layer.bias.numpy())
    assert np.abs(ref - y).max() <= 1e-6 * np.abs(y).max()
    if layer.kind == "linear":
        return y.T.reshape(out_shape)
    return y.reshape(layer.O, B, ho, wo).transpose(1, 0, 2, 3)


@pytest.mark.parametrize("method,w_bits", [("max", 4), ("ptqsl", 4), ("ptqsl", 3)])
@pytest.mark.parametrize("gran", [Granularity.tile(3, 7), Granularity.split(5, 3),
                                  Granularity.channelwise(), Granularity.layerwise()],
                         ids=str)
def test_kernel_fake_and_hand_agree_per_layer(gran, method, w_bits):
    """Every study runs on the fake path: for max and for PTQ-SL scales (W4, W3), every layer's
    kernel and fake outputs equal Eq. 5 computed by hand."""
    torch.manual_seed(0)
    net = build_network(custom_model())
    calib = custom_input(20, (4, 3, 30, 34))
    info = calibrate(net, calib, gran, w_bits=w_bits, a_bits=8, method=method, float_layers=[],
                     progress=False, params={"candidates": 30} if method == "ptqsl" else None)
    assert info["float_layers"] == []
    assert [l.name for l in net.quantized_layers] == list(CUSTOM_LAYERS)
    # inputs each layer sees when the network runs quantized (fake) on the calibration batch:
    # exactly what calibration saw, so the max activation scale is max|x| / 127
    net.set_mode("fake")
    inputs = _capture_inputs(net, calib)
    moved = 0
    for layer in net.layers:
        q = layer.quant
        x = inputs[layer.name]
        assert q.grid == gran.resolve(layer.O, layer.K) and q.w_bits == w_bits
        s_max = float(x.abs().max()) / 127
        w = layer.weight_matrix().astype(np.float64)
        max_w = np.zeros(q.grid.shape)
        for i, j, rows, cs in q.grid.tiles():
            max_w[i, j] = np.abs(w[rows, cs]).max() / (2 ** (w_bits - 1) - 1)
        if method == "max":      # every tile scale is max|W_ij| / 7, the input's max|x| / 127
            assert q.act_scale == pytest.approx(s_max, rel=1e-12)
            np.testing.assert_allclose(q.w_scales, max_w, rtol=1e-12)
        else:                    # PTQ-SL moved scales away from max calibration
            moved += int(not np.allclose(q.w_scales, max_w, rtol=1e-12)) + int(q.act_scale != s_max)
        # run each layer on a fresh input too (values outside the calibrated range get clamped)
        for xin in (x, 1.5 * x):
            want = _hand_reference(layer, xin)
            ymax = np.abs(want).max()
            got_k = layer.kernel_forward(xin)
            got_f = layer.fake_forward(xin)
            assert tuple(got_k.shape) == want.shape == tuple(got_f.shape)
            assert got_k.dtype == torch.float32
            err_k = np.abs(got_k.numpy().astype(np.float64) - want).max() / ymax
            err_f = np.abs(got_f.numpy().astype(np.float64) - want).max() / ymax
            assert err_k <= 1e-6, f"{layer.name}: kernel vs hand {err_k:.3g}"
            assert err_f <= 1e-5, f"{layer.name}: fake vs hand {err_f:.3g}"
    if method == "ptqsl":
        assert moved >= len(net.layers)


def test_grid_of_custom_layers_is_ragged():
    """Granularity.tile(3, 7) really leaves smaller edge tiles in every layer of the model."""
    net = build_network(custom_model())
    g = Granularity.tile(3, 7)
    for l in net.layers:
        grid = g.resolve(l.O, l.K)
        assert grid.O % grid.r or grid.K % grid.c, l.name


def test_network_modes_kernel_fake_float():
    model = custom_model()
    net = build_network(model)
    x = custom_input(21)
    calibrate(net, x, Granularity.tile(3, 7), 4, 8, progress=False)
    assert set(l.name for l in net.quantized_layers) == set(CUSTOM_LAYERS) - {"stem", "fc2"}
    with torch.no_grad():
        net.set_mode("kernel")
        yk = net(x)
        net.set_mode("fake")
        yf = net(x)
        net.set_mode("float")
        y0 = net(x)
        want = model(x)
    assert rel_err(y0, want) <= 1e-5
    assert rel_err(yk, yf) <= 1e-4
    assert not torch.equal(yf, y0)                                 # quantization did something
    with pytest.raises(ValueError):
        net.set_mode("int")


# --------------------------------------------------------------------------------------------
# im2col and TiledGemm.conv
# --------------------------------------------------------------------------------------------

@st.composite
def conv_geometry(draw):
    B = draw(st.integers(1, 3))
    C = draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    # input at least as large as the (dilated) kernel minus padding
    H = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 11))
    W = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 11))
    return B, C, H, W, (kh, kw), (sh, sw), (ph, pw), (dh, dw)


def _unfold_rows(x, ks, st_, pd, dl):
    K = x.shape[1] * ks[0] * ks[1]
    return F.unfold(x, ks, dilation=dl, padding=pd, stride=st_).permute(0, 2, 1).reshape(-1, K)


@PROP
@given(conv_geometry(), st.booleans(), st.integers(0, 2**31 - 1))
def test_im2col_equals_unfold(geo, channels_last, seed):
    B, C, H, W, ks, st_, pd, dl = geo
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = _unfold_rows(x, ks, st_, pd, dl).numpy()
    got = im2col(x, ks, st_, pd, dl)
    ho, wo = conv_out_hw(H, W, ks, st_, pd, dl)
    assert got.shape == (B * ho * wo, C * ks[0] * ks[1])
    np.testing.assert_array_equal(got, want)


def test_im2col_numpy_input_and_integer_dtype():
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(2, 3, 7, 6)).astype(np.int8)
    got = im2col(x, (3, 2), (2, 1), (1, 2), (1, 2))
    want = _unfold_rows(torch.from_numpy(x.astype(np.float32)), (3, 2), (2, 1), (1, 2), (1, 2))
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got.astype(np.float32), want.numpy())


@PROP
@given(conv_geometry(), st.integers(1, 5), st.data())
def test_tiled_gemm_conv_equals_nk_rows(geo, O, data):
    B, C, H, W, ks, st_, pd, dl = geo
    K = C * ks[0] * ks[1]
    w_bits = data.draw(st.integers(2, 8), label="w_bits")
    a_bits = data.draw(st.integers(2, 8), label="a_bits")
    r = data.draw(st.integers(1, O), label="r")
    c = data.draw(st.integers(1, K), label="c")
    path = data.draw(st.sampled_from(["auto", "f64", "int"]), label="path")
    channels_last = data.draw(st.booleans(), label="channels_last")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    rng = np.random.default_rng(seed)
    grid = TileGrid(O, K, r, c)
    wq = rng.integers(-(1 << (w_bits - 1)), 1 << (w_bits - 1), size=(O, K)).astype(np.int8)
    scales = rng.uniform(0.01, 2.0, size=grid.shape)
    bias = rng.standard_normal(O).astype(np.float32)
    xq = torch.from_numpy(
        rng.integers(-(1 << (a_bits - 1)), 1 << (a_bits - 1), size=(B, C, H, W)).astype(np.float32))
    if channels_last:
        xq = xq.contiguous(memory_format=torch.channels_last)
    op = TiledGemm(wq, grid, scales, w_bits=w_bits, a_bits=a_bits, path=path)
    sx = float(rng.uniform(0.01, 1.0))
    rows = im2col(xq, ks, st_, pd, dl)                                  # N x K
    y_conv = op.conv(xq, sx, ks, st_, pd, dl, bias=bias)
    y_rows = op(rows, sx, bias=bias, layout="NK")
    assert y_conv.shape == y_rows.shape == (rows.shape[0], O)
    np.testing.assert_array_equal(y_conv, y_rows)
    # and both are Eq. 5 of the reference (K x N layout)
    ref = tiled_matmul_reference(wq, rows.T.astype(np.int64), scales, grid, sx, bias=bias)
    np.testing.assert_allclose(y_rows.T, ref, rtol=0, atol=1e-6 * max(1.0, np.abs(ref).max()))
    # partial sums, both layouts, equal the int64 reference
    P = partial_sums_reference(wq, rows.T.astype(np.int64), grid)
    np.testing.assert_array_equal(op.partial_sums(np.ascontiguousarray(rows.T), layout="KN"), P)
    np.testing.assert_array_equal(op.partial_sums(rows, layout="NK"), P)


def test_partial_sums_layouts_large_chunks():
    """More rows than one chunk (several chunk boundaries), ragged tiles, all three paths."""
    rng = np.random.default_rng(3)
    O, K, N = 37, 101, 5000
    grid = TileGrid(O, K, 8, 29)
    wq = rng.integers(-8, 8, size=(O, K)).astype(np.int8)
    x = rng.integers(-128, 128, size=(K, N)).astype(np.int8)
    P = partial_sums_reference(wq, x, grid)
    for path in ("f32", "f64", "int"):
        op = TiledGemm(wq, grid, np.ones(grid.shape), w_bits=4, a_bits=8, path=path)
        assert op.chunk_size(N) < N, "test must span several chunks"
        np.testing.assert_array_equal(op.partial_sums(x, layout="KN"), P, err_msg=path)
        np.testing.assert_array_equal(op.partial_sums(np.ascontiguousarray(x.T), layout="NK"), P,
                                      err_msg=path)


# --------------------------------------------------------------------------------------------
# Unsupported models
# --------------------------------------------------------------------------------------------

class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=2))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


class _Conv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.head(x).mean(2))


class _FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.conv2d(x, self.w, padding=1).mean((2, 3)))


class _FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.w = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        return F.linear(self.conv(x).mean((2, 3)), self.w)


class _Matmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.w = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        return self.conv(x).mean((2, 3)) @ self.w


class _NoGemm(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return torch.flatten(self.pool(F.relu(self.bn(x))), 1)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:                  # data-dependent control flow: fx cannot trace it
            return self.conv(x)
        return self.conv(-x)


class _SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(self.conv(x).mean((2, 3))))


def test_grouped_conv_is_mapped_with_its_groups_and_runs_as_torch():
    """Grouped convolution is supported now (tests/test_grouped.py covers the backends): the
    layer keeps groups=2, K = Cin/2 * 3 * 3, and the float network equals the torch model."""
    torch.manual_seed(0)
    model = _Grouped().eval()
    net = build_network(model)
    layer = net.layer("body.1")
    assert layer.groups == 2 and layer.K == 2 * 3 * 3
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-6)


def test_conv1d_is_listed_digital_and_refused_when_strict():
    """A Conv1d is not put on arrays: it runs in torch and is listed with its MACs (O * K per
    output position, by hand); strict=True refuses it, naming the module path."""
    net = build_network(_Conv1d(), input_shape=(3, 10))
    assert net.digital_layers == [{"name": "head.0", "op": "Conv1d", "macs": 4 * 3 * 3 * 8}]
    assert [l.name for l in net.layers] == ["fc"]
    with pytest.raises(UnsupportedModelError, match=r"head\.0") as e:
        build_network(_Conv1d(), input_shape=(3, 10), strict=True)
    assert "Conv1d" in str(e.value)


@pytest.mark.parametrize("model_cls", [_FunctionalConv, _FunctionalLinear])
def test_functional_gemm_on_model_parameter_is_mapped(model_cls):
    """F.conv2d / F.linear with a parameter of the model as weight become GemmLayers (named
    after the parameter) computing what torch computes; nothing is left digital."""
    model = model_cls().eval()
    net = build_network(model)
    assert "w" in [l.name for l in net.layers] and net.digital_layers == []
    x = custom_input(31, (2, 3, 6, 6))
    with torch.no_grad():
        assert rel_err(net(x), model(x)) <= 1e-5


def test_matmul_with_parameter_is_listed_digital():
    """``x @ self.w`` is not mapped (only F.linear / F.conv2d are): it is listed, 1 x 4 x 2
    MACs per sample, and refused when strict."""
    net = build_network(_Matmul())
    assert net.digital_layers == [{"name": "matmul", "op": "matmul", "macs": 8}]
    with pytest.raises(UnsupportedModelError, match="matmul"):
        build_network(_Matmul(), strict=True)


def test_unsupported_no_gemm_layer():
    with pytest.raises(UnsupportedModelError, match="_NoGemm"):
        build_network(_NoGemm())


def test_unsupported_untraceable():
    with pytest.raises(UnsupportedModelError, match="_Untraceable"):
        build_network(_Untraceable())


def test_unsupported_weight_sharing():
    with pytest.raises(UnsupportedModelError, match="fc"):
        build_network(_SharedLinear())


def test_unsupported_string_padding():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    with pytest.raises(UnsupportedModelError, match="0"):
        build_network(model)


def test_unsupported_padding_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 2))
    with pytest.raises(UnsupportedModelError, match="reflect"):
        build_network(model)


class _TokenLinear(nn.Module):
    """A Linear applied to a B x T x F tensor (per-position features)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.tok = nn.Linear(6, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        y = self.conv(x).flatten(2)                     # B x 4 x 6
        return self.head(F.relu(self.tok(y))).mean(1)


def test_linear_on_3d_input_kernel_matches_fake():
    """build_network accepts a Linear that torch applies over the last dim of a 3-D tensor;
    float, fake and kernel paths all run it, per position, with the same result: the kernel
    layer against Eq. 5 by hand on the flattened positions, the network kernel vs fake."""
    model = _TokenLinear().eval()
    x = custom_input(30, (2, 3, 4, 5))
    net = build_network(model)
    assert [(l.name, l.kind) for l in net.layers] == [("conv", "conv"), ("tok", "linear"),
                                                      ("head", "linear")]
    with torch.no_grad():
        assert rel_err(net(x), model(x)) <= 1e-5
    calibrate(net, x, Granularity.channelwise(), 4, 8, float_layers=[], progress=False)
    net.set_mode("fake")
    tok = net.layer("tok")
    xin = _capture_inputs(net, x)["tok"]
    assert xin.shape == (2, 4, 6)                                   # B x T x F
    want = _hand_reference(tok, xin.reshape(-1, 6)).reshape(2, 4, 5)
    with torch.no_grad():
        got = tok.kernel_forward(xin)
        assert got.shape == (2, 4, 5)
        assert np.abs(got.double().numpy() - want).max() <= 1e-6 * np.abs(want).max()
        yf = net(x)
        net.set_mode("kernel")
        yk = net(x)
    assert rel_err(yk, yf) <= 1e-5


def test_unsupported_error_is_value_error():
    assert issubclass(UnsupportedModelError, ValueError)


# --------------------------------------------------------------------------------------------
# Real data: ResNet-20 on the first 1000 test images
# --------------------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """Run single-threaded, restoring the thread counts afterwards: with 2 threads the kernel
    path slows down by ~15x when another process keeps a core busy (torch/OpenMP and Numba
    thread pools competing), which would make these tests' run time unpredictable."""
    import numba
    from pimsim.kernels import set_threads
    t_torch, t_numba = torch.get_num_threads(), numba.get_num_threads()
    set_threads(1)
    yield
    torch.set_num_threads(t_torch)
    numba.set_num_threads(t_numba)


@pytest.fixture(scope="module")
def real_eval(data_dir, trained_resnet20):
    from pimsim.data import calibration_set, load_cifar10, to_tensor
    images, labels = load_cifar10("test", data_dir, limit=1000)
    calib, _ = calibration_set(128, 0, data_dir)
    return images, labels, to_tensor(calib)


def test_real_float_top1_matches_torch(trained_resnet20, real_eval, one_thread):
    from pimsim.models import FLOAT_TOP1
    from pimsim.simulate import evaluate
    images, labels, _ = real_eval
    net = build_network(trained_resnet20)
    top1_net, preds_net = evaluate(net, images, labels, progress=False)
    top1_torch, preds_torch = evaluate(trained_resnet20, images, labels, progress=False)
    assert top1_torch == pytest.approx(FLOAT_TOP1["resnet20-cifar10jpg.th"][1000]) == 0.898
    assert top1_net == top1_torch
    assert (preds_net == preds_torch).mean() >= 0.999


@pytest.mark.parametrize("method,w_bits,gran", [
    ("max", 4, Granularity.channelwise()), ("max", 4, Granularity.tile(128, 128)),
    ("ptqsl", 4, Granularity.split(4, 4)), ("ptqsl", 3, Granularity.channelwise())], ids=str)
def test_real_kernel_and_fake_agree(trained_resnet20, real_eval, method, w_bits, gran,
                                    one_thread):
    """The studies evaluate on the fake path: for max and PTQ-SL scales, at W4 and W3, every
    layer's fake output equals the exact kernel's on the same input (float32 rounding), and
    the predictions agree. Not bit-exact: a layer's float32 rounding flips a few activation
    codes of the next, which spreads through the network; with PTQ-SL scales (W4 split 4x(K/4)
    and W3 channelwise alike) 2 of these 1000 predictions differ, top-1 stays equal."""
    from pimsim.data import to_tensor
    from pimsim.simulate import evaluate
    images, labels, calib = real_eval
    net = build_network(trained_resnet20)
    calibrate(net, calib, gran, w_bits, 8, method=method, progress=False)
    assert [l.name for l in net.layers if l.quant is None] == ["conv1", "linear"]
    assert all(l.quant.info["method"] == method and l.quant.w_bits == w_bits
               for l in net.quantized_layers)
    net.set_mode("fake")
    inputs = _capture_inputs(net, to_tensor(images[:16]))
    for l in net.quantized_layers:
        err = rel_err(l.fake_forward(inputs[l.name]), l.kernel_forward(inputs[l.name]))
        assert err <= 1e-5, f"{l.name}: fake vs kernel {err:.3g}"
    net.set_mode("kernel")
    top1_k, preds_k = evaluate(net, images, labels, progress=False)
    net.set_mode("fake")
    top1_f, preds_f = evaluate(net, images, labels, progress=False)
    agree = (preds_k == preds_f).mean()
    assert agree >= 0.997, f"kernel and fake predictions agree on only {agree:.4f}"
    assert abs(top1_k - top1_f) <= 0.002 + 1e-9
    assert 0.5 < top1_k <= 0.898 + 0.01                    # quantized, yet still a classifier
