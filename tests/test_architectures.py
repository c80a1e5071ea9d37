"""Real architectures from model files: a MobileNetV2-style net (depthwise convolutions), a
DenseNet-style net (``torch.cat``), a small ViT (patch-embedding conv, LayerNorm, attention,
MLP) and an ImageNet-style ResNet-18, each in ``examples/`` and built through
``model.factory`` from a YAML file, with its weights from a ``.safetensors`` checkpoint.
Each is traced, calibrated with PTQ-SL (W8A8 channelwise), run on the kernel and crossbar
backends and costed.

The weights: a few Adam steps on a small synthetic 10-class image set made here (class
prototypes of low-frequency colour patterns plus pixel noise), then BatchNorm statistics on
that set, so that the float network's predictions are spread over the classes and well above
chance. A network fresh from ``torch.nn.init`` answers one class for every image, which would make
"quantized agrees with float" true of any quantizer; and a random MobileNet amplifies a 1e-3
perturbation of every layer's output to a 50 % change of its logits in plain torch, so no
quantizer could meet the agreement bound on it. Its depthwise filters therefore start near the
identity (centre tap 1, others small), as trained depthwise filters often are.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from fakedata import ROOT
from pimsim.config import load
from pimsim.cost import config_cost
from pimsim.simulate import dataset_of, prepare, quantize_network, setup_crossbar
from pimsim.testing import restored_threads

EXAMPLES = ROOT / "examples"
N_TRAIN, N_TEST, CLASSES, MEAN, STD = 500, 100, 10, 0.45, 0.25

MODELS = {   # id -> (file:function, kwargs, image size)
    "mobilenetv2": ("mobilenet_cifar.py:build", {}, 32),
    "densenet": ("densenet_cifar.py:build", {"growth": 8, "blocks": [2, 2, 2]}, 32),
    "vit": ("vit_tiny.py:build", {}, 32),
    "resnet18": ("resnet18_imagenet.py:build", {"num_classes": CLASSES, "width": 16}, 64),
}


@pytest.fixture(autouse=True)
def _one_thread():
    with restored_threads():
        torch.set_num_threads(1)
        yield


def _images(n: int, size: int, seed: int):
    """``n`` uint8 NHWC images of CLASSES prototypes (4x4 colour patterns, bilinearly
    enlarged) plus pixel noise, and their labels."""
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(99).random((CLASSES, 3, 4, 4))
    y = rng.integers(0, CLASSES, n)
    low = torch.tensor(0.8 * protos[y] + 0.2 * rng.random((n, 3, 4, 4)), dtype=torch.float32)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).numpy()
    x = (200 * x + 55 * rng.random((n, 3, size, size))).astype(np.uint8)
    return x.transpose(0, 2, 3, 1), y


def _module(fac: str):
    path = EXAMPLES / fac.split(":")[0]
    spec = importlib.util.spec_from_file_location(f"arch_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, fac.split(":")[1])


def _weights(build, kwargs, x_uint8, y) -> dict:
    """The state dict described in the module docstring."""
    from safetensors.torch import save_file  # noqa: F401  (checked early: the test needs it)
    torch.manual_seed(0)
    model = build(**kwargs)
    x = (torch.tensor(x_uint8).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    y = torch.tensor(y)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                m.weight.mul_(0.2)
                m.weight[:, :, m.kernel_size[0] // 2, m.kernel_size[1] // 2] += 1.0
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        idx = torch.randint(0, len(x), (50,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None                 # the plain average over the set
                m.reset_running_stats()
        model(x)
    model.eval()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _module_macs(model: nn.Module, x: torch.Tensor) -> dict:
    """MACs per image of every Conv2d / Linear module, counted by forward hooks (one output
    element of a conv costs (C_in / groups) * kh * kw MACs, of a Linear in_features)."""
    macs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            per = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            per = m.in_features
        else:
            continue
        hooks.append(m.register_forward_hook(
            lambda mod, i, o, name=name, per=per: macs.__setitem__(name, o[0].numel() * per)))
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return macs


@pytest.fixture(scope="module", params=list(MODELS))
def arch(request, tmp_path_factory):
    """A YAML file running one of the example models on its npz data, calibrated (PTQ-SL,
    W8A8 channelwise) and attached to 128x128 arrays with an ideal ADC."""
    from safetensors.torch import save_file
    name = request.param
    fac, kwargs, size = MODELS[name]
    d = tmp_path_factory.mktemp(name)
    xtr, ytr = _images(N_TRAIN, size, 1)
    xte, yte = _images(N_TEST, size, 2)
    np.savez(d / "train.npz", x=xtr, y=ytr)
    np.savez(d / "test.npz", x=xte, y=yte)
    with restored_threads():
        torch.set_num_threads(1)
        build = _module(fac)
        save_file(_weights(build, kwargs, xtr, ytr), str(d / "weights.safetensors"))
        cfg_file = d / "run.yaml"
        cfg_file.write_text(yaml.safe_dump({
            "model": {"factory": str(EXAMPLES / fac), "kwargs": kwargs,
                      "checkpoint": "weights.safetensors"},
            "data": {"dataset": "npz", "path": "test.npz", "calib_path": "train.npz",
                     "num_classes": CLASSES, "mean": [MEAN] * 3, "std": [STD] * 3},
            "quant": {"weight_bits": 8, "act_bits": 8, "tile": "channelwise",
                      "calibration": "ptqsl", "calib_images": 32},
            "eval": {"backend": "kernel", "batch_size": N_TEST, "threads": 1},
            "crossbar": {"rows": 128, "cols": 128},
        }))
        cfg = load(cfg_file)
        prep = prepare(cfg)
        x, labels = next(iter(dataset_of(prep).test_batches(N_TEST)))
        net = prep.net
        net.set_mode("float")
        with torch.no_grad():
            logits_float = net(x)
        info = quantize_network(prep, progress=False)
        mapping = setup_crossbar(prep)
        reference = build(**kwargs)                      # plain torch, for the MAC count
        reference.load_state_dict(_weights_from(d / "weights.safetensors"))
        reference.eval()
    return {"name": name, "cfg": cfg, "prep": prep, "x": x, "labels": labels, "info": info,
            "logits_float": logits_float, "mapping": mapping, "reference": reference,
            "size": size, "kwargs": kwargs}


def _weights_from(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def test_float_network_is_a_real_classifier(arch):
    """The float network (as traced by pimsim) equals the plain torch model and its
    predictions are spread over the classes and well above chance: agreement below means
    something."""
    with torch.no_grad():
        ref = arch["reference"](arch["x"])
    assert torch.allclose(arch["logits_float"], ref, rtol=1e-4, atol=1e-4)
    pred = arch["logits_float"].argmax(1)
    assert len(set(pred.tolist())) >= 8
    assert (pred == torch.as_tensor(arch["labels"])).float().mean() >= 0.5


def test_w8a8_channelwise_agrees_with_float(arch):
    """PTQ-SL W8A8 channelwise on the exact kernel path: >= 99 % of predictions as in float."""
    net = arch["prep"].net
    assert net.quantized_layers, "nothing was quantized"
    assert all(l.quant.grid.r == 1 for l in net.quantized_layers)        # channelwise
    net.set_mode("kernel")
    with torch.no_grad():
        q = net(arch["x"])
    agree = (q.argmax(1) == arch["logits_float"].argmax(1)).float().mean().item()
    assert agree >= 0.99, f"{arch['name']}: {agree:.3f}"


def test_crossbar_backend_equals_kernel(arch):
    """On the arrays (bit-sliced weights, bit-serial inputs, ideal ADC) the outputs are the
    kernel's bit for bit, grouped (depthwise) layers included."""
    net = arch["prep"].net
    x = arch["x"][:8]
    net.set_mode("kernel")
    with torch.no_grad():
        k = net(x)
    net.set_mode("crossbar")
    with torch.no_grad():
        c = net(x)
    net.set_mode("kernel")
    assert torch.equal(k, c)
    if arch["name"] == "mobilenetv2":
        assert any(l.groups > 1 for l in net.quantized_layers)
        assert any(lm.groups > 1 for lm in arch["mapping"].layers)


