"""No hidden global state in the library (issue 13, item 7).

- ``pimsim.kernels.threads(n)`` sets torch's and Numba's thread counts for a block and puts the
  previous counts back, also on an exception.
- ``simulate.run`` runs with ``eval.threads`` threads (seen from inside the run) and leaves the
  caller's counts as they were, also when it fails; its result reports the count used. So does
  ``sweep.run_point``; ``pimsim run`` (the top level) sets the process's count on purpose.
- The CIFAR batch cache holds at most ``data.CACHE_BATCHES`` files, reads a rewritten file
  again, and hands out arrays no caller can write into.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
import yaml

from fakedata import make_fetch_layout, write_batch
from pimsim import data, simulate, sweep
from pimsim.cli import main
from pimsim.config import ConfigError, validate
from pimsim.kernels import threads
from pimsim.testing import restored_threads

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "hwconfigs" / "default.yaml"
NUMBA_MAX = numba.config.NUMBA_NUM_THREADS


@pytest.fixture(autouse=True)
def _restore_threads():
    with restored_threads():
        yield


def _counts() -> tuple[int, int]:
    return torch.get_num_threads(), numba.get_num_threads()


def _start_with_two():
    """The caller's state of the tests: 2 torch threads, Numba at 2 (or its maximum)."""
    torch.set_num_threads(2)
    numba.set_num_threads(min(2, NUMBA_MAX))
    return _counts()


# --------------------------------------------------------------------------- threads()

def test_threads_sets_and_restores_both_counts():
    before = _start_with_two()
    with threads(1) as used:
        assert used == 1 and _counts() == (1, 1)
    assert _counts() == before


def test_threads_zero_is_all_cores():
    before = _start_with_two()
    with threads(0) as used:
        assert used == (os.cpu_count() or 1)
        assert _counts() == (used, min(used, NUMBA_MAX))
    assert _counts() == before


def test_threads_restores_on_an_exception_and_nests():
    before = _start_with_two()
    with pytest.raises(RuntimeError, match="boom"):
        with threads(1):
            with threads(3) as used:
                assert used == 3 and torch.get_num_threads() == 3
            assert _counts() == (1, 1)
            raise RuntimeError("boom")
    assert _counts() == before


# --------------------------------------------------------------------------- run() and friends

QUICK = {"quant": {"calibration": "max", "calib_images": 16, "tile": [16, 16]},
         "eval": {"backend": "kernel", "threads": 1, "batch_size": 10}}


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return make_fetch_layout(tmp_path_factory.mktemp("fake") / "d")


def test_run_keeps_the_callers_thread_counts(fake_root, monkeypatch):
    before = _start_with_two()
    seen = []
    evaluate = simulate.evaluate_dataset

    def counting(*a, **k):                    # the counts while the run evaluates
        seen.append(_counts())
        return evaluate(*a, **k)
    monkeypatch.setattr(simulate, "evaluate_dataset", counting)
    res = simulate.run(validate(QUICK), data_dir=fake_root, progress=False)
    assert _counts() == before                # the caller's counts are back
    assert res["threads"] == 1 and res["config"]["eval"]["threads"] == 1
    assert res["provenance"]["threads"] == 1
    assert seen and all(s == (1, 1) for s in seen)   # float and quantized evaluation: 1 thread


def test_run_restores_the_counts_when_it_fails(tmp_path):
    before = _start_with_two()
    with pytest.raises(ConfigError, match="checkpoint"):
        simulate.run(validate({**QUICK, "model": {"checkpoint": str(tmp_path / "none.th")}}),
                     data_dir=make_fetch_layout(tmp_path / "d"), progress=False)
    assert _counts() == before


def test_run_point_keeps_the_callers_thread_counts(fake_root):
    before = _start_with_two()
    row = sweep.run_point(QUICK, "<test>", {"quant.weight_bits": 3}, data_dir=fake_root)
    assert _counts() == before
    assert row["wbits"] == 3 and row["images"] == 30


