"""The data a run evaluates and calibrates on, as one object: ``open_dataset(cfg) -> Dataset``.

``data.dataset`` chooses it:

``cifar10``     ``cifar-10-batches-py/`` (``pimsim.data``): ``test_batch`` evaluated, calibration
                drawn from ``data_batch_1`` exactly as ``pimsim.data.calibration_set`` (today's
                rule, bit for bit).
``cifar100``    ``cifar-100-python/{train,test}`` in the same python format (fine labels, 100
                classes, the same safe unpickler); ``test`` evaluated, calibration drawn from
                ``train``.
``imagefolder`` ``data.root/train/<class>/*`` (calibration draws) and ``data.root/val/<class>/*``
                (evaluation); classes are the sorted folder names of ``train`` (``val`` must have
                the same set). Each image is decoded with Pillow as RGB, resized so its short side
                is ``data.resize`` (bilinear) and center-cropped to ``data.image_size`` (the
                ImageNet evaluation recipe, defaults 256 / 224); images are decoded in batches
                by a thread pool, one batch ahead, never all at once.
``npz``         ``data.path``: an ``.npz`` with ``x`` (N, H, W, C uint8 or N, C, H, W float) and
                ``y`` (N integer labels); calibration images from ``data.calib_path`` (``x``
                only) if given, else from ``data.path``. Read with ``allow_pickle=False``.

A draw of ``n`` calibration images with seed ``s`` is ``numpy.random.default_rng(s).choice(
len(train), n, replace=False)`` for every dataset (CIFAR-10: of ``data_batch_1``).

Normalization ``(x - mean) / std`` per channel, ``x`` in [0, 1] (uint8 / 255) or the npz floats
as stored. Defaults (``data.mean`` / ``data.std`` null): CIFAR-10 the constants pimsim has
always used (``pimsim.data.MEAN`` / ``STD``, the ImageNet statistics the published CIFAR
ResNets were trained with); CIFAR-100 its training-set statistics (``pimsim.data.
CIFAR100_MEAN`` / ``STD``); imagefolder the ImageNet statistics (torchvision's); npz none
(mean 0, std 1): a file's own statistics are unknown, so arrays are used as stored (uint8
scaled to [0, 1]); give ``data.mean`` / ``data.std`` for a model trained otherwise.

``input_spec(cfg)`` gives ``(num_classes, input_shape)`` without reading the images (``pimsim
cost``): CIFAR 100 / 10 and 3 x 32 x 32 without touching a file, imagefolder the train class
folders and ``data.image_size``, npz the array header of ``x`` and the labels ``y``.
"""

from __future__ import annotations

import math
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .data import (CALIBRATION_BATCH, CIFAR100_FOLDER, CIFAR100_MEAN, CIFAR100_STD, CIFAR_FOLDER,
                   MEAN, STD, DataError, DataNotFoundError, calibration_pool, calibration_set, find_data_dir,
                   candidate_paths, load_cifar10, load_cifar100, to_tensor)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_SHAPE = (3, 32, 32)
# threads decoding images of an image folder (Pillow releases the GIL while decoding)
DECODE_THREADS = min(8, os.cpu_count() or 1)


def draw(count: int, n: int, seed: int) -> np.ndarray:
    """The calibration draw: ``n`` of ``count`` indices without replacement, in draw order."""
    return np.random.default_rng(seed).choice(count, size=n, replace=False)


