"""`gpt2deploy serve PACKAGE`: an OpenAI-compatible completions server (needs the `serve` extra)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from .app import app, command, say

API_KEY_ENV = "GPT2DEPLOY_API_KEY"


def _check_listen(host: str, port: int) -> None:
    """Fail before the (slow) load when the address cannot be bound."""
    import socket

    from ..errors import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise UsageError(f"--host {host} is not an address of this machine; use 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            msg = f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host"
            raise UsageError(msg) from None


@app.command("serve")
@command
def serve_cmd(
    package: Path = typer.Argument(..., help="Package directory (written by 'gpt2deploy export' or 'build')."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000, help="TCP port."),
    variant: str | None = typer.Option(None, help="Variant to load (default: picked for the device)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto (CUDA when available)."),
    threads: int | None = typer.Option(None, help="ONNX Runtime intra-op threads (default: all cores)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Sequences decoded together in one batch."),
    max_queue: int = typer.Option(64, "--max-queue", help="Sequences that may wait; beyond it requests get 503."),
    api_key: str | None = typer.Option(
        None, "--api-key", help=f"Require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; /health stays open)."
    ),
    cors: list[str] | None = typer.Option(None, "--cors", help="Allow browser calls from this origin (repeatable)."),
    prefill_chunk: int = typer.Option(
        64, "--prefill-chunk", help="Prompt positions run between two decode steps while a request joins."
    ),
    max_body: int = typer.Option(1 << 20, "--max-body", help="Largest request body in bytes."),
    grace: float = typer.Option(10.0, "--grace", help="Seconds in-flight requests may finish after SIGTERM/SIGINT."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the sha256 check of the package files."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level (critical, error, warning, info)."),
) -> None:
    """Serve PACKAGE over HTTP with the OpenAI completions API, streaming and continuous batching."""
    from ..errors import UsageError

    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535 (got {port})")
    for name, value in (("--max-batch", max_batch), ("--max-body", max_body), ("--prefill-chunk", prefill_chunk)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1 (got {value})")
    if max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0 (got {max_queue})")
    if grace < 0:
        raise UsageError(f"--grace must be >= 0 (got {grace})")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("gpt2deploy serve needs the web server packages; pip install 'gpt2deploy[serve]'") from None
    from ..serving.app import create_app
    from ..serving.engine import Engine
    from ..serving.protocol import Limits
    from ..serving.server import run_server

    _check_listen(host, port)
    key = api_key or os.environ.get(API_KEY_ENV) or None
    engine = Engine.from_package(
        package, variant=variant, device=device, threads=threads, verify=not no_verify,
        max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
    )  # fmt: skip
    say(f"[serve] {engine.model_id}: variant {engine.model.variant} on {engine.model.device}, max batch {max_batch}")
    if host not in ("127.0.0.1", "localhost", "::1") and not key:
        say(f"warning: serving on {host} without an API key; set --api-key or ${API_KEY_ENV}")
    app_ = create_app(engine, api_key=key, cors=tuple(cors or ()), limits=Limits(max_body_bytes=max_body),
                      shutdown_timeout=grace)  # fmt: skip
    say(f"[serve] http://{host}:{port}/v1 (auth {'on' if key else 'off'}, CORS {'on' if cors else 'off'})")
    run_server(app_, host=host, port=port, grace=grace, log_level=log_level)
    say("[serve] stopped")
