"""llama.cpp as a peer: its own tools, built once from the package index, timed with ``llama-bench``.

* Build: the ``llama-cpp-python`` source distribution vendors llama.cpp. On first use it is downloaded with
  ``pip download --no-binary :all:``, unpacked and built (``cmake -DGGML_NATIVE=ON``, targets ``llama-bench``
  and ``llama-quantize``, at the lowest CPU priority) under ``~/.cache/gpt2deploy/llama.cpp``
  (``GPT2DEPLOY_CACHE`` moves it). It compiles for many minutes, so it never happens under CI=true.
  Some virtual machines report AMX in their CPU flags but fault on its instructions, and a native build then
  dies on its first multi-row product (prompt steps). Where the CPU reports AMX, a tiny probe program runs
  one AMX instruction first; when it faults, llama.cpp is built in ``build-noamx`` with AMX switched off
  (``AMX_OFF``), so it runs its AVX-512 (VNNI) kernels instead.
* Models: the same checkpoint converted by the vendored ``convert_hf_to_gguf.py`` (with its ``gguf-py``) to
  GGUF F32 once ``n_ctx`` is added to a copy of config.json, then ``llama-quantize`` to Q8_0 and Q4_0, cached
  in ``benchmarks/.work/``.
* Timing: ``llama-bench -p 0 -n N -d P`` decodes N tokens after a P-token context (the harness's workload:
  P prompt tokens, N new tokens), ``-p P -n 0`` times the prompt step; one repetition per harness round.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("GPT2DEPLOY_CACHE", Path.home() / ".cache" / "gpt2deploy")) / "llama.cpp"
TOOLS = ("llama-bench", "llama-quantize")
QUANTS = ("F32", "Q8_0", "Q4_0")
AMX_OFF = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
AMX_PROBE = r"""
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
struct cfg { unsigned char palette, start; unsigned char reserved[14]; unsigned short colsb[16];
             unsigned char rows[16]; };
int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 2;
    struct cfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1; c.rows[0] = 16; c.colsb[0] = 64;
    _tile_loadconfig(&c);
    _tile_zero(0);
    _tile_release();
    return 0;
}
"""


def source_dir() -> Path | None:
    """The vendored llama.cpp of the newest unpacked llama-cpp-python sdist in the cache."""
    found = sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    return found[-1].parent if found else None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def amx_faults() -> bool:
    """True when the CPU reports AMX but a program that runs one AMX instruction does not exit cleanly."""
    if "amx_tile" not in _cpu_flags() or shutil.which("cc") is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "amx.c", Path(tmp) / "amx"
        src.write_text(AMX_PROBE)
        built = subprocess.run(["cc", "-O1", "-mamx-tile", str(src), "-o", str(exe)], capture_output=True)
        if built.returncode != 0:
            return False  # the compiler cannot emit AMX, so a native build will not either
        try:
            return subprocess.run([str(exe)], capture_output=True, timeout=30).returncode != 0
        except subprocess.TimeoutExpired:
            return True


def build_dir() -> str:
    """The build directory's name under the llama.cpp source: ``build``, or ``build-noamx`` (see above)."""
    return "build-noamx" if amx_faults() else "build"


def tool(name: str) -> Path | None:
    src = source_dir()
    path = src / build_dir() / "bin" / name if src else None
    return path if path is not None and path.is_file() else None


def _run(cmd: list[str], log: Path, cwd: Path | None = None, env: dict | None = None) -> bool:
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        return subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env) == 0


def _tail(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def ensure_build(log: Path, say=print, build: bool = True) -> str:
    """Build the tools once; "" when they are there, else why not."""
    if all(tool(t) for t in TOOLS):
        return ""
    if not build:
        return "not available: llama.cpp's tools are not built (run the harness without --no-llama-build)"
    if os.environ.get("CI"):
        return "not available: llama.cpp is not built under CI (run the harness once outside CI to build it)"
    for exe in ("cmake", "c++"):
        if shutil.which(exe) is None:
            return f"not available: building llama.cpp needs {exe} (apt-get install cmake g++)"
    CACHE.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    if source_dir() is None:
        say(f"downloading the llama-cpp-python source distribution to {CACHE} (log {log})")
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python"]
        if not _run([*pip, "-d", str(CACHE)], log):
            return f"not available: pip download llama-cpp-python failed ({_tail(log)})"
        sdists = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            return "not available: no llama-cpp-python source distribution was downloaded"
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(CACHE, filter="data")
        if source_dir() is None:
            return "not available: the llama-cpp-python source distribution has no vendored llama.cpp"
    src, out = source_dir(), build_dir()
    why = " (AMX off: this CPU reports AMX but faults on it)" if out != "build" else ""
    say(f"building llama.cpp {' '.join(TOOLS)} in {src / out}{why} (once; many minutes; log {log})")
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    configure = ["cmake", "-B", out, "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"]
    configure += ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
    if out != "build":
        flags = " ".join(AMX_OFF)  # explicit -mno-* flags win over what -march=native turns on
        configure += [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"]
    build = ["cmake", "--build", out, "-j", str(os.cpu_count() or 2), "--target", *TOOLS]
    if not (_run(nice + configure, log, cwd=src) and _run(nice + build, log, cwd=src)):
        return f"not available: building llama.cpp failed ({_tail(log)})"
    return ""


def gguf_models(ckpt: Path, work: Path, key: str, log: Path, say=print) -> tuple[dict[str, Path], str]:
    """{quant: path} for F32, Q8_0 and Q4_0 of ``ckpt``, converted once; ({}, reason) on failure."""
    out = {q: work / f"gguf-{key}-{q.lower()}.gguf" for q in QUANTS}
    if all(p.is_file() for p in out.values()):
        return out, ""
    src, quantize = source_dir(), tool("llama-quantize")
    if src is None or quantize is None:
        return {}, "not available: llama.cpp is not built"
    if not out["F32"].is_file():
        stage = work / f"gguf-{key}-hf"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        for f in ckpt.iterdir():
            if f.is_file() and f.name != "config.json":
                (stage / f.name).symlink_to(f.resolve())
        config = json.loads((ckpt / "config.json").read_text())
        config.setdefault("n_ctx", config.get("n_positions", 1024))  # the converter reads GPT-2's context from n_ctx
        (stage / "config.json").write_text(json.dumps(config, indent=2))
        say(f"converting {ckpt} to GGUF F32 with llama.cpp's converter (log {log})")
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        tmp = out["F32"].with_suffix(".partial")
        convert = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(stage), "--outtype", "f32"]
        ok = _run([*convert, "--outfile", str(tmp)], log, env=env)
        shutil.rmtree(stage, ignore_errors=True)
        if not ok:
            return {}, f"not available: GGUF conversion failed ({_tail(log)})"
        tmp.rename(out["F32"])
    for q in QUANTS[1:]:
        if not out[q].is_file():
            tmp = out[q].with_suffix(".partial")
            if not _run([str(quantize), str(out["F32"]), str(tmp), q], log):
                return {}, f"not available: llama-quantize {q} failed ({_tail(log)})"
            tmp.rename(out[q])
    return out, ""


def bench(binary: str, model: str, threads: int, prompt: int, new: int, depth: int) -> dict:
    """One ``llama-bench`` test (one repetition); its JSON record (``avg_ts`` tokens/s, ``avg_ns``)."""
    cmd = [binary, "-m", model, "-t", str(threads), "-r", "1", "-o", "jsonl"]
    cmd += ["-p", str(prompt), "-n", str(new), "-d", str(depth)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not records:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise RuntimeError(f"llama-bench exited with code {done.returncode}: {tail}")
    return records[-1]
