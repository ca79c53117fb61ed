"""Progress of the long commands (export, quantize, build, check, bench) on stderr, through rich.

On a terminal: a live line with a spinner (or a bar once the total is known), the current step, elapsed
time and, with a total, the ETA; each step message is also kept as a line above it. When stderr is not a
terminal (CI, pipes, logs): no live display, the step messages only, as plain lines.
"""

from __future__ import annotations

import sys

from .app import say


class CommandProgress:
    """``with CommandProgress("[quantize]") as p``: pass ``p.message`` as a library's ``progress`` callback and
    ``p.step`` as a ``(done, total, label)`` callback."""

    def __init__(self, prefix: str = "", stream=None):
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._progress = None
        self._task = None

    def __enter__(self) -> CommandProgress:
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.prefix or "working", total=None)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _line(self, message: str) -> str:
        return f"{self.prefix} {message}" if self.prefix else message

    def message(self, message: str) -> None:
        """One step message: a line above the live display, or a plain line without one."""
        line = self._line(message)
        if self._progress is None:
            say(line)
            return
        self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self._progress.update(self._task, description=line[:60])

    def step(self, done: int, total: int, label: str) -> None:
        """Counted progress (bar, ETA) on a terminal; nothing otherwise (the messages already say what runs)."""
        if self._progress is not None:
            self._progress.update(self._task, total=total, completed=done, description=self._line(label)[:60])
