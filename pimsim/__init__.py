"""pimsim: a processing-in-memory crossbar simulator built around PTQ-SL.

Sub-layerwise post-training quantization (PTQ-SL): a layer's im2col weight matrix is cut
into r x c sub-matrices, each on one crossbar tile with its own scaling factor.
"""

__version__ = "0.1.0"

# One threading policy for the process, chosen here, before any Numba kernel runs: Numba's
# ``omp`` layer (its default on this stack when TBB is absent; pinned so that installing TBB
# does not silently change it) unless NUMBA_THREADING_LAYER is set. Pool sizes: torch's and
# Numba's both follow pimsim.kernels.set_threads / threads (``eval.threads``); the two pools
# never run at the same time (a layer's partial sums, then its rescale). benchmarks/
# bench_threads.py measures torch's speed before / after each backend for each layer.
import os as _os
import sys as _sys

THREADING_LAYER = _os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
if "numba" in _sys.modules:          # numba imported first: its config already read the env
    _sys.modules["numba"].config.THREADING_LAYER = THREADING_LAYER
del _os, _sys
