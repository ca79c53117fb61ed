"""`gpt2deploy` command line: thin commands that parse, call the library and print."""
from __future__ import annotations

from .app import app
from . import export  # noqa: F401  (registers commands)
from . import build, package  # noqa: F401
from . import bench  # noqa: F401
from . import check  # noqa: F401
from . import quantize  # noqa: F401
from . import run  # noqa: F401


def main() -> None:
    app()


__all__ = ["app", "main"]