def normalize(x: np.ndarray, mean, std) -> torch.Tensor:
    """float32 ``(x - mean) / std`` per channel of N x C x H x W ``x``; uint8 is divided by 255
    first (``pimsim.data.to_tensor``), floats are taken as they are."""
    if x.dtype == np.uint8:
        return to_tensor(x, mean, std)
    t = torch.tensor(np.asarray(x), dtype=torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (t - m) / s


def resolve_path(cfg, key: str, folder: bool = False) -> Path:
    """The file (or folder) of config key ``key``: absolute, else beside the YAML file, else in
    the working directory; DataNotFoundError naming the key and the places looked at."""
    value = cfg[key]
    looked = candidate_paths(value, cfg.source)
    for cand in looked:
        if (cand.is_dir() if folder else cand.is_file()):
            return cand
    kind = "folder" if folder else "file"
    raise DataNotFoundError(f"{cfg.source}: {key}: {value}: {kind} not found; looked in "
                            + ", ".join(str(c) for c in looked))


def _norm_values(cfg, channels: int, default_mean, default_std, where: str):
    """``(mean, std)`` tuples: the config's, else the defaults; DataError when their length is
    not the channel count."""
    out = []
    for key, default in (("mean", default_mean), ("std", default_std)):
        v = cfg[f"data.{key}"]
        v = tuple(default) if v is None else tuple(float(a) for a in v)
        if len(v) != channels:
            raise DataError(f"{cfg.source}: data.{key}: {list(v)}: {len(v)} value(s) for the "
                            f"{channels}-channel images of {where}; give {channels}")
        out.append(v)
    return tuple(out)


class Dataset:
    """A dataset as a run uses it. Subclasses set ``name``, ``num_classes``, ``input_shape``
    (C, H, W), ``mean`` / ``std`` and implement ``test_size``, ``test_batches``,
    ``train_size`` and ``calibration``."""

    name = ""
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple
    std: tuple
    data_dir: Path | None = None     # the folder of <data dir>/models/ (CIFAR), else None

    @property
    def test_size(self) -> int:
        raise NotImplementedError

    @property
    def test_source(self) -> str:
        """What the evaluation images are (a file or folder), for messages."""
        raise NotImplementedError

    @property
    def calib_source(self) -> str:
        """Where calibration images are drawn from, for messages and ``describe``."""
        raise NotImplementedError

    @property
    def train_size(self) -> int:
        raise NotImplementedError

    def test_batches(self, batch_size: int, limit: int | None = None):
        """Yield ``(normalized float32 N x C x H x W tensor, int64 labels)`` over the first
        ``limit`` (default all) evaluation images, ``batch_size`` at a time, in order."""
        raise NotImplementedError

    def calibration(self, n: int, seed: int) -> torch.Tensor:
        """``n`` training images drawn with ``seed`` (``draw``) as a normalized tensor."""
        raise NotImplementedError

    def check_calibration(self, n: int) -> None:
        """DataError before any work when ``n`` calibration images cannot be drawn."""
        size = self.train_size
        if not 0 < n <= size:
            raise DataError(f"{self.calib_source}: holds {size} images; the calibration set size "
                            f"(quant.calib_images) must be in 1..{size}, got {n}")

    def describe(self) -> dict:
        """The dataset as the run output / JSON records it."""
        return {"dataset": self.name, "test": self.test_source, "test_size": self.test_size,
                "calibration": self.calib_source, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "mean": list(self.mean),
                "std": list(self.std)}


def _array_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, limit, mean, std):
    n = len(images) if limit is None else min(limit, len(images))
    for s in range(0, n, batch_size):
        e = min(s + batch_size, n)
        yield normalize(images[s:e], mean, std), np.asarray(labels[s:e], dtype=np.int64)


class Cifar10(Dataset):
    """CIFAR-10 through ``pimsim.data`` (today's functions: the same images, draw and tensors)."""

    name = "cifar10"
    num_classes = 10
    input_shape = CIFAR_SHAPE

    def __init__(self, cfg, data_dir=None):
        self.data_dir = find_data_dir(data_dir)
        self.mean, self.std = _norm_values(cfg, 3, MEAN, STD, "CIFAR-10")

    @property
    def test_size(self) -> int:
        return len(load_cifar10("test", self.data_dir)[1])

    @property
    def test_source(self) -> str:
        return str(self.data_dir / CIFAR_FOLDER / "test_batch")

    @property
    def calib_source(self) -> str:
        return str(self.data_dir / CIFAR_FOLDER / CALIBRATION_BATCH)

    @property
    def train_size(self) -> int:
        return len(calibration_pool(self.data_dir)[1])

    def test_batches(self, batch_size: int, limit: int | None = None):
        images, labels = load_cifar10("test", self.data_dir)
        yield from _array_batches(images, labels, batch_size, limit, self.mean, self.std)

    def calibration(self, n: int, seed: int) -> torch.Tensor:
        return to_tensor(calibration_set(n, seed, self.data_dir)[0], self.mean, self.std)


