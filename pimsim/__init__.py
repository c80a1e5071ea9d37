"""pimsim: a processing-in-memory crossbar simulator built around PTQ-SL.

Sub-layerwise post-training quantization (PTQ-SL): a layer's im2col weight matrix is cut
into r x c sub-matrices, each on one crossbar tile with its own scaling factor.
"""

__version__ = "0.1.0"
