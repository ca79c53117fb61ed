"""ONNX Runtime helpers shared by the passes: quiet logging, one-line failures, CPU sessions."""

from __future__ import annotations

import contextlib
import io
import logging

from .errors import QuantError

#: Loggers ORT's quantizers and transformer optimizer write to (the root logger included).
ORT_LOGGERS = ("", "onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer")


@contextlib.contextmanager
def quiet_ort_logging(loggers=ORT_LOGGERS, level: int = logging.CRITICAL, capture_output: bool = False):
    """ORT's Python tools log through the root logger and their own (and some print); the caller owns the output.

    ``capture_output`` also swallows what they print to stdout/stderr.
    """
    found = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in found]
    for lg in found:
        lg.setLevel(level)
    try:
        if capture_output:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                yield
        else:
            yield
    finally:
        for lg, old in zip(found, levels, strict=True):
            lg.setLevel(old)


def failure(what: str, e: BaseException, fix: str) -> QuantError:
    """A one-line error for an exception raised inside ONNX Runtime or onnx: ``what failed (reason); fix``."""
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return QuantError(f"{what} ({type(e).__name__}: {reason}); {fix}")


def session(model_path, providers=("CPUExecutionProvider",)):
    """An InferenceSession that logs errors only."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_path), opts, providers=list(providers))
