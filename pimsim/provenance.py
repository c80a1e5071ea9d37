"""Where a result came from: the code's git commit, the command, the seeds, threads and date.

Every results file pimsim's benchmarks and sweeps write carries these fields (JSON: a
``"provenance"`` object; CSV: one column each per row, since a resumed file can hold rows of
several runs; markdown: a footer line), so a number in README can be traced to the code and the
command that produced it.

``provenance(seeds=..., threads=...)`` returns the dict; ``PROVENANCE_FIELDS`` names the fields
every record must hold (a test checks the committed results against it).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from . import __version__

#: Fields every results record carries (CSV columns, JSON ``provenance`` keys).
PROVENANCE_FIELDS = ("commit", "command", "seeds", "threads", "date")
#: The CSV columns added to every benchmark row (``seeds`` is the row's own ``seed`` column).
CSV_FIELDS = ("seed", "commit", "threads", "date", "command")

_SRC = Path(__file__).resolve().parent


def git_commit(where: Path = _SRC) -> str:
    """``git rev-parse HEAD`` of the checkout holding ``where``, with ``+dirty`` when tracked
    code files (not ``benchmarks/results/``, markdown or notebooks) differ from it; ``unknown (not a git checkout)`` for an installed copy."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=where, capture_output=True, text=True, timeout=20)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        top = git("rev-parse", "--show-toplevel").stdout.strip() or str(where)
        # results files are outputs and markdown / notebooks are prose, not code: editing them
        # leaves the code that produces a result clean
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results", ":(exclude)*.md",
                                ":(exclude)*.ipynb"], cwd=top, capture_output=True,
                               text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as one shell-quoted line (``python benchmarks/x.py ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        try:
            argv[0] = os.path.relpath(argv[0])
        except ValueError:
            pass
        argv = ["python"] + argv
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def provenance(seeds=None, threads: int | None = None, command: str | None = None) -> dict:
    """The provenance record of a result produced now by this process."""
    import numba
    import numpy
    import torch
    return {
        "commit": git_commit(),
        "command": command if command is not None else command_line(),
        "seeds": seeds if seeds is not None else [],
        "threads": threads if threads is not None else torch.get_num_threads(),
        "date": now(),
        "pimsim": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "cpus": os.cpu_count(),
    }


def footer(prov: dict) -> str:
    """A markdown line naming a result's provenance."""
    seeds = prov.get("seeds")
    seeds = ", ".join(map(str, seeds)) if isinstance(seeds, (list, tuple)) else seeds
    return (f"Produced by `{prov['command']}` at commit `{prov['commit']}` on {prov['date']} "
            f"(seeds: {seeds if seeds not in ('', None) else 'none'}; threads: {prov['threads']}).")
