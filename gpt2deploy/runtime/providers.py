"""Execution device -> ONNX Runtime providers."""

from __future__ import annotations

from ..errors import DeviceError, UsageError

DEVICES = ("auto", "cpu", "cuda")
CUDA_HELP = (
    "install onnxruntime-gpu (pip uninstall onnxruntime && pip install onnxruntime-gpu) with a matching CUDA/cuDNN, "
    "or pass --device cpu"
)


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when onnxruntime's CUDA provider is present, else 'cpu'."""
    if device not in DEVICES:
        raise UsageError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise DeviceError(f"the CUDA execution provider is not available in this onnxruntime; {CUDA_HELP}")
    return device


def providers_for(device: str, device_id: int = 0) -> list:
    if device == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
