"""Peak resident memory of this process (and GPU memory on CUDA when NVML is available).

Peak RSS comes from Linux's ``VmHWM``, which can be reset between variants (``/proc/self/clear_refs``), so
each variant gets its own peak. Where that is unavailable a psutil sampling thread records the peak, and
without psutil ``resource.getrusage`` gives the whole-process peak (``method`` says which was used).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MB = 1024 * 1024


def current_rss() -> int:
    """Resident set size of this process in bytes (0 when it cannot be read)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    value = _status_field("VmRSS")
    return value if value is not None else 0


def _status_field(name: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return _status_field("VmHWM") is not None
    except OSError:
        return False


class PeakRss:
    """Track the peak RSS over a span: ``with PeakRss() as p: ...; p.peak``.

    Usable without ``with`` too: ``p = PeakRss().start()``, then ``p.stop()`` returns the peak in bytes.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.method = ""
        self.start_rss = 0
        self.peak = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> PeakRss:
        self.start_rss = current_rss()
        if _reset_hwm():
            self.method = "VmHWM"
        else:
            try:
                import psutil  # noqa: F401

                self.method = "psutil-sampling"
                self.peak = self.start_rss
                self._stop.clear()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
            except ImportError:
                self.method = "getrusage"
        return self

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, proc.memory_info().rss)

    def read(self) -> int:
        """The peak so far in bytes."""
        if self.method == "VmHWM":
            return max(_status_field("VmHWM") or 0, self.start_rss)
        if self.method == "psutil-sampling":
            return max(self.peak, current_rss())
        import resource

        # ru_maxrss is in KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if os.uname().sysname == "Darwin" else peak * 1024)

    def stop(self) -> int:
        self.peak = self.read()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.peak

    def __enter__(self) -> PeakRss:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so the next peak starts clean."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def gpu_memory(device: str) -> dict | None:
    """GPU memory used by this process on CUDA, via NVML (``pip install nvidia-ml-py``).

    Returns None on CPU, ``{"used_mb": ...}`` when measured, or ``{"skipped": reason}`` when it cannot be.
    """
    if device != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return {"skipped": "NVML bindings not installed (pip install nvidia-ml-py)"}
    try:
        pynvml.nvmlInit()
        try:
            index = int((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0])
        except ValueError:
            index = 0
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pid = os.getpid()
            used = None
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    used = int(proc.usedGpuMemory)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle)
            result = {
                "device_used_mb": round(int(total.used) / MB, 1),
                "device_total_mb": round(int(total.total) / MB, 1),
            }
            if used is not None:
                result["used_mb"] = round(used / MB, 1)
            return result
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # NVML raises its own error classes; any failure just skips the number
        return {"skipped": f"NVML query failed: {e}"}
