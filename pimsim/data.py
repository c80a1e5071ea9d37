"""CIFAR-10 / CIFAR-100 data: locate, load, normalize and sample the python-format batches, and
download them (and checkpoints). The other datasets (image folders, .npz files) and the
``Dataset`` object a run evaluates through are ``pimsim.datasets``."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tqdm import tqdm

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
# CIFAR-100, python version (https://www.cs.toronto.edu/~kriz/cifar.html): train, test, meta
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
_CHECKPOINT_BASE = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
CHECKPOINT_URLS = {
    name: _CHECKPOINT_BASE + name
    for name in (
        "resnet20-12fca82f.th",
        "resnet32-d509ac18.th",
        "resnet44-014dd654.th",
        "resnet56-4bfd9763.th",
        "resnet110-1d1ed7c2.th",
    )
}

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# Loaded batch files kept in memory (least recently used dropped first): a run reads two,
# test_batch and the calibration batch data_batch_1 (~30 MB each).
CACHE_BATCHES = 2


class DataNotFoundError(FileNotFoundError):
    """No folder holding ``cifar-10-batches-py/`` was found."""


class DataError(ValueError):
    """A data file that is not what it should be (corrupt, truncated, wrong contents, or a
    pickle that asks for more than arrays, lists and dicts); the message names the file."""


class FetchError(RuntimeError):
    """A download that failed; the message names the URL and what to do."""


# --------------------------------------------------------------------------- locating


def candidate_data_dirs(explicit: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """Return the folders searched for ``cifar-10-batches-py/``, in search order, each with a label.

    Order: ``explicit`` (``--data-dir`` / ``data.dir``), ``$PIMSIM_DATA``, the ``shared/data``
    folder beside the checkout, then ``~/.cache/pimsim``.
    """
    candidates = []
    if explicit is not None:
        candidates.append(("--data-dir / data.dir", Path(explicit).expanduser()))
    env = os.environ.get("PIMSIM_DATA")
    if env:
        candidates.append(("$PIMSIM_DATA", Path(env).expanduser()))
    candidates.append(("shared/data beside the checkout", Path(__file__).resolve().parents[2] / "shared" / "data"))
    candidates.append(("user cache", Path.home() / ".cache" / "pimsim"))
    return candidates


def _how_to_get_data(what: str = "cifar10") -> str:
    extra = "" if what == "cifar10" else f" --what {what}"
    return (f"Get the data with `pimsim fetch{extra} --dest ~/.cache/pimsim`, or set PIMSIM_DATA "
            f"to a folder holding it.")


def find_data_dir(explicit: str | os.PathLike | None = None, folder: str = CIFAR_FOLDER) -> Path:
    """Return the first candidate folder that contains ``folder`` (default
    ``cifar-10-batches-py/``; ``cifar-100-python/`` for CIFAR-100).

    An ``explicit`` folder without ``folder/`` is an error at once (no fall-through).
    Raises DataNotFoundError listing every place looked at when nothing is found.
    """
    candidates = candidate_data_dirs(explicit)
    what = "cifar100" if folder == CIFAR100_FOLDER else "cifar10"
    if explicit is not None:
        label, path = candidates[0]
        if not (path / folder).is_dir():
            raise DataNotFoundError(
                f"{path} ({label}) does not contain {folder}/; pass the folder that holds it. "
                + _how_to_get_data(what)
            )
        return path
    for _, path in candidates:
        if (path / folder).is_dir():
            return path
    looked = "\n".join(f"  - {path} ({label})" for label, path in candidates)
    name = "CIFAR-100" if folder == CIFAR100_FOLDER else "CIFAR-10"
    raise DataNotFoundError(f"{name} ({folder}/) not found. Looked in:\n{looked}\n"
                            + _how_to_get_data(what))


# --------------------------------------------------------------------------- loading


# The only globals a CIFAR-10 batch pickle needs: numpy array and scalar reconstruction (numpy
# 1.x names its module numpy.core, 2.x numpy._core), and _codecs.encode, with which protocol-2
# pickles written by Python 3 store bytes. Nothing here can run code of the file's choosing.
_SAFE_GLOBALS = frozenset(
    [(f"numpy.{core}.multiarray", name) for core in ("core", "_core")
     for name in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
)


class _BatchUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that builds numpy arrays, lists, dicts and strings only: any other
    global (a function or class the file names) is refused before it is imported."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise DataError(f"{self._path}: refusing to unpickle {module}.{name}: a CIFAR-10 batch "
                            f"holds only numpy arrays, lists and dicts; pimsim does not run code "
                            f"from data files")
        return super().find_class(module, name)


def _refetch_hint(path: Path) -> str:
    what = "cifar100" if path.parent.name == CIFAR100_FOLDER else "cifar10"
    return (f"delete it and re-fetch it (pimsim fetch --what {what} --dest {path.parent.parent}), "
            f"or copy it again from where it came from")


def _unpickle(path: Path) -> dict:
    """Unpickle a CIFAR batch file (str or bytes keys) into a dict with ``_BatchUnpickler``;
    DataError naming the file if it is not one (refused globals, corrupt or truncated data)."""
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, path).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError,
            ValueError, TypeError, MemoryError, OverflowError) as e:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise DataError(f"{path}: not a readable CIFAR-10 batch, corrupt or truncated ({reason}); "
                        + _refetch_hint(path)) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}; "
                        + _refetch_hint(path))
    return obj


def _get(d: dict, key: str, path: Path):
    """Return ``d[key]`` or ``d[key.encode()]``; ValueError naming the file and key if absent."""
    if key in d:
        return d[key]
    if key.encode() in d:
        return d[key.encode()]
    raise DataError(f"{path}: missing key {key!r} (keys: {sorted(str(k) for k in d)}); "
                    + _refetch_hint(path))


def load_batch(path: str | os.PathLike, labels_key: str = "labels",
               num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Load one CIFAR batch file: images uint8 [N, 3, 32, 32] and labels int64 [N].

    CIFAR-10 (the defaults): labels under ``labels``, 0..9; CIFAR-100: ``labels_key=
    "fine_labels"``, ``num_classes=100``."""
    path = Path(path)
    d = _unpickle(path)
    data = np.asarray(_get(d, "data", path))
    try:
        labels = np.asarray(_get(d, labels_key, path), dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: {labels_key!r} must be a list of integers ({e}); "
                        + _refetch_hint(path)) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be uint8 N x 3072, got {data.dtype} {data.shape}; "
                        + _refetch_hint(path))
    if labels.ndim != 1 or labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.size} labels for {data.shape[0]} images; "
                        + _refetch_hint(path))
    if labels.size and (labels.min() < 0 or labels.max() > num_classes - 1):
        raise DataError(f"{path}: labels must be 0..{num_classes - 1}, found "
                        f"{labels.min()}..{labels.max()}; "
                        + _refetch_hint(path))
    return data.reshape(-1, 3, 32, 32), labels


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only view of a read-only private copy of ``a``: the view's WRITEABLE flag cannot
    be set again (its base is not writeable), so no caller can change the cached data."""
    own = np.array(a, copy=True)
    own.setflags(write=False)
    view = own.view()
    view.setflags(write=False)
    return view


@functools.lru_cache(maxsize=CACHE_BATCHES)
def _load_frozen(path: Path, mtime_ns: int, size: int, labels_key: str = "labels",
                 num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``load_batch(path)`` as read-only arrays; cached per (file, modification time, size), so
    a file written again (``pimsim fetch``) is read again."""
    images, labels = load_batch(path, labels_key, num_classes)
    return _frozen(images), _frozen(labels)


