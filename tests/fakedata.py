"""Small stand-ins for the real data, made by the tests that need them (no network, no shared/).

``make_fetch_layout`` lays a folder out exactly as ``pimsim fetch`` leaves it: the archive,
``cifar-10-batches-py/`` with ``batches.meta``, ``data_batch_1`` .. ``data_batch_5``,
``readme.html`` and ``test_batch`` in the CIFAR python format, and ``models/`` with the five
published checkpoint names (tiny random ResNets in the akamaster format). ``write_batch`` and
``save_checkpoint`` make single files; ``Payload`` builds pickles whose unpickling creates a
marker file (for the "never run code from a file" tests).
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from pimsim import data, models

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "hwconfigs" / "default.yaml"
# a quick run on the fake data: max calibration on 16 images, fake-quant path, one thread
QUICK = ["--backend", "fake", "--set", "quant.calibration=max", "--set", "quant.calib_images=16",
         "--set", "eval.threads=1", "-q"]

LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
               b"ship", b"truck"]


def write_batch(path, n: int, seed: int, protocol: int = 2) -> tuple[np.ndarray, list[int]]:
    """A CIFAR-10 batch file of ``n`` random images (bytes keys, like the original release);
    returns (flat uint8 data [n, 3072], labels)."""
    rng = np.random.default_rng(seed)
    flat = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": f"batch {seed}".encode(), b"labels": labels, b"data": flat,
                     b"filenames": [f"img{i}.png".encode() for i in range(n)]}, f, protocol=protocol)
    return flat, labels


def save_checkpoint(path, name: str = "resnet20", seed: int = 0, fmt: str = "th") -> dict:
    """A random ``name`` model saved in the akamaster format (``{'state_dict': {'module.<k>':
    ...}, 'best_prec1': ...}``, no num_batches_tracked) or as ``.safetensors``; BatchNorm
    statistics are randomized too so that every tensor matters. Returns the bare state dict."""
    torch.manual_seed(seed)
    model = models.build_model(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({"module." + k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()},
                    "best_prec1": 10.0}, path)
    return state


def make_fetch_layout(root, n_train: int = 40, n_test: int = 30,
                      published=("resnet20",), fine_tuned=()) -> Path:
    """``root`` as ``pimsim fetch --dest root`` leaves it (see the module docstring), each
    ``data_batch_i`` with different images. Checkpoints: real tiny random models for the
    architectures in ``published`` (seed 1) and ``fine_tuned`` (seed 2, under the
    ``*-cifar10jpg.th`` name), empty placeholder files for the other published names
    (present, as after a fetch, but never loaded). Returns ``root``."""
    root = Path(root)
    folder = root / data.CIFAR_FOLDER
    folder.mkdir(parents=True)
    for i in range(1, 6):
        write_batch(folder / f"data_batch_{i}", n_train, seed=10 + i)
    write_batch(folder / "test_batch", n_test, seed=99)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"num_cases_per_batch": n_train, b"label_names": LABEL_NAMES,
                     b"num_vis": 3072}, f, protocol=2)
    (folder / "readme.html").write_text("<html>CIFAR-10</html>\n")
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname=data.CIFAR_FOLDER)
    published_files = {f.split("-")[0]: f for f in data.CHECKPOINT_URLS}   # what fetch downloads
    for name, file in published_files.items():
        if name in published:
            save_checkpoint(root / "models" / file, name, seed=1)
        else:
            (root / "models").mkdir(exist_ok=True)
            (root / "models" / file).write_bytes(b"")
    for name in fine_tuned:
        save_checkpoint(root / "models" / models.DEFAULT_CHECKPOINTS[name], name, seed=2)
    return root


def float_top1(state: dict, name: str, images_flat: np.ndarray, labels) -> float:
    """Float top-1 of a bare state dict on flat uint8 CIFAR images, computed here from the
    CIFAR layout and the published normalization (independent of pimsim.data / simulate)."""
    x = torch.tensor(images_flat.reshape(-1, 3, 32, 32), dtype=torch.float32) / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    model = models.MODELS[name]()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), \
        (missing, unexpected)
    model.eval()
    with torch.no_grad():
        pred = model((x - mean) / std).argmax(1).numpy()
    return float((pred == np.asarray(labels)).mean())


class Payload:
    """Unpickling this creates (opens for writing) ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
