"""A worker process per engine and the JSON-lines conversation with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Peer:
    """One engine in its own process. ``available`` is False (with ``reason``) when it could not start."""

    def __init__(self, key: str, spec: dict, python: str | None = None, reason: str = ""):
        self.key = key
        self.spec = spec
        self.python = python or sys.executable
        self.reason = reason
        self.proc: subprocess.Popen | None = None
        self.name = key
        self.info: dict = {}
        self.runs: list[dict] = []
        self.curve: list[dict] | None = None
        self.memory: dict = {}

    @property
    def available(self) -> bool:
        return not self.reason

    def start(self, log_dir: Path) -> None:
        """Run the engine's one-off preparation, then start the worker and wait until it has loaded and warmed up."""
        if not self.available:
            return
        spec_file = Path(tempfile.mkstemp(prefix=f"{self.key}-", suffix=".json", dir=log_dir)[1])
        spec_file.write_text(json.dumps(self.spec))
        with open(log_dir / f"{self.key}-prepare.log", "w") as log:
            done = subprocess.run(
                [self.python, str(HERE / "worker.py"), str(spec_file), "--prepare"],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=str(HERE.parent),
            )
        msgs = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        if not msgs or msgs[-1].get("event") != "prepared":
            reason = msgs[-1].get("error") if msgs else f"preparation exited with code {done.returncode}"
            self.fail(f"not available: {reason} (see {log.name})")
            return
        self.log = open(log_dir / f"{self.key}.log", "w")
        self.proc = subprocess.Popen(
            [self.python, str(HERE / "worker.py"), str(spec_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            cwd=str(HERE.parent),
        )
        msg = self._read()
        if msg.get("event") != "ready":
            self.fail(msg.get("error", "worker did not start"))
            return
        self.name = msg["name"]
        self.info = msg

    def ask(self, command: str) -> dict:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"event": "error", "error": f"worker exited (see {self.log.name})"}
        return self._read()

    def _read(self) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            return {"event": "error", "error": f"worker exited with code {self.proc.returncode} (see {self.log.name})"}
        return json.loads(line)

    def run(self, round_index: int) -> None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        msg = self.ask("run")
        if msg.get("event") != "run":
            self.fail(msg.get("error", "run failed"))
            return
        self.runs.append({**msg, "round": round_index, "load1": load})

    def measure_curve(self, positions: list[int], prompts: list[list[int]], steps: int, repeat: int = 1) -> None:
        msg = self.ask(
            "curve " + json.dumps({"positions": positions, "prompts": prompts, "steps": steps, "repeat": repeat})
        )
        if msg.get("event") == "curve":
            self.curve = msg["points"]
        else:
            self.curve = None
            self.info["curve_error"] = msg.get("error", "curve failed")

    def record_memory(self) -> None:
        """Peak RSS of the timed workload (asked before the long-context curve, whose long prompts use more)."""
        if self.proc is None or not self.available:
            return
        msg = self.ask("memory")
        if msg.get("event") == "memory":
            self.memory = {k: msg[k] for k in ("peak_rss_mb", "rss_mb")}

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            msg = self.ask("quit")
            if msg.get("event") == "bye":
                final = {k: msg[k] for k in ("peak_rss_mb", "rss_mb")}
                if self.memory:  # recorded before the long-context curve: this is the peak with it
                    self.memory["with_long_context"] = final
                else:
                    self.memory = final
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.log.close()

    def fail(self, reason: str) -> None:
        self.reason = reason
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