class Cifar100(Dataset):
    """CIFAR-100 (python format, fine labels): ``test`` evaluated, calibration from ``train``."""

    name = "cifar100"
    num_classes = 100
    input_shape = CIFAR_SHAPE

    def __init__(self, cfg, data_dir=None):
        self.data_dir = find_data_dir(data_dir, CIFAR100_FOLDER)
        self.mean, self.std = _norm_values(cfg, 3, CIFAR100_MEAN, CIFAR100_STD, "CIFAR-100")

    @property
    def test_size(self) -> int:
        return len(load_cifar100("test", self.data_dir)[1])

    @property
    def test_source(self) -> str:
        return str(self.data_dir / CIFAR100_FOLDER / "test")

    @property
    def calib_source(self) -> str:
        return str(self.data_dir / CIFAR100_FOLDER / "train")

    @property
    def train_size(self) -> int:
        return len(load_cifar100("train", self.data_dir)[1])

    def test_batches(self, batch_size: int, limit: int | None = None):
        images, labels = load_cifar100("test", self.data_dir)
        yield from _array_batches(images, labels, batch_size, limit, self.mean, self.std)

    def calibration(self, n: int, seed: int) -> torch.Tensor:
        self.check_calibration(n)
        images, _ = load_cifar100("train", self.data_dir)
        return to_tensor(images[draw(len(images), n, seed)], self.mean, self.std)


# --------------------------------------------------------------------------- image folders


def image_extensions() -> frozenset[str]:
    """File suffixes (lower case) Pillow can open; other files in a class folder are ignored."""
    from PIL import Image
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def class_folders(split_dir: Path, key: str = "data.root") -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of ``split_dir``; DataError if none."""
    if not split_dir.is_dir():
        raise DataNotFoundError(f"{key}: {split_dir.parent}: has no {split_dir.name}/ folder "
                                f"(an image folder holds train/<class>/* and val/<class>/*)")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{key}: {split_dir}: no class folders (expected {split_dir}/<class>/*)")
    return names


def _scan(split_dir: Path, classes: list[str], exts) -> list[tuple[Path, int]]:
    samples = []
    for label, c in enumerate(classes):
        folder = split_dir / c
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)
        if not files:
            raise DataError(f"data.root: {folder}: empty class folder (no image files)")
        samples += [(p, label) for p in files]
    return samples


def load_image(path: Path, resize: int, size: int) -> np.ndarray:
    """One image as uint8 C x H x W: decoded as RGB, resized (bilinear) so the short side is
    ``resize`` (the long side ``int(resize * long / short)``), center-cropped to ``size``
    (offsets ``round((H - size) / 2)``, ``round((W - size) / 2)``), as torchvision's
    ``Resize(resize)`` + ``CenterCrop(size)`` on a PIL image. DataError naming the file if
    Pillow cannot read it."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if w <= h:
                ow, oh = resize, int(resize * h / w)
            else:
                ow, oh = int(resize * w / h), resize
            im = im.resize((ow, oh), Image.BILINEAR)
            top, left = int(round((oh - size) / 2.0)), int(round((ow - size) / 2.0))
            im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    return np.ascontiguousarray(a.transpose(2, 0, 1))


class ImageFolder(Dataset):
    """``data.root/train/<class>/*`` and ``val/<class>/*`` decoded, resized and cropped by Pillow."""

    name = "imagefolder"

    def __init__(self, cfg, data_dir=None, threads: int = DECODE_THREADS):
        self.root = resolve_path(cfg, "data.root", folder=True)
        self.size, self.resize = cfg["data.image_size"], cfg["data.resize"]
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.threads = max(1, threads)
        self.classes = class_folders(self.root / "train")
        val_classes = class_folders(self.root / "val")
        if val_classes != self.classes:
            only_t = sorted(set(self.classes) - set(val_classes))
            only_v = sorted(set(val_classes) - set(self.classes))
            raise DataError(f"data.root: {self.root}: train/ and val/ have different class "
                            f"folders (only in train: {', '.join(only_t) or '-'}; only in val: "
                            f"{', '.join(only_v) or '-'})")
        exts = image_extensions()
        self.train = _scan(self.root / "train", self.classes, exts)
        self.val = _scan(self.root / "val", self.classes, exts)
        self.num_classes = len(self.classes)
        self.input_shape = (3, self.size, self.size)
        self.mean, self.std = _norm_values(cfg, 3, IMAGENET_MEAN, IMAGENET_STD, str(self.root))

    @property
    def test_size(self) -> int:
        return len(self.val)

    @property
    def test_source(self) -> str:
        return str(self.root / "val")

    @property
    def calib_source(self) -> str:
        return str(self.root / "train")

    @property
    def train_size(self) -> int:
        return len(self.train)

    def _decode(self, pool, paths):
        return pool.map(lambda p: load_image(p, self.resize, self.size), paths)

    def test_batches(self, batch_size: int, limit: int | None = None):
        n = len(self.val) if limit is None else min(limit, len(self.val))
        starts = list(range(0, n, batch_size))
        with ThreadPoolExecutor(self.threads) as pool:
            def submit(s):
                chunk = self.val[s:min(s + batch_size, n)]
                return ([pool.submit(load_image, p, self.resize, self.size) for p, _ in chunk],
                        np.array([lab for _, lab in chunk], dtype=np.int64))
            pending = submit(starts[0]) if starts else None
            for i in range(len(starts)):
                futures, labels = pending
                pending = submit(starts[i + 1]) if i + 1 < len(starts) else None  # one ahead
                try:
                    images = np.stack([f.result() for f in futures])
                except DataError:
                    for f in futures + (pending[0] if pending else []):
                        f.cancel()
                    raise
                yield normalize(images, self.mean, self.std), labels

    def calibration(self, n: int, seed: int) -> torch.Tensor:
        self.check_calibration(n)
        idx = draw(len(self.train), n, seed)
        with ThreadPoolExecutor(self.threads) as pool:
            images = np.stack(list(self._decode(pool, [self.train[i][0] for i in idx])))
        return normalize(images, self.mean, self.std)

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "classes": self.classes,
                "resize": self.resize, "image_size": self.size,
                "train_size": len(self.train)}