def _cached_batch(path: Path, labels_key: str = "labels",
                  num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Load a batch file once while it is among the last ``CACHE_BATCHES`` files read and
    unchanged; later calls return the same read-only arrays."""
    key = path.resolve()
    st = key.stat()
    if labels_key == "labels" and num_classes == 10:      # CIFAR-10: the cache key of before
        return _load_frozen(key, st.st_mtime_ns, st.st_size)
    return _load_frozen(key, st.st_mtime_ns, st.st_size, labels_key, num_classes)


def load_cifar10(
    split: str = "test", data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load a CIFAR-10 split as (images uint8 [N, 3, 32, 32], labels int64 [N]).

    ``split="test"`` reads ``test_batch``; ``split="train"`` reads every ``data_batch_*`` present,
    in sorted order. ``limit`` keeps the first ``limit`` images. Arrays are cached and read-only:
    copy them before modifying.
    """
    folder = find_data_dir(data_dir) / CIFAR_FOLDER
    if split == "test":
        files = [folder / "test_batch"]
    elif split == "train":
        files = sorted(folder.glob("data_batch_*"))
    else:
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        raise DataNotFoundError(f"no {split} batch files in {folder} (missing: {[f.name for f in missing]})")
    batches = [_cached_batch(f) for f in files]
    if len(batches) == 1:
        images, labels = batches[0]
    else:
        images = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        images.setflags(write=False)
        labels.setflags(write=False)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def label_names(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Return the ten class names from ``batches.meta``."""
    path = find_data_dir(data_dir) / CIFAR_FOLDER / "batches.meta"
    names = _get(_unpickle(path), "label_names", path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def to_tensor(images: np.ndarray, mean=MEAN, std=STD) -> torch.Tensor:
    """Convert uint8 images [N, C, H, W] to normalized float32: ``(x / 255 - mean) / std``
    (default: the CIFAR-10 constants ``MEAN`` / ``STD``; one value per channel)."""
    x = torch.tensor(np.asarray(images), dtype=torch.float32) / 255
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


# CIFAR-100 training-set statistics (per channel, of x / 255), the values CIFAR-100 models are
# usually trained with
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR100_SPLITS = {"test": "test", "train": "train"}


def load_cifar100(split: str = "test", data_dir: str | os.PathLike | None = None,
                  limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a CIFAR-100 split (``cifar-100-python/test`` or ``train``, the fine labels) as
    (images uint8 [N, 3, 32, 32], labels int64 [N] in 0..99); cached and read-only."""
    if split not in CIFAR100_SPLITS:
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    path = find_data_dir(data_dir, CIFAR100_FOLDER) / CIFAR100_FOLDER / CIFAR100_SPLITS[split]
    if not path.is_file():
        raise DataNotFoundError(f"CIFAR-100 {split} file {path} not found; get it with pimsim "
                                f"fetch --what cifar100 --dest {path.parent.parent}")
    images, labels = _cached_batch(path, "fine_labels", 100)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def cifar100_label_names(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The hundred fine class names from ``cifar-100-python/meta``."""
    path = find_data_dir(data_dir, CIFAR100_FOLDER) / CIFAR100_FOLDER / "meta"
    names = _get(_unpickle(path), "fine_label_names", path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


CALIBRATION_BATCH = "data_batch_1"


def calibration_pool(data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The images calibration draws from: ``data_batch_1`` (cached, read-only arrays)."""
    path = find_data_dir(data_dir) / CIFAR_FOLDER / CALIBRATION_BATCH
    if not path.is_file():
        raise DataNotFoundError(f"calibration batch {path} not found; get it with pimsim fetch "
                                f"--what cifar10 --dest {path.parent.parent}")
    return _cached_batch(path)


def calibration_set(
    n: int, seed: int, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` images of ``data_batch_1`` without replacement with
    ``numpy.random.default_rng(seed)``.

    Only ``data_batch_1`` is read, whatever other ``data_batch_*`` files are present, so a seed
    draws the same images from the shared copy (one training batch) and after ``pimsim fetch``
    (five). Returns (images uint8 [n, 3, 32, 32], labels int64 [n]) in draw order.
    """
    path = find_data_dir(data_dir) / CIFAR_FOLDER / CALIBRATION_BATCH
    images, labels = calibration_pool(data_dir)
    if not 0 < n <= len(images):
        raise DataError(f"{path}: holds {len(images)} images; the calibration set size "
                        f"(quant.calib_images) must be in 1..{len(images)}, got {n}")
    idx = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    return images[idx], labels[idx]


# --------------------------------------------------------------------------- downloading


def md5sum(path: str | os.PathLike) -> str:
    """Return the hex MD5 digest of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_md5(path: Path, expected: str) -> None:
    """Raise DataError naming the file, expected and actual digest if they differ."""
    got = md5sum(path)
    if got != expected:
        raise DataError(f"md5 mismatch for {path}: expected {expected}, got {got}")


def download(url: str, dest_file: str | os.PathLike, md5: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``dest_file`` via a ``.part`` file, with a progress bar; check ``md5`` if given.

    Raises FetchError (a RuntimeError naming the URL and what to do) if the transfer fails and
    DataError (a ValueError) on an md5 mismatch; nothing is left at ``dest_file`` in either case.
    """
    dest_file = Path(dest_file)
    dest_file.parent.mkdir(parents=True, exist_ok=True)
    part = dest_file.with_name(dest_file.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest_file.name, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:   # HTTPError, timeouts, no network, disk full
        part.unlink(missing_ok=True)
        if isinstance(e, urllib.error.HTTPError):
            what = f"the server answered HTTP {e.code} {e.reason}"
        elif isinstance(e, urllib.error.URLError):
            what = f"{e.reason}; check the internet connection (and a proxy, $https_proxy)"
        else:
            what = str(e.strerror or e)
        raise FetchError(f"download of {url} failed ({what}); run pimsim fetch again, or download "
                         f"that URL by hand to {dest_file}") from None
    if md5 is not None:
        try:
            _check_md5(part, md5)
        except ValueError as e:
            part.unlink()
            raise DataError(f"downloaded {url}: {e}; the transfer was corrupted, run pimsim fetch "
                            f"again") from None
    part.replace(dest_file)
    return dest_file


def extract_cifar_archive(
    tar_path: str | os.PathLike, dest_dir: str | os.PathLike, md5: str | None = None,
    folder: str = CIFAR_FOLDER,
) -> Path:
    """Extract a CIFAR python archive into ``dest_dir`` and return ``dest_dir/folder``
    (``cifar-10-batches-py``, or ``cifar-100-python`` for CIFAR-100).

    Checks ``md5`` first if given. Refuses (DataError, a ValueError) members with absolute paths or ``..``
    components and anything that is not a regular file or folder, and archives without a
    ``folder/`` folder.
    """
    tar_path, dest_dir = Path(tar_path), Path(dest_dir)
    if md5 is not None:
        _check_md5(tar_path, md5)
    with tarfile.open(tar_path, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            name = PurePosixPath(m.name)
            if name.is_absolute() or ".." in name.parts:
                raise DataError(f"{tar_path}: refusing unsafe member path {m.name!r}")
            if not (m.isfile() or m.isdir()):
                raise DataError(f"{tar_path}: refusing member {m.name!r} (not a regular file or folder)")
        if not any(PurePosixPath(m.name).parts[:1] == (folder,) for m in members):
            raise DataError(f"{tar_path}: archive does not contain {folder}/")
        dest_dir.mkdir(parents=True, exist_ok=True)
        tar.extractall(dest_dir, members=members, filter="data")
    return dest_dir / folder


FETCH_ITEMS = ("cifar10", "cifar100", "models")


def fetch(dest: str | os.PathLike, what=("cifar10", "models"), progress: bool = True) -> dict[str, Path]:
    """Download CIFAR-10 (and, asked for, CIFAR-100) into ``dest`` and the published checkpoints
    into ``dest/models``.

    ``what`` selects ``"cifar10"``, ``"cifar100"`` and/or ``"models"``. Skips a CIFAR archive
    already present with the right md5 (and the extraction if all batch files are there) and
    checkpoints already present. Returns the folder of each item fetched.
    """
    dest = Path(dest).expanduser()
    unknown = set(what) - set(FETCH_ITEMS)
    if unknown:
        raise ValueError(f"unknown fetch item(s) {sorted(unknown)}; choose from "
                         f"{', '.join(repr(w) for w in FETCH_ITEMS)}")
    fetched = {}
    if "cifar10" in what:
        folder = dest / CIFAR_FOLDER
        expected = ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
        if not all((folder / f).is_file() for f in expected):
            archive = dest / "cifar-10-python.tar.gz"
            if not (archive.is_file() and md5sum(archive) == CIFAR10_MD5):
                download(CIFAR10_URL, archive, md5=CIFAR10_MD5, progress=progress)
            extract_cifar_archive(archive, dest)
        fetched["cifar10"] = folder
    if "cifar100" in what:
        folder = dest / CIFAR100_FOLDER
        if not all((folder / f).is_file() for f in ("meta", "train", "test")):
            archive = dest / "cifar-100-python.tar.gz"
            if not (archive.is_file() and md5sum(archive) == CIFAR100_MD5):
                download(CIFAR100_URL, archive, md5=CIFAR100_MD5, progress=progress)
            extract_cifar_archive(archive, dest, folder=CIFAR100_FOLDER)
        fetched["cifar100"] = folder
    if "models" in what:
        models_dir = dest / "models"
        for name, url in CHECKPOINT_URLS.items():
            if not (models_dir / name).is_file():
                download(url, models_dir / name, progress=progress)
        fetched["models"] = models_dir
    return fetched


def candidate_paths(value, source: str, cwd_first: bool = False, extra=()) -> list[Path]:
    """Where a path given in a config is looked for, in order: itself when absolute; else
    beside the YAML file ``source`` (unless the config came from no file), the working
    directory (first instead with ``cwd_first``: a path typed on the command line), then each
    folder of ``extra``."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return [p]
    beside = ([Path(source).resolve().parent / p]
              if source not in ("<config>", "<defaults>") else [])
    cwd = [Path.cwd() / p]
    return (cwd + beside if cwd_first else beside + cwd) + [Path(d) / p for d in extra]
