"""Run an app under uvicorn with a bounded graceful shutdown: the first SIGTERM/SIGINT stops accepting
connections and drains the engine (in-flight sequences finish until the grace period ends, then are
cancelled); the process then exits 0. A second signal exits at once."""

from __future__ import annotations

import contextlib
import signal
import threading


def run_server(app, host: str = "127.0.0.1", port: int = 8000, grace: float = 10.0, log_level: str = "info") -> None:
    import uvicorn

    engine = app.state.engine

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def handle(sig, frame):
                if self.should_exit:
                    self.force_exit = True
                self.should_exit = True
                engine.drain(grace)

            saved = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in saved.items():
                    signal.signal(s, h)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=max(1, int(grace) + 2),
        lifespan="on",
        access_log=False,
    )
    _Server(config).run()