# --------------------------------------------------------------------------- npz files


def npz_header(path: Path, key: str = "x") -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of array ``key`` of an .npz without reading its data (the .npy header
    of that zip member); DataError naming the file if it is not an .npz holding ``key``."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if f"{key}.npy" not in names:
                have = sorted(n.removesuffix(".npy") for n in names)
                raise DataError(f"{path}: no array {key!r} in this .npz (arrays: "
                                f"{', '.join(have) or 'none'}); it needs x and y")
            with z.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    return tuple(shape), np.dtype(dtype)


def _layout(path: Path, shape, dtype) -> tuple[str, tuple[int, int, int]]:
    """``("nhwc" | "nchw", (C, H, W))`` of an ``x`` array; DataError for other dims / dtypes."""
    if len(shape) != 4:
        raise DataError(f"{path}: x has shape {tuple(shape)}: must be 4-D, N x H x W x C uint8 "
                        f"or N x C x H x W float")
    if dtype == np.uint8:
        return "nhwc", (shape[3], shape[1], shape[2])
    if np.issubdtype(dtype, np.floating):
        return "nchw", tuple(shape[1:])
    raise DataError(f"{path}: x has dtype {dtype}: must be uint8 (N x H x W x C) or float "
                    f"(N x C x H x W)")


def _load_npz(path: Path) -> dict:
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single array, not an .npz with x and y")
        with f:
            return {k: f[k] for k in f.files if k in ("x", "y")}
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None


