"""Desktop apps: cold start of a GPT-2-small-shaped int8 package and the size of a runtime-only install.

    python benchmarks/desktop.py [--repeat 5] [--no-footprint] [--no-window]

Cold start, each number the median of ``--repeat`` fresh processes (the file system cache warm, as for an app
started a second time):

* ``import gpt2deploy`` and the runtime import (``gpt2deploy.runtime.model``: onnxruntime, numpy, tokenizers);
* ``load()`` with ``verify=False``, with ``verify=True`` hashing every file (``GPT2DEPLOY_VERIFY_CACHE=0``,
  what every load did before the verified-once cache) and with ``verify=True`` once the cache knows the files;
* the first token after load (``stream``: tokenize, prefill, first piece) and the peak RSS of the process;
* the sha256 throughput of this machine (what a full verification costs per MB);
* the desktop example itself (examples/desktop/app.py) under Xvfb, when installed: process start to window,
  to model ready and to the first token on screen, and the app process's peak RSS.

Footprint: a fresh venv with ``pip install <this checkout>`` (runtime dependencies only, no torch) — its size
per distribution — and the size of each variant of the package (what an app ships).

The package is built as benchmarks/prepare.py builds it (``exporters.synthetic`` + export + quantize) and
cached in benchmarks/.work/. Results go to benchmarks/RESULTS.md through benchmarks/results.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
import results  # noqa: E402

SECTION = "Desktop apps - cold start and install footprint"
MB = 1024 * 1024

# One fresh process: times from interpreter start, load in the given mode, first token, peak RSS.
_PROBE = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import gpt2deploy
    t1 = time.perf_counter()
    import gpt2deploy.runtime.model
    t2 = time.perf_counter()
    model = gpt2deploy.load(sys.argv[1], variant=sys.argv[2], device="cpu", verify=sys.argv[3] == "1")
    t3 = time.perf_counter()
    stream = model.stream("The assert statement", max_new_tokens=16, ignore_eos=True)
    it = iter(stream)
    next(it)
    t4 = time.perf_counter()
    for _ in it:
        pass
    hwm = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    print(json.dumps({"import": t1 - t0, "runtime_import": t2 - t1, "load": t3 - t2, "first_token": t4 - t3,
                      "peak_rss": hwm}))
    """
)

# The desktop example, driven by its own event loop: generate 16 tokens once the model is loaded, then close.
_APP_PROBE = textwrap.dedent(
    """
    import importlib.util, json, sys, time
    t0 = time.perf_counter()
    import tkinter as tk
    spec = importlib.util.spec_from_file_location("desktop_app", sys.argv[1])
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    root = tk.Tk()
    app = mod.App(root, sys.argv[2], device="cpu")
    marks = {}
    def drive():
        now = time.perf_counter() - t0
        marks.setdefault("window", now)
        if app.model is None:
            return root.after(2, drive)
        marks.setdefault("ready", now)
        if app.stream is None and "started" not in marks:
            marks["started"] = now
            app.prompt.insert("1.0", "The assert statement"); app.max_tokens_var.set("16"); app.generate()
        if app.output.get("1.0", "end-1c"):
            marks.setdefault("first_token", now)
        if "first_token" in marks and app.stream is None:
            return app.close()
        root.after(2, drive)
    root.after(0, drive)
    root.mainloop()
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            marks["peak_rss"] = int(line.split()[1]) * 1024
    print(json.dumps(marks))
    """
)


