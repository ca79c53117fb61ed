"""ONNX -> ONNX passes: graph optimization/fusion, INT8, INT4 (MatMulNBits), FP16.

Takes and returns graphs plus plain metadata; knows nothing of packages, manifests, exporters or the CLI.
"""

from .errors import QuantError

__all__ = ["QuantError"]
