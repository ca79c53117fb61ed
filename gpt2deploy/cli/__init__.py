"""`gpt2deploy` command line: thin commands that parse, call the library and print."""

from __future__ import annotations

from . import (  # noqa: F401
    adopt,  # noqa: F401
    bench,  # noqa: F401
    build,
    check,  # noqa: F401
    export,  # noqa: F401  (registers commands)
    package,
    quantize,  # noqa: F401
    run,  # noqa: F401
    serve,  # noqa: F401
)
from .app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