def _probe(code: str, args: list[str], env: dict) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
    )
    if r.returncode != 0:
        raise SystemExit(f"probe failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def cold_start(package: Path, variant: str, repeat: int, say) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="gpt2deploy-verify-cache-"))
    base = {**os.environ, "PYTHONPATH": str(ROOT), "GPT2DEPLOY_CACHE_DIR": str(cache)}
    modes = {
        "verify off": ({**base}, "0"),
        "verify on, every file hashed": ({**base, "GPT2DEPLOY_VERIFY_CACHE": "0"}, "1"),
        "verify on, verified-once cache": ({**base}, "1"),
    }
    _probe(_PROBE, [str(package), variant, "1"], base)  # warm the page cache and fill the verify cache
    out = {}
    for i in range(repeat):  # interleaved, so load changes on the machine hit every mode alike
        for name, (env, verify) in modes.items():
            out.setdefault(name, []).append(_probe(_PROBE, [str(package), variant, verify], env))
        say(f"cold start: round {i + 1}/{repeat}")
    shutil.rmtree(cache, ignore_errors=True)
    return out


def hash_throughput(package: Path, variant: str) -> tuple[float, float]:
    """(MB hashed, MB/s) of a full verification of ``variant`` and the shared files."""
    from gpt2deploy.fsutil import sha256_file
    from gpt2deploy.package import Package

    pkg = Package.open(package)
    paths = [pkg.root / e["path"] for e in pkg.listed_files([variant])]
    total = sum(p.stat().st_size for p in paths)
    t0 = time.perf_counter()
    for p in paths:
        sha256_file(p)
    return total / MB, total / MB / (time.perf_counter() - t0)


def window_start(package: Path, repeat: int, say) -> list[dict] | str:
    if shutil.which("Xvfb") is None:
        return "not measured: Xvfb is not installed (apt-get install xvfb)"
    r, w = os.pipe()
    xvfb = subprocess.Popen(
        ["Xvfb", "-displayfd", str(w), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        pass_fds=(w,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(w)
    with os.fdopen(r) as f:
        display = ":" + f.readline().strip()
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DISPLAY": display}
        app = ROOT / "examples" / "desktop" / "app.py"
        _probe(_APP_PROBE, [str(app), str(package)], env)  # fills the verify cache like a second start
        rows = []
        for i in range(repeat):
            rows.append(_probe(_APP_PROBE, [str(app), str(package)], env))
            say(f"desktop example: run {i + 1}/{repeat}")
        return rows
    finally:
        xvfb.terminate()
        xvfb.wait(10)


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


_DIST_SIZES = textwrap.dedent(
    """
    import json, importlib.metadata as md
    out = {}
    for d in md.distributions():
        size = sum((f.size or 0) for f in (d.files or []))
        out[d.metadata["Name"]] = size
    print(json.dumps(out))
    """
)


def footprint(say) -> dict:
    """A fresh venv, ``pip install`` of this checkout (runtime deps only): sizes, and that no torch came in."""
    tmp = Path(tempfile.mkdtemp(prefix="gpt2deploy-footprint-"))
    try:
        venv = tmp / "venv"
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
        py = venv / "bin" / "python"
        empty = _dir_size(venv)
        say(f"pip install {ROOT} into a fresh venv")
        t0 = time.perf_counter()
        subprocess.check_call(
            [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
            stdout=subprocess.DEVNULL,
        )
        install_s = time.perf_counter() - t0
        dists = json.loads(subprocess.check_output([str(py), "-c", _DIST_SIZES], text=True))
        heavy = (
            "import gpt2deploy.runtime.model, sys; print(sorted({'torch', 'transformers', 'onnx'} & set(sys.modules)))"
        )
        check = subprocess.run([str(py), "-c", heavy], capture_output=True, text=True, cwd=tmp)
        return {
            "venv_mb": (_dir_size(venv) - empty) / MB,
            "install_seconds": install_s,
            "dists": {k: v for k, v in dists.items() if k not in ("pip", "setuptools", "wheel")},
            "heavy_imported": check.stdout.strip() if check.returncode == 0 else f"import failed: {check.stderr}",
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def package_sizes(package: Path) -> tuple[float, dict[str, float]]:
    from gpt2deploy.package import Package

    pkg = Package.open(package)
    shared = sum(e["size"] for e in pkg.manifest["files"].values())
    return shared / MB, {n: sum(f["size"] for f in v["files"]) / MB for n, v in pkg.variants.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="fresh processes per cold-start mode (median)")
    ap.add_argument("--variant", default="int8", help="the variant whose cold start is measured")
    ap.add_argument("--variants", default="int8,int4", help="variants to build for the package-size table")
    ap.add_argument("--no-footprint", action="store_true", help="skip the fresh-venv install")
    ap.add_argument("--no-window", action="store_true", help="skip the desktop example under Xvfb")
    args = ap.parse_args(argv)
    say = lambda m: print(f"[desktop] {m}", file=sys.stderr, flush=True)  # noqa: E731

    ckpt = prepare.default_checkpoint(say)
    wanted = list(dict.fromkeys([args.variant, *args.variants.split(",")]))
    package, failed = prepare.gpt2deploy_package(ckpt, wanted, say)
    if package is None or args.variant in failed:
        raise SystemExit(f"could not build the package: {failed}")
    runs = cold_start(package, args.variant, args.repeat, say)
    hashed_mb, mb_s = hash_throughput(package, args.variant)
    window = None if args.no_window else window_start(package, args.repeat, say)
    foot = None if args.no_footprint else footprint(say)
    shared_mb, variants_mb = package_sizes(package)

    rows = []
    for mode, rs in runs.items():
        rows.append(
            [
                mode,
                f"{_median(rs, 'import') * 1e3:.0f}",
                f"{_median(rs, 'runtime_import') * 1e3:.0f}",
                f"{_median(rs, 'load') * 1e3:.0f}",
                f"{_median(rs, 'first_token') * 1e3:.0f}",
                f"{_median(rs, 'peak_rss') / MB:.0f}",
            ]
        )
    body = [
        f"GPT-2-small shape (124M, random weights), variant {args.variant}, CPU; median of {args.repeat} fresh "
        "processes per row, run interleaved; file system cache warm.",
        "",
        results.md_table(
            ["load()", "import gpt2deploy ms", "runtime import ms", "load ms", "first token ms", "peak RSS MiB"],
            rows,
        ),
        "",
        f"Full verification hashes {hashed_mb:.0f} MiB (shared files + {args.variant}) at {mb_s:.0f} MiB/s "
        "(sha256 on this CPU).",
    ]
    if isinstance(window, list):
        body += [
            "",
            "The desktop example (examples/desktop/app.py under Xvfb; default `verify=True`, cache warm), seconds "
            "from process start:",
            "",
            results.md_table(
                ["window shown s", "model ready s", "first token on screen s", "peak RSS MiB"],
                [
                    [
                        f"{_median(window, 'window'):.2f}",
                        f"{_median(window, 'ready'):.2f}",
                        f"{_median(window, 'first_token'):.2f}",
                        f"{_median(window, 'peak_rss') / MB:.0f}",
                    ]
                ],
            ),
        ]
    elif isinstance(window, str):
        body += ["", f"Desktop example: {window}."]
    if foot is not None:
        dist_rows = sorted(foot["dists"].items(), key=lambda kv: -kv[1])
        body += [
            "",
            f"Runtime-only install (`pip install gpt2deploy` from this checkout into an empty venv): "
            f"{foot['venv_mb']:.0f} MiB added to the venv; torch/transformers/onnx imported by the runtime: "
            f"{'none' if foot['heavy_imported'] == '[]' else foot['heavy_imported']}.",
            "",
            results.md_table(["distribution", "MiB"], [[k, f"{v / MB:.1f}"] for k, v in dist_rows]),
        ]
    body += [
        "",
        "Package sizes (what an app ships: the shared files plus one variant):",
        "",
        results.md_table(
            ["variant", "variant MiB", "with shared files MiB"],
            [[n, f"{mb:.0f}", f"{mb + shared_mb:.0f}"] for n, mb in sorted(variants_mb.items())],
        ),
    ]
    text = "\n".join(body)
    path = results.record(SECTION, text, command="python benchmarks/desktop.py " + " ".join(argv or sys.argv[1:]))
    print(text)
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
