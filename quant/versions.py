"""Version strings as comparable tuples (no onnx import: the runtime's compatibility checks use it too)."""

from __future__ import annotations

import re


def version_tuple(v) -> tuple[int, ...]:
    """'1.31.1' -> (1, 31, 1); suffixes ('.dev', '+cu12') are dropped."""
    out = []
    for part in str(v).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(out)