def test_cost_counts_every_mapped_mac(arch):
    """The cost model's MACs are those of the quantized layers, counted independently by
    hooks on the plain torch model; the attention products (ViT) are digital work with hand
    counted MACs; energy and latency are positive."""
    prep, net = arch["prep"], arch["prep"].net
    cost = config_cost(arch["cfg"], net, arch["mapping"], input_shape=dataset_of(prep).input_shape)
    macs = _module_macs(arch["reference"], arch["x"])
    quantized = {l.name for l in net.quantized_layers}
    assert quantized and quantized <= set(macs)
    assert cost["totals"]["macs"] == sum(macs[n] for n in quantized)
    assert cost["totals"]["energy_nj"] > 0 and cost["totals"]["latency_us"] > 0
    digital = cost["digital_layers"]
    if arch["name"] == "vit":
        m = arch["reference"]
        depth, heads = len(m.blocks), m.blocks[0].attn.heads
        dim = m.embed.out_channels
        tokens = (arch["size"] // m.embed.kernel_size[0]) ** 2 + 1
        # q kᵀ and softmax(.) v per block: heads x tokens x tokens x (dim / heads) each
        per = heads * tokens * tokens * (dim // heads)
        assert sorted(d["op"] for d in digital) == ["matmul"] * (2 * depth)
        assert [d["macs"] for d in digital] == [per] * (2 * depth)
        assert cost["totals"]["digital_layer_macs"] == 2 * depth * per
    else:
        assert digital == []


def test_cli_run_through_factory_yaml(arch, capsys):
    """``pimsim run`` on the YAML file: the same model from the file, calibrated, costed;
    the JSON lists the digital layers (ViT: its attention products)."""
    import json
    from pimsim.cli import main
    if arch["name"] not in ("vit", "densenet"):
        pytest.skip("one CNN and the ViT through the CLI keep the suite short")
    src = Path(arch["cfg"].source)
    out = src.parent / "out.json"
    assert main(["run", str(src), "--limit", "20", "--backend", "crossbar", "-q",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["images"] == 20 and res["dataset"]["dataset"] == "npz"
    assert res["cost"]["macs"] > 0
    ops = [d["op"] for d in res["digital_layers"]]
    assert ops == (["matmul"] * 4 if arch["name"] == "vit" else [])