def _npz_labels(path: Path, y, n: int, num_classes: int | None) -> np.ndarray:
    """``y`` checked: 1-D integers, one per image, in ``0..num_classes - 1`` (when given)."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y has shape {y.shape} and dtype {y.dtype}: must be a 1-D "
                        f"integer array of labels")
    if len(y) != n:
        raise DataError(f"{path}: {len(y)} labels in y for {n} images in x")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: y holds label {int(y.min())}: labels must be >= 0")
    if num_classes is not None and len(y) and y.max() >= num_classes:
        raise DataError(f"{path}: y holds label {int(y.max())}: out of range for data.num_classes "
                        f"{num_classes} (labels 0..{num_classes - 1})")
    return y.astype(np.int64)


class Npz(Dataset):
    """``data.path`` (``x``, ``y``) evaluated; calibration from ``data.calib_path`` or it."""

    name = "npz"

    def __init__(self, cfg, data_dir=None):
        self.path = resolve_path(cfg, "data.path")
        self.calib_path = (resolve_path(cfg, "data.calib_path")
                           if cfg["data.calib_path"] is not None else None)
        self.data_dir = None if data_dir is None else Path(data_dir)
        arrays = _load_npz(self.path)
        for key in ("x", "y"):
            if key not in arrays:
                raise DataError(f"{self.path}: no array {key!r} in this .npz (arrays: "
                                f"{', '.join(sorted(arrays)) or 'none'}); it needs x and y")
        self.x = arrays["x"]
        self.layout, self.input_shape = _layout(self.path, self.x.shape, self.x.dtype)
        self.y = _npz_labels(self.path, arrays["y"], len(self.x), cfg["data.num_classes"])
        if len(self.x) == 0:
            raise DataError(f"{self.path}: x holds no images")
        self.num_classes = (cfg["data.num_classes"] if cfg["data.num_classes"] is not None
                            else int(self.y.max()) + 1)
        c = self.input_shape[0]
        self.mean, self.std = _norm_values(cfg, c, (0.0,) * c, (1.0,) * c, str(self.path))
        self._calib_x = None

    def _nchw(self, x: np.ndarray) -> np.ndarray:
        return x.transpose(0, 3, 1, 2) if self.layout == "nhwc" else x

    def _calib_images(self) -> np.ndarray:
        if self.calib_path is None:
            return self.x
        if self._calib_x is None:
            arrays = _load_npz(self.calib_path)
            if "x" not in arrays:
                raise DataError(f"{self.calib_path}: no array 'x' in this .npz (arrays: "
                                f"{', '.join(sorted(arrays)) or 'none'}); data.calib_path needs x")
            x = arrays["x"]
            layout, shape = _layout(self.calib_path, x.shape, x.dtype)
            if (layout, shape) != (self.layout, self.input_shape):
                raise DataError(f"{self.calib_path}: x is {x.dtype} {tuple(x.shape)}: calibration "
                                f"images must be {self.x.dtype} of the evaluation images' layout "
                                f"and size (x of {self.path}: {tuple(self.x.shape)})")
            self._calib_x = x
        return self._calib_x

    @property
    def test_size(self) -> int:
        return len(self.x)

    @property
    def test_source(self) -> str:
        return str(self.path)

    @property
    def calib_source(self) -> str:
        return str(self.calib_path if self.calib_path is not None else self.path)

    @property
    def train_size(self) -> int:
        return len(self._calib_images())

    def test_batches(self, batch_size: int, limit: int | None = None):
        n = len(self.x) if limit is None else min(limit, len(self.x))
        for s in range(0, n, batch_size):
            e = min(s + batch_size, n)
            yield normalize(np.ascontiguousarray(self._nchw(self.x[s:e])), self.mean,
                            self.std), self.y[s:e]

    def calibration(self, n: int, seed: int) -> torch.Tensor:
        self.check_calibration(n)
        x = self._calib_images()
        return normalize(np.ascontiguousarray(self._nchw(x[draw(len(x), n, seed)])), self.mean,
                         self.std)

    def describe(self) -> dict:
        d = super().describe()
        d["calibration"] = (f"{self.calib_path} (data.calib_path)" if self.calib_path is not None
                            else f"{self.path} (the evaluation file: no data.calib_path)")
        return {**d, "layout": self.layout}


DATASETS = {"cifar10": Cifar10, "cifar100": Cifar100, "imagefolder": ImageFolder, "npz": Npz}


def open_dataset(cfg, data_dir=None) -> Dataset:
    """The ``Dataset`` of a validated config (``data_dir``: a ``--data-dir`` that overrides
    ``data.dir``). Errors (DataNotFoundError / DataError) name the file, key and value."""
    ddir = data_dir or cfg["data.dir"]
    return DATASETS[cfg["data.dataset"]](cfg, ddir)


def input_spec(cfg) -> tuple[int, tuple[int, int, int]]:
    """``(num_classes, (C, H, W))`` of the config's data, read cheaply (see the module
    docstring): what ``pimsim cost`` builds and traces the network with."""
    ds = cfg["data.dataset"]
    if ds == "cifar10":
        return 10, CIFAR_SHAPE
    if ds == "cifar100":
        return 100, CIFAR_SHAPE
    if ds == "imagefolder":
        root = resolve_path(cfg, "data.root", folder=True)
        size = cfg["data.image_size"]
        return len(class_folders(root / "train")), (3, size, size)
    path = resolve_path(cfg, "data.path")
    shape, dtype = npz_header(path, "x")
    _, chw = _layout(path, shape, dtype)
    npz_header(path, "y")
    if cfg["data.num_classes"] is not None:
        return cfg["data.num_classes"], chw
    with np.load(path, allow_pickle=False) as f:
        y = _npz_labels(path, f["y"], shape[0], None)
    if not len(y):
        raise DataError(f"{path}: y holds no labels")
    return int(y.max()) + 1, chw


def batch_count(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
