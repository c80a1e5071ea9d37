"""Tests for pimsim.models: zoo architectures, fx tracing, checkpoint loading, float accuracy."""

import pytest
import torch
import torch.fx

from pimsim import data, models

CIFAR_NAMES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


def _input_for(name):
    """A random input batch of the resolution the model expects."""
    size = 64 if name == "resnet50" else 32
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(models.MODELS))
def test_fx_trace_matches(name):
    torch.manual_seed(0)
    model = models.build_model(name)
    traced = torch.fx.symbolic_trace(model)
    x = _input_for(name)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_cifar_stem_traces():
    model = models.resnet18(num_classes=10, cifar_stem=True).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    x = _input_for("resnet18")
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x), rtol=0, atol=0)
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize("name,depth", [(n, int(n[6:])) for n in CIFAR_NAMES])
def test_cifar_resnet_structure(name, depth):
    model = models.build_model(name)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == depth
    assert all(m.kernel_size == (3, 3) and m.bias is None for m in convs)
    assert model.linear.in_features == 64 and model.linear.out_features == 10
    shortcuts = [m for m in model.modules() if isinstance(m, models.PadShortcut)]
    assert [(s.stride, s.pad) for s in shortcuts] == [(2, 8), (2, 16)]


def test_cifar_param_names():
    names = set(models.resnet20().state_dict())
    for key in ["conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer3.2.bn2.bias", "linear.weight"]:
        assert key in names


def test_pad_shortcut():
    x = torch.randn(1, 16, 8, 8)
    y = models.PadShortcut(2, 8)(x)
    assert y.shape == (1, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_imagenet_param_names_and_shapes():
    r18 = models.resnet18().state_dict()
    assert "layer2.0.downsample.0.weight" in r18 and "layer2.0.downsample.1.running_mean" in r18
    assert r18["fc.weight"].shape == (1000, 512)
    r50 = models.build_model("resnet50", num_classes=7).state_dict()
    assert r50["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert r50["fc.weight"].shape == (7, 2048)
    assert sum(v.numel() for k, v in models.resnet50().named_parameters()) == 25_557_032  # torchvision count


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="resnet20.*resnet50"):
        models.build_model("vgg16")


# --------------------------------------------------------------------------- load_checkpoint


@pytest.fixture
def saved_resnet20(tmp_path):
    """A saved resnet20 state dict in the akamaster format (``module.`` prefix, best_prec1)."""
    torch.manual_seed(1)
    model = models.resnet20().eval()
    state = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "r20.th"
    torch.save({"state_dict": state, "best_prec1": 12.5}, path)
    return model, path


def test_load_checkpoint_roundtrip(saved_resnet20, tmp_path):
    model, path = saved_resnet20
    x = torch.randn(2, 3, 32, 32)
    loaded = models.build_model("resnet20", checkpoint=path)
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # a bare state_dict without the prefix and without num_batches_tracked also loads
    bare = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(bare, tmp_path / "bare.th")
    with torch.no_grad():
        torch.testing.assert_close(models.load_checkpoint(models.resnet20(), tmp_path / "bare.th")(x), model(x))


def test_load_checkpoint_missing_key(saved_resnet20, tmp_path):
    ckpt = torch.load(saved_resnet20[1], weights_only=True)
    del ckpt["state_dict"]["module.linear.bias"]
    torch.save(ckpt, tmp_path / "missing.th")
    with pytest.raises(ValueError, match=r"missing\.th.*missing keys: linear\.bias"):
        models.load_checkpoint(models.resnet20(), tmp_path / "missing.th")


def test_load_checkpoint_unexpected_key(saved_resnet20, tmp_path):
    ckpt = torch.load(saved_resnet20[1], weights_only=True)
    ckpt["state_dict"]["module.extra.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "extra.th")
    with pytest.raises(ValueError, match=r"unexpected keys: extra\.weight"):
        models.load_checkpoint(models.resnet20(), tmp_path / "extra.th")


def test_load_checkpoint_wrong_shape(saved_resnet20):
    wrong = models.resnet20()
    wrong.layer1[0].conv1 = torch.nn.Conv2d(16, 16, 1, bias=False)
    with pytest.raises(ValueError, match=r"r20\.th.*shape mismatch: layer1\.0\.conv1\.weight"):
        models.load_checkpoint(wrong, saved_resnet20[1])


def test_load_checkpoint_wrong_depth(saved_resnet20):
    with pytest.raises(ValueError, match="missing keys: layer1.3"):
        models.load_checkpoint(models.resnet32(), saved_resnet20[1])


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.th"):
        models.load_checkpoint(models.resnet20(), tmp_path / "nope.th")


def test_default_checkpoint_unknown():
    with pytest.raises(ValueError, match="resnet20"):
        models.default_checkpoint_path("resnet18")      # no fine-tuned nor published file


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def first_1000():
    """Normalized first 1,000 test images and labels, or skip."""
    try:
        data_dir = data.find_data_dir()
    except data.DataNotFoundError as e:
        pytest.skip(f"CIFAR-10 not found: {e}")
    images, labels = data.load_cifar10("test", data_dir, limit=1000)
    return data_dir, data.to_tensor(images), torch.from_numpy(labels.copy())


def _top1(model, x, y, batch_size=500):
    """Top-1 accuracy of ``model`` on (x, y), evaluated without gradients in batches."""
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return (pred == y).float().mean().item()


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_float_top1_first_1000(first_1000, name):
    data_dir, x, y = first_1000
    path = models.default_checkpoint_path(name, data_dir)
    if not path.is_file():
        pytest.skip(f"checkpoint not found: {path}")
    model = models.build_model(name, checkpoint=path)
    expected = models.FLOAT_TOP1[models.DEFAULT_CHECKPOINTS[name]][1000]
    assert expected == {"resnet20": 0.8980, "resnet56": 0.9000}[name]
    assert round(_top1(model, x, y), 4) == expected
