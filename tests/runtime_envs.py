"""Runtime-only Python environments with another onnxruntime build, and npm's onnxruntime-node, for tests.

Each is created once and cached under ``~/.cache/gpt2deploy/`` (``benchmarks.envs.ensure_venv`` keeps a marker
of what was installed). A package is then run there through ``tests/js/greedy.mjs`` or ``runtime_greedy.py``:
the environment holds onnxruntime, numpy and tokenizers only, and imports gpt2deploy from this checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("GPT2DEPLOY_CACHE", Path.home() / ".cache" / "gpt2deploy"))
#: The runtimes a default build must open (besides the main environment's onnxruntime).
FLOOR = ("onnxruntime", "1.22.0")
GPU = ("onnxruntime-gpu", "1.31.1")
NODE = "1.30.0"


def runtime_python(dist: str, version: str) -> Path:
    """The python of a venv with ``dist==version`` (+ numpy, tokenizers); created on first use."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.envs import ensure_venv

    venv = CACHE / f"venv-{dist}-{version}"
    py, why = ensure_venv(venv, [f"{dist}=={version}", "numpy", "tokenizers"], CACHE / f"venv-{dist}-{version}.log")
    if py is None:
        raise RuntimeError(f"cannot create {venv}: {why}")
    return py


def run_greedy(python: Path, package: Path, variant: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy token ids per prompt from gpt2deploy.load(package, variant) in another environment."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [str(python), str(ROOT / "tests" / "runtime_greedy.py"), str(package), variant, json.dumps(prompts)]
    proc = subprocess.run([*args, str(new_tokens)], capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def node_prefix() -> Path:
    """A folder with onnxruntime-node installed (its CPU binary; the CUDA download is skipped)."""
    prefix = CACHE / "node"
    marker = prefix / f".ready-{NODE}"
    if marker.is_file():
        return prefix
    prefix.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL_CUDA": "skip", "ONNXRUNTIME_NODE_INSTALL": "skip"}
    cmd = ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix), f"onnxruntime-node@{NODE}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"npm install onnxruntime-node@{NODE} failed: {proc.stderr.strip()[-300:]}")
    marker.write_text(NODE)
    return prefix


def node_greedy(package: Path, graph: str, prompt: list[int], new_tokens: int) -> dict:
    """Greedy token ids from onnxruntime-node on ``package/graph`` (tests/js/greedy.mjs)."""
    env = {**os.environ, "ORT_NODE_PREFIX": str(node_prefix())}
    cmd = ["node", str(ROOT / "tests" / "js" / "greedy.mjs"), str(package), graph, json.dumps(prompt), str(new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        err = [line for line in proc.stderr.splitlines() if line.startswith("Error")] or proc.stderr.splitlines()[-1:]
        return {"error": err[0] if err else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
