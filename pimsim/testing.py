"""Helpers shared by the test suite (like ``numpy.testing``): skip cleanly where the real data
are absent, and restore the process-wide thread counts that ``pimsim run`` changes."""

from __future__ import annotations

import contextlib
from pathlib import Path

CHECKPOINT = "resnet20-cifar10jpg.th"


def data_dir_or_skip(checkpoint: str = CHECKPOINT) -> Path:
    """The CIFAR-10 data folder, or ``pytest.skip`` with the reason (data or checkpoint missing)."""
    import pytest

    from .data import DataNotFoundError, find_data_dir
    try:
        d = find_data_dir()
    except DataNotFoundError as e:
        pytest.skip(f"CIFAR-10 data not found: {str(e).splitlines()[0]}")
    if not (d / "models" / checkpoint).is_file():
        pytest.skip(f"checkpoint {d / 'models' / checkpoint} missing")
    return d


@contextlib.contextmanager
def restored_threads():
    """Run a block, then put torch's and Numba's thread counts back as they were."""
    import numba
    import torch
    t_torch, t_numba = torch.get_num_threads(), numba.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(t_torch)
        numba.set_num_threads(t_numba)
