"""Benchmarks of a package's variants: TTFT, decode and end-to-end tok/s, peak memory, long-context curve.

Everything here measures the runtime's own generation loop (``model.generate_ids``), the loop users run.
"""

from __future__ import annotations

from .runner import bench_package
from .workload import BenchConfig

__all__ = ["BenchConfig", "bench_package"]
