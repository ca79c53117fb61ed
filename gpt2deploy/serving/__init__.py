"""``gpt2deploy serve``: an OpenAI-compatible HTTP server with continuous batching (the ``serve`` extra).

``create_app(engine_or_model, ...)`` builds the ASGI app; ``Engine`` runs one decode loop over one model;
``run_server`` serves an app with uvicorn and shuts down gracefully on SIGTERM/SIGINT. The web stack
(starlette, uvicorn) is imported only here, never by the runtime.
"""

from __future__ import annotations

__all__ = ["Engine", "create_app", "run_server"]


def __getattr__(name):
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "run_server":
        from .server import run_server

        return run_server
    raise AttributeError(name)
