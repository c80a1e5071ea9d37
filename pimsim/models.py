"""Model zoo: CIFAR ResNets (He et al. 2016, akamaster layout), ImageNet-style ResNet-18/50, checkpoint loading.

All models are plain ``nn.Module`` trees that ``torch.fx.symbolic_trace`` can trace.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import CHECKPOINT_URLS, find_data_dir

# Checkpoints fine-tuned on the JPEG copy of CIFAR-10 (shared/data/models/, beside that copy):
# the first choice of ``model.checkpoint: null`` for each architecture.
DEFAULT_CHECKPOINTS = {"resnet20": "resnet20-cifar10jpg.th", "resnet56": "resnet56-cifar10jpg.th"}

# The published akamaster checkpoints that ``pimsim fetch`` downloads into <dest>/models/
# (trained on the original CIFAR-10 release): the choice of ``model.checkpoint: null`` where
# no fine-tuned file is present, as after ``pimsim fetch``.
PUBLISHED_CHECKPOINTS = {name.split("-")[0]: name for name in CHECKPOINT_URLS}

# Float top-1 on test_batch of the shared data (models/README.md): FLOAT_TOP1[file][n_images],
# for all 10,000 test images and for the first 1,000.
FLOAT_TOP1 = {
    "resnet20-cifar10jpg.th": {10000: 0.8804, 1000: 0.8980},
    "resnet56-cifar10jpg.th": {10000: 0.8953, 1000: 0.9000},
    "resnet20-12fca82f.th": {10000: 0.8103, 1000: 0.8160},
    "resnet56-4bfd9763.th": {10000: 0.8320, 1000: 0.8330},
}


# --------------------------------------------------------------------------- CIFAR ResNets


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` in H and W, zero-pad ``pad`` channels on each side."""

    def __init__(self, stride: int, pad: int):
        super().__init__()
        self.stride = stride
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsample spatially and zero-pad the channel dimension."""
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class CifarBasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or option-A (``PadShortcut``) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(stride, planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet with a 3x3 16-channel stem, three stages of 16/32/64 channels and ``n`` blocks each."""

    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, n, stride=1)
        self.layer2 = self._make_layer(16, 32, n, stride=2)
        self.layer3 = self._make_layer(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        """A stage of ``n`` blocks; only the first one changes stride / width."""
        blocks = [CifarBasicBlock(in_planes, planes, stride)]
        blocks += [CifarBasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, three stages, global average pooling, linear classifier."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def _cifar_resnet(depth: int) -> Callable[..., CifarResNet]:
    """Return a constructor ``f(num_classes=10)`` for the CIFAR ResNet of the given depth (6n + 2)."""

    def build(num_classes: int = 10) -> CifarResNet:
        return CifarResNet((depth - 2) // 6, num_classes)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} (n = {(depth - 2) // 6} blocks per stage)."
    return build


resnet20 = _cifar_resnet(20)
resnet32 = _cifar_resnet(32)
resnet44 = _cifar_resnet(44)
resnet56 = _cifar_resnet(56)
resnet110 = _cifar_resnet(110)


# --------------------------------------------------------------------------- ImageNet-style ResNets


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 conv-BN layers, projection (``downsample``) shortcut when needed."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    """ResNet-50 block (torchvision v1.5: stride on the 3x3 conv): 1x1 -> 3x3 -> 1x1 (x4 channels)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Three conv-BN layers with ReLUs, plus the (projected) shortcut."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class ResNet(nn.Module):
    """ImageNet-style ResNet with torchvision parameter names.

    ``cifar_stem=True`` replaces the 7x7 stride-2 stem and max-pool by a 3x3 stride-1 conv (no
    pool), for 32x32 inputs.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        cifar_stem: bool = False,
    ):
        super().__init__()
        self.in_planes = 64
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """A stage of ``blocks`` blocks; the first gets a 1x1 conv-BN ``downsample`` if shapes change."""
        downsample = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_planes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, four stages, global average pooling, fully connected classifier."""
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def resnet18(num_classes: int = 1000, cifar_stem: bool = False) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, cifar_stem)


def resnet50(num_classes: int = 1000, cifar_stem: bool = False) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, cifar_stem)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


# --------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; names the file."""


def _weights_only_reason(e: Exception) -> str:
    """What torch's weights-only unpickler refused, on one line: the global the file asks for
    (``it needs io.open``) or torch's own reason (``Unsupported operand 149``)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it needs {m.group(1)}, which a weights-only load refuses"
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    reason = " ".join(m.group(1).split()) if m else type(e).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _read_checkpoint(path: Path) -> dict:
    """The tensors of a checkpoint file, never running code from it.

    ``.safetensors`` files are read with ``safetensors.torch.load_file``; anything else with
    ``torch.load(weights_only=True)``, which builds tensors, numbers, strings, lists and dicts
    only. A pickle that needs more (a class or function of its choosing) is refused with
    CheckpointError: there is no fallback to full unpickling.
    """
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 — SafetensorError and friends: name the file
            raise CheckpointError(f"{path}: not a readable safetensors file "
                                  f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    try:
        with warnings.catch_warnings():      # the published legacy files use protocol 4: fine
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: not a plain weights file ({_weights_only_reason(e)}); "
                              f"pimsim loads tensors only") from None
    except Exception as e:  # noqa: BLE001 — any failure to read: say which file and why
        raise CheckpointError(f"{path}: not a readable torch checkpoint "
                              f"({type(e).__name__}: {' '.join(str(e).split())})") from None


def _check_finite(path: Path, state: dict) -> None:
    """CheckpointError naming the file and the first tensor that holds NaN or inf (every
    tensor is checked, also those of layers that later stay in float)."""
    for k, v in state.items():
        if v.is_floating_point() or v.is_complex():
            bad = ~torch.isfinite(v)
            if bad.any():
                n_nan, n_inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
                raise CheckpointError(f"{path}: tensor {k} holds {n_nan} NaN and {n_inf} inf "
                                      f"value(s) of {v.numel()}; the weights are broken")


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint into ``model`` and return it in eval mode.

    Accepts ``{'state_dict': {...}}`` or a bare state_dict, keys with or without the ``module.``
    prefix, in a torch file (read with ``weights_only=True``) or a ``.safetensors`` file.
    BatchNorm ``num_batches_tracked`` counters may be absent (the published akamaster
    checkpoints lack them). Raises FileNotFoundError for a missing file and CheckpointError (a
    ValueError) naming the file for a file that needs full unpickling (refused: it could run
    code), a file that cannot be read, NaN or inf in any tensor (naming it), and
    missing/unexpected keys or shape mismatches (naming the first offending keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = _read_checkpoint(path)
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state_dict or {{'state_dict': ...}}, got {type(ckpt).__name__}")
    bad = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries must be tensors, got "
                              f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}
    _check_finite(path, state)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict({**expected, **state})
    return model.eval()


def default_checkpoint_names(name: str) -> list[str]:
    """The files ``model.checkpoint: null`` stands for, in order of preference, each looked
    for in ``<data dir>/models/``: the fine-tuned one (``DEFAULT_CHECKPOINTS``, beside the JPEG
    copy), then the published one (``PUBLISHED_CHECKPOINTS``, what ``pimsim fetch``
    downloads). Empty for a model with neither."""
    return [d[name] for d in (DEFAULT_CHECKPOINTS, PUBLISHED_CHECKPOINTS) if name in d]


def default_checkpoint_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The default checkpoint of ``name`` in ``<data_dir>/models/`` (data dir found by
    ``find_data_dir``): the first of ``default_checkpoint_names(name)`` that exists, else the
    first of them (a path that does not exist). ValueError for a model without a default."""
    names = default_checkpoint_names(name)
    if not names:
        have = sorted({*DEFAULT_CHECKPOINTS, *PUBLISHED_CHECKPOINTS})
        raise ValueError(f"no default checkpoint for {name!r}; available for: {', '.join(have)}")
    models_dir = find_data_dir(data_dir) / "models"
    return next((models_dir / n for n in names if (models_dir / n).is_file()), models_dir / names[0])


def build_model(name: str, checkpoint: str | os.PathLike | None = None, num_classes: int | None = None) -> nn.Module:
    """Build zoo model ``name`` (optionally with ``num_classes`` outputs), load ``checkpoint`` if given.

    Returns the model in eval mode. Unknown names raise ValueError listing the allowed ones.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")
    model = MODELS[name]() if num_classes is None else MODELS[name](num_classes=num_classes)
    if checkpoint is not None:
        return load_checkpoint(model, checkpoint)
    return model.eval()


# --------------------------------------------------------------------------------------------
# User models: a factory function in a model file or an importable module
# --------------------------------------------------------------------------------------------

class ModelFactoryError(ValueError):
    """A ``model.factory`` that cannot give a model: file or module not found, function
    missing, the function raising or not returning an ``nn.Module``; the message says which."""


def parse_factory(spec: str) -> tuple[str, str, str]:
    """``(kind, target, function)`` of ``"FILE.py:FUNCTION"`` (kind ``file``: a path, ending in
    ``.py`` or holding a ``/``) or ``"package.module:FUNCTION"`` (kind ``module``); FUNCTION
    may be a dotted attribute path. ModelFactoryError for anything else."""
    if not isinstance(spec, str):
        raise ModelFactoryError("must be 'FILE.py:FUNCTION' or 'package.module:FUNCTION'")
    target, sep, func = spec.rpartition(":")
    if not sep or not target or not all(p.isidentifier() for p in func.split(".")):
        raise ModelFactoryError("must be 'FILE.py:FUNCTION' or 'package.module:FUNCTION' "
                                "(FUNCTION a Python name)")
    if target.endswith(".py") or "/" in target or os.sep in target:
        return "file", target, func
    if not all(p.isidentifier() for p in target.split(".")):
        raise ModelFactoryError(f"{target!r} is neither a .py file nor a dotted module name; "
                                "must be 'FILE.py:FUNCTION' or 'package.module:FUNCTION'")
    return "module", target, func


def factory_file(spec: str, base_dir: str | os.PathLike | None = None) -> Path | None:
    """The model file a ``FILE.py:FUNCTION`` factory names (a relative path taken from
    ``base_dir``, default the working directory); None for a ``package.module`` factory."""
    kind, target, _ = parse_factory(spec)
    if kind != "file":
        return None
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else Path.cwd()) / path
    return path.resolve()


def _exec_file(path: Path):
    """Import the model file ``path`` as a fresh module (its folder on ``sys.path`` meanwhile,
    so that it can import files beside it)."""
    name = f"pimsim_user_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFactoryError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # classes defined there must be findable by name
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 — the user's code: say which file and what it raised
        sys.modules.pop(name, None)
        raise ModelFactoryError(f"importing {path} raised {type(e).__name__}: "
                                f"{' '.join(str(e).split())}") from e
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return module


def load_factory(spec: str, base_dir: str | os.PathLike | None = None):
    """The function a ``model.factory`` string names (see ``parse_factory``): the model file
    is imported (its code runs: it is the user's model definition), or the module imported.
    ModelFactoryError for a missing file / module / function or one that is not callable."""
    kind, target, func = parse_factory(spec)
    if kind == "file":
        path = factory_file(spec, base_dir)
        if not path.is_file():
            raise ModelFactoryError(f"model file not found: {path}")
        module, where = _exec_file(path), str(path)
    else:
        where = f"module {target}"
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name and (target == e.name or target.startswith(e.name + ".")):
                raise ModelFactoryError(f"module {target} not found (No module named "
                                        f"{e.name!r}); is it installed or on PYTHONPATH?") from e
            raise ModelFactoryError(f"importing module {target} raised ModuleNotFoundError: "
                                    f"{e}") from e
        except Exception as e:  # noqa: BLE001 — the user's module raised on import
            raise ModelFactoryError(f"importing module {target} raised {type(e).__name__}: "
                                    f"{' '.join(str(e).split())}") from e
    obj = module
    for part in func.split("."):
        if not hasattr(obj, part):
            have = sorted(k for k, v in vars(module).items()
                          if callable(v) and not k.startswith("_")
                          and getattr(v, "__module__", None) == module.__name__)
            raise ModelFactoryError(f"{where} has no function {func!r}"
                                    + (f"; functions there: {', '.join(have[:10])}" if have
                                       else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelFactoryError(f"{where}: {func} is a {type(obj).__name__}, not a function")
    return obj


def build_from_factory(spec: str, kwargs: dict | None = None,
                       base_dir: str | os.PathLike | None = None,
                       checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """The model ``load_factory(spec, base_dir)(**kwargs)`` returns, with the tensors of
    ``checkpoint`` loaded (``load_checkpoint``: a state dict, ``{'state_dict': ...}``, keys with a
    ``module.`` prefix, or ``.safetensors``; tensors only), or its own initial weights when
    ``checkpoint`` is None; in eval mode. ModelFactoryError when the function raises (its
    message included) or returns something other than an ``nn.Module``; CheckpointError /
    FileNotFoundError from ``load_checkpoint``."""
    fn = load_factory(spec, base_dir)
    kwargs = dict(kwargs or {})
    _, _, func = parse_factory(spec)
    try:
        model = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 — the user's function: report what it raised
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ModelFactoryError(f"{func}({args}) raised {type(e).__name__}: "
                                f"{' '.join(str(e).split())}") from e
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(f"{func} returned a {type(model).__name__}, not a "
                                "torch.nn.Module")
    if checkpoint is not None:
        return load_checkpoint(model, checkpoint)
    return model.eval()
