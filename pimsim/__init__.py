"""pimsim: a processing-in-memory crossbar simulator built around PTQ-SL.

Sub-layerwise post-training quantization (PTQ-SL): a layer's im2col weight matrix is cut
into r x c sub-matrices, each on one crossbar tile with its own scaling factor.
"""

__version__ = "0.1.0"

# One threading policy for the process, chosen here before any Numba kernel runs: Numba's
# ``workqueue`` layer (plain pthreads that block when idle) unless NUMBA_THREADING_LAYER is set.
# torch ships its own libgomp; Numba's ``omp`` layer links the system one, so the two OpenMP
# runtimes each keep a pool of spinning threads and slow each other down (issue #16).
# Pool sizes: both follow pimsim.kernels.set_threads / threads (eval.threads).
import os as _os
import sys as _sys

THREADING_LAYER = _os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
if "numba" in _sys.modules:          # numba imported first: its config already read the env
    _sys.modules["numba"].config.THREADING_LAYER = THREADING_LAYER
del _os, _sys