def test_a_sweep_worker_process_runs_with_one_thread():
    _start_with_two()
    sweep.worker_init()                       # the worker's top level: process-wide on purpose
    assert _counts() == (1, 1)


def test_pimsim_run_sets_the_process_count(fake_root, tmp_path, capsys):
    """The CLI is the top level: its eval.threads stays set in the process."""
    _start_with_two()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(QUICK))
    assert main(["run", str(cfg), "--data-dir", str(fake_root), "-q"]) == 0, \
        capsys.readouterr().err
    assert _counts() == (1, 1)


# --------------------------------------------------------------------------- the data cache

def _root(tmp_path: Path, name: str, seed: int, n: int = 6) -> tuple[Path, np.ndarray]:
    folder = tmp_path / name / data.CIFAR_FOLDER
    folder.mkdir(parents=True)
    flat, _ = write_batch(folder / "test_batch", n, seed)
    return tmp_path / name, flat.reshape(-1, 3, 32, 32)


def test_cache_is_bounded(tmp_path):
    assert data.CACHE_BATCHES == 2
    roots = [_root(tmp_path, f"r{i}", seed=i)[0] for i in range(3)]
    first = [data.load_cifar10("test", r)[0] for r in roots]       # r0 is dropped by r2
    assert data.load_cifar10("test", roots[2])[0] is first[2]
    assert data.load_cifar10("test", roots[1])[0] is first[1]
    again = data.load_cifar10("test", roots[0])[0]                 # read again: a new object
    assert again is not first[0]
    np.testing.assert_array_equal(again, first[0])


def test_cache_reads_a_rewritten_file_again(tmp_path):
    root, want = _root(tmp_path, "r", seed=1)
    a, _ = data.load_cifar10("test", root)
    np.testing.assert_array_equal(a, want)
    path = root / data.CIFAR_FOLDER / "test_batch"
    new, _ = write_batch(path, 6, seed=2)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime, surely
    b, _ = data.load_cifar10("test", root)
    np.testing.assert_array_equal(b, new.reshape(-1, 3, 32, 32))
    assert not np.array_equal(a, b)


def test_cached_arrays_cannot_be_written(tmp_path):
    root, want = _root(tmp_path, "r", seed=3)
    images, labels = data.load_cifar10("test", root)
    for arr in (images, labels, data.load_cifar10("test", root, limit=2)[0]):
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr.setflags(write=True)          # the flag cannot be turned back on
        with pytest.raises(ValueError):
            arr[0] = 0
    with pytest.raises(ValueError):
        np.copyto(images, 0)
    again, _ = data.load_cifar10("test", root)
    np.testing.assert_array_equal(again, want)                      # the file's values


def test_train_split_and_calibration_set_are_the_callers_own(tmp_path):
    folder = tmp_path / "r" / data.CIFAR_FOLDER
    folder.mkdir(parents=True)
    flats = [write_batch(folder / f"data_batch_{i}", 5, seed=20 + i)[0] for i in (1, 2)]
    train, _ = data.load_cifar10("train", tmp_path / "r")
    train.setflags(write=True)                # a fresh concatenation: the caller's to change
    train[:] = 0
    cal, _ = data.calibration_set(5, 0, tmp_path / "r")
    cal[:] = 0                                # a drawn copy
    train2, _ = data.load_cifar10("train", tmp_path / "r")
    np.testing.assert_array_equal(train2, np.concatenate(flats).reshape(-1, 3, 32, 32))
    with open(folder / "data_batch_1", "rb") as f:           # a file this test wrote
        raw = pickle.load(f, encoding="bytes")
    idx = np.random.default_rng(0).choice(5, size=5, replace=False)
    np.testing.assert_array_equal(data.calibration_set(5, 0, tmp_path / "r")[0],
                                  raw[b"data"].reshape(-1, 3, 32, 32)[idx])
