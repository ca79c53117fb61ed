"""A desktop text generator on Tkinter and the gpt2deploy runtime: open a package, type a prompt, watch it stream.

    python examples/desktop/app.py [PACKAGE] [--variant int8] [--device auto|cpu|cuda]

Needs only the runtime install (``pip install gpt2deploy``) and the standard library's Tkinter. It uses the
public API alone: ``gpt2deploy.load`` and ``Model.stream`` with ``TextStream.cancel()`` for Stop.

Threads: loading and generation run on worker threads and talk to the window through a queue that the Tk
event loop drains every few milliseconds, so the window repaints and its buttons answer while tokens stream.
Stop cancels the stream (no token is computed after it); closing the window cancels too and exits.
"""

from __future__ import annotations

import argparse
import queue
import threading
import tkinter as tk
from pathlib import Path
from tkinter import filedialog, ttk
from tkinter.scrolledtext import ScrolledText

import gpt2deploy
from gpt2deploy.errors import Gpt2DeployError

POLL_MS = 20  # how often the window takes what the workers produced
MAX_EVENTS_PER_POLL = 200  # so a burst of tokens never blocks repainting
CLOSE_WAIT_S = 10.0  # closing waits this long at most for the step in flight


def one_line(error: BaseException) -> str:
    """The message shown in the window: gpt2deploy's own one-line errors as they are, others shortened."""
    if isinstance(error, Gpt2DeployError):
        return str(error)
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class App:
    """The window. ``open_package(path)`` loads a package; Generate / Stop drive one stream at a time."""

    def __init__(self, root: tk.Tk, package: str | None = None, variant: str | None = None, device: str = "auto"):
        self.root = root
        self.variant, self.device = variant, device
        self.model = None
        self.stream = None
        self.worker: threading.Thread | None = None
        self.events: queue.Queue = queue.Queue()
        self.busy = False  # loading or generating
        self.closed = False
        self._build()
        root.protocol("WM_DELETE_WINDOW", self.close)
        root.report_callback_exception = self._callback_error  # one line in the window, not a traceback
        self._after = root.after(POLL_MS, self._poll)
        self._update_buttons()
        if package:
            self.open_package(package)

    # -- layout ---------------------------------------------------------------------------------
    def _build(self) -> None:
        root = self.root
        root.title("gpt2deploy")
        root.minsize(560, 420)
        root.columnconfigure(0, weight=1)
        root.rowconfigure(4, weight=1)

        top = ttk.Frame(root, padding=(8, 8, 8, 0))
        top.grid(row=0, column=0, sticky="ew")
        top.columnconfigure(1, weight=1)
        ttk.Label(top, text="Package").grid(row=0, column=0, sticky="w")
        self.package_var = tk.StringVar(value="(none)")
        ttk.Label(top, textvariable=self.package_var).grid(row=0, column=1, sticky="w", padx=6)
        self.open_button = ttk.Button(top, text="Open…", command=self.choose_package)
        self.open_button.grid(row=0, column=2)
        self.info_var = tk.StringVar(value="No package loaded: choose one with Open…")
        ttk.Label(top, textvariable=self.info_var, wraplength=760).grid(row=1, column=0, columnspan=3, sticky="w")

        settings = ttk.Frame(root, padding=(8, 6, 8, 0))
        settings.grid(row=1, column=0, sticky="ew")
        self.max_tokens_var = tk.StringVar(value="200")
        self.temperature_var = tk.StringVar(value="0.8")
        self.top_p_var = tk.StringVar(value="0.95")
        self.sampling_var = tk.BooleanVar(value=False)
        ttk.Label(settings, text="Max tokens").pack(side="left")
        ttk.Spinbox(settings, from_=1, to=4096, width=6, textvariable=self.max_tokens_var).pack(side="left", padx=4)
        ttk.Checkbutton(settings, text="Sampling", variable=self.sampling_var).pack(side="left", padx=(12, 4))
        ttk.Label(settings, text="Temperature").pack(side="left")
        ttk.Entry(settings, width=5, textvariable=self.temperature_var).pack(side="left", padx=4)
        ttk.Label(settings, text="Top-p").pack(side="left")
        ttk.Entry(settings, width=5, textvariable=self.top_p_var).pack(side="left", padx=4)
        ttk.Label(settings, text="(greedy when Sampling is off)").pack(side="left", padx=6)

        prompt_frame = ttk.Frame(root, padding=(8, 6, 8, 0))
        prompt_frame.grid(row=2, column=0, sticky="ew")
        prompt_frame.columnconfigure(0, weight=1)
        ttk.Label(prompt_frame, text="Prompt").grid(row=0, column=0, sticky="w")
        self.prompt = tk.Text(prompt_frame, height=4, wrap="word", undo=True)
        self.prompt.grid(row=1, column=0, sticky="ew")

        buttons = ttk.Frame(root, padding=(8, 6, 8, 0))
        buttons.grid(row=3, column=0, sticky="ew")
        self.generate_button = ttk.Button(buttons, text="Generate", command=self.generate)
        self.generate_button.pack(side="left")
        self.stop_button = ttk.Button(buttons, text="Stop", command=self.stop)
        self.stop_button.pack(side="left", padx=6)
        self.clear_button = ttk.Button(buttons, text="Clear", command=self.clear)
        self.clear_button.pack(side="left")

        self.output = ScrolledText(root, wrap="word", height=14, state="disabled")
        self.output.grid(row=4, column=0, sticky="nsew", padx=8, pady=6)

        self.status_var = tk.StringVar(value="")
        self.status = tk.Label(root, textvariable=self.status_var, anchor="w", justify="left", wraplength=760)
        self.status.grid(row=5, column=0, sticky="ew", padx=8, pady=(0, 8))
        self._default_fg = self.status.cget("fg")

    def _update_buttons(self) -> None:
        ready = self.model is not None and not self.busy
        self.generate_button.state(["!disabled"] if ready else ["disabled"])
        generating = self.stream is not None and not self.stream.cancelled
        self.stop_button.state(["!disabled"] if generating else ["disabled"])
        self.open_button.state(["disabled"] if self.busy else ["!disabled"])

    def _callback_error(self, exc_type, exc, tb) -> None:
        self._say(one_line(exc), error=True)

    def _say(self, text: str, error: bool = False) -> None:
        self.status_var.set(text)
        self.status.configure(fg="#b00020" if error else self._default_fg)

    # -- package --------------------------------------------------------------------------------
    def choose_package(self) -> None:
        path = filedialog.askdirectory(title="Open a gpt2deploy package", mustexist=True)
        if path:
            self.open_package(path)

    def open_package(self, path: str | Path) -> None:
        """Load the package on a worker thread; the window shows the variant, device and why."""
        if self.busy:
            return
        self.busy = True
        self.model = None
        self.package_var.set(str(path))
        self.info_var.set("Loading…")
        self._say("")
        self._update_buttons()
        self._start(self._load_worker, str(path))

    def _load_worker(self, path: str) -> None:
        try:
            model = gpt2deploy.load(path, variant=self.variant, device=self.device)
        except Exception as e:  # shown in the window, never a traceback
            self.events.put(("load-error", one_line(e)))
        else:
            self.events.put(("loaded", model))

    # -- generation -----------------------------------------------------------------------------
    def settings(self) -> dict:
        """Generation options from the settings row; ValueError with a readable message when one is bad."""
        raw = self.max_tokens_var.get().strip()
        try:
            max_tokens = int(raw)
        except ValueError:
            raise ValueError(f"Max tokens must be a whole number (got {raw!r})") from None
        if max_tokens < 1:
            raise ValueError(f"Max tokens must be at least 1 (got {max_tokens})")
        opts: dict = {"max_new_tokens": max_tokens, "do_sample": bool(self.sampling_var.get())}
        if opts["do_sample"]:
            for key, var, name in (
                ("temperature", self.temperature_var, "Temperature"),
                ("top_p", self.top_p_var, "Top-p"),
            ):
                text = var.get().strip()
                try:
                    opts[key] = float(text)
                except ValueError:
                    raise ValueError(f"{name} must be a number (got {text!r})") from None
        return opts

    def generate(self) -> None:
        if self.model is None or self.busy:
            return
        prompt = self.prompt.get("1.0", "end-1c")
        if not prompt.strip():
            self._say("Type a prompt first.", error=True)
            return
        try:
            stream = self.model.stream(prompt, **self.settings())
        except (ValueError, Gpt2DeployError) as e:  # bad setting, prompt too long for the context
            self._say(one_line(e) if isinstance(e, Gpt2DeployError) else str(e), error=True)
            return
        self.clear()
        self.stream = stream
        self.busy = True
        self._say("Generating…")
        self._update_buttons()
        self._start(self._generate_worker, stream)

    def _generate_worker(self, stream) -> None:
        try:
            for piece in stream:
                self.events.put(("text", piece))
        except Exception as e:
            self.events.put(("error", one_line(e)))
        else:
            self.events.put(("done", stream.result))

    def stop(self) -> None:
        """Cancel the running generation: the token being computed is the last one."""
        if self.stream is not None:
            self.stream.cancel()
            self._say("Stopping…")
            self._update_buttons()

    def clear(self) -> None:
        self.output.configure(state="normal")
        self.output.delete("1.0", "end")
        self.output.configure(state="disabled")

    # -- plumbing -------------------------------------------------------------------------------
    def _start(self, target, arg) -> None:
        # daemon: a load cannot be interrupted, and must not keep the process alive after the window closed
        self.worker = threading.Thread(target=target, args=(arg,), daemon=True, name=target.__name__)
        self.worker.start()

    def _poll(self) -> None:
        """Take what the workers produced (text pieces, results, errors) and show it; runs on the Tk loop."""
        for _ in range(MAX_EVENTS_PER_POLL):
            try:
                kind, value = self.events.get_nowait()
            except queue.Empty:
                break
            self._handle(kind, value)
        if not self.closed:
            self._after = self.root.after(POLL_MS, self._poll)

    def _handle(self, kind: str, value) -> None:
        if kind == "text":
            self.output.configure(state="normal")
            self.output.insert("end", value)
            self.output.see("end")
            self.output.configure(state="disabled")
            return
        self.busy = False
        if kind == "loaded":
            self.model = value
            root = Path(self.package_var.get()).name
            self.root.title(f"gpt2deploy — {root}")
            self.info_var.set(f"Variant {value.variant} on {value.device}: {value.selection_reason}")
            notes = "; ".join(getattr(value, "notes", []) or [])
            self._say(f"Ready. {notes}" if notes else "Ready.")
        elif kind == "load-error":
            self.info_var.set("No package loaded: choose one with Open…")
            self._say(value, error=True)
        elif kind == "done":
            self.stream = None
            reason = value.finish_reasons[0]
            speed = value.timings.get("decode_tokens_per_second")
            rate = f", {speed:.0f} tokens/s" if speed else ""
            what = "Stopped" if reason == "cancelled" else f"Done ({reason})"
            self._say(f"{what}: {value.new_tokens[0]} tokens{rate}.")
        elif kind == "error":
            self.stream = None
            self._say(value, error=True)
        self._update_buttons()

    def close(self) -> None:
        """Window closed: cancel a running generation, wait for its step in flight (bounded), then exit."""
        if self.closed:
            return
        self.closed = True
        if self.stream is not None:
            self.stream.cancel()
        if self.worker is not None and self.worker.name == "_generate_worker":
            self.worker.join(CLOSE_WAIT_S)
        self.root.after_cancel(self._after)
        self.root.destroy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Stream text from a gpt2deploy package in a window.")
    parser.add_argument("package", nargs="?", help="package directory (or choose one with Open…)")
    parser.add_argument("--variant", help="variant to load (default: the runtime's choice for the device)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    try:
        root = tk.Tk()
    except tk.TclError as e:  # no display
        parser.exit(2, f"error: cannot open a window ({one_line(e)}); run it on a desktop or set DISPLAY\n")
    App(root, args.package, args.variant, args.device)
    root.mainloop()


if __name__ == "__main__":
    main()
