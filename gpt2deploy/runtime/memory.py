"""Keep a CPU session's resident memory to what it uses: mapped weights read sparsely, a trimmed heap.

ONNX Runtime memory-maps the page-aligned external weights of a variant (see ``quant.mapped``). Weights
it prepacks are read once and unmapped; what stays mapped is read as-is, the tied embedding table
above all, of which a generation touches a few rows. Two things would still make those mappings
resident in full: the pages the load and the integrity check left in the page cache (the kernel maps
cached neighbours of every touched page, "fault-around") and read-ahead on each fault. So, once the
session exists, its large mappings of the data files (``SPARSE_MIN`` and up: the tables read a few rows
at a time) are advised as random access and their cached pages are dropped. A lookup then faults in the
page it reads and nothing else. Small mappings (scales, biases, norms), which every step reads whole, keep
their cached pages: dropping those too made the first step after loading read them back from disk one
page at a time (a slower first step).
Resident memory is measured honestly either way: this changes what the process holds, not how it is
counted. Linux only; a no-op elsewhere.

``trim_heap`` hands the heap's free memory back to the system (glibc) after the load's transients.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from pathlib import Path


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


#: Mappings at least this large are read sparsely (embedding tables) and advised; smaller ones are left alone.
SPARSE_MIN = 1 << 20


def _mappings(files: set[str]) -> list[tuple[int, int, int, str]]:
    """``(start, end, file offset, path)`` of this process's mappings of ``files`` (from /proc/self/maps)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].rstrip("\n") in files:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    out.append((start, end, int(parts[2], 16), parts[5].rstrip("\n")))
    except OSError:
        return []
    return out


def advise_mapped_weights(files) -> dict:
    """Random-access advice on the mappings of ``files`` and drop their unmapped cached pages.

    Returns ``{"mappings": n, "mapped_bytes": bytes, "files": [...]}``; ``mappings`` is 0 when the runtime did
    not map the files (weights inside the graph file, another OS) and nothing was changed.
    """
    paths = {str(Path(p).resolve()) for p in files if Path(p).is_file()}
    report = {"mappings": 0, "mapped_bytes": 0, "files": sorted(paths)}
    if not paths or not sys.platform.startswith("linux") or not hasattr(os, "posix_fadvise"):
        return report
    maps = _mappings(paths)
    libc = _libc()
    if not maps or libc is None:
        return report
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    report["sparse_mappings"], report["sparse_bytes"] = 0, 0
    for start, end, offset, path in maps:
        report["mappings"] += 1
        report["mapped_bytes"] += end - start
        if end - start < SPARSE_MIN or libc.madvise(start, end - start, mmap.MADV_RANDOM) != 0:
            continue
        report["sparse_mappings"] += 1
        report["sparse_bytes"] += end - start
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, offset, end - start, os.POSIX_FADV_DONTNEED)  # pages some mapping holds are kept
        finally:
            os.close(fd)
    return report


def trim_heap() -> bool:
    """Return the heap's free memory to the system (glibc ``malloc_trim``); False where unavailable."""
    libc = _libc() if sys.platform.startswith("linux") else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
