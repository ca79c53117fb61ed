"""PyTorch checkpoint -> ONNX graph with past/present KV tensors, plus parity validation.

Knows nothing of packages, manifests or the CLI: it takes a checkpoint and returns graphs and plain metadata.
"""

from .checkpoint import Checkpoint, load_model, locate
from .errors import CheckpointError, ExportError, ParityError
from .onnx_export import DEFAULT_OPSET, MIN_OPSET, check_opset, export_onnx, model_dims
from .parity import validate

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DEFAULT_OPSET",
    "ExportError",
    "MIN_OPSET",
    "ParityError",
    "check_opset",
    "export_onnx",
    "load_model",
    "locate",
    "model_dims",
    "validate",
]
