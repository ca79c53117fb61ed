"""Shared fixtures: tiny seeded GPT-2 checkpoints (never downloaded) and packages exported from them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR = ASSETS / "gpt2-tokenizer"
SHARED = ROOT.parent / "shared"
GPT2_REF = SHARED / "models" / "gpt2-ref"
EVAL_TEXT = SHARED / "eval-text" / "pydoc_topics.txt"

#: Shape A: 2 layers, 4 heads of 16. Shape B: 3 layers, 6 heads of 8 (n_head != 4).
SHAPE_A = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, seed=0)
SHAPE_B = dict(n_layer=3, n_head=6, n_embd=48, n_positions=96, seed=1)


@pytest.fixture(scope="session", autouse=True)
def _private_verify_cache(tmp_path_factory):
    """Loads in tests remember verified files in a cache of their own, not the user's ~/.cache."""
    import os

    os.environ.setdefault("GPT2DEPLOY_CACHE_DIR", str(tmp_path_factory.mktemp("user-cache")))


def make_checkpoint(out: Path, **shape) -> Path:
    from exporters.synthetic import make_random_checkpoint

    return make_random_checkpoint(out, TOKENIZER_DIR, **shape)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_a") / "model", **SHAPE_A)


@pytest.fixture(scope="session")
def tiny_checkpoint_b(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_b") / "model", **SHAPE_B)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_checkpoint) -> Path:
    """An exported fp32 package of shape A. Read-only by convention: copy it (``package_copy``) to mutate."""
    from gpt2deploy.exporting import export_package

    out = tmp_path_factory.mktemp("pkg_a") / "pkg"
    export_package(str(tiny_checkpoint), out)
    return out


@pytest.fixture(scope="session")
def tiny_portable_package(tmp_path_factory, tiny_checkpoint) -> Path:
    """Shape A exported with ``optimize=False``: the fp32 graph in plain ONNX ops. Read-only."""
    from gpt2deploy.exporting import export_package

    out = tmp_path_factory.mktemp("pkg_a_portable") / "pkg"
    export_package(str(tiny_checkpoint), out, optimize=False)
    return out


@pytest.fixture
def package_copy(tmp_path, tiny_package) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(tiny_package, dst)
    return dst


#: Evaluation tokens for builds in tests (the checker's default is sized for real models).
BUILD_TOKENS = 512
#: Random weights give near-uniform next-token distributions (perplexity ~ vocabulary size), where top-k and
#: greedy agreement measure noise, not quantization error. Builds of random models relax those rank gates and
#: keep the distribution gates (perplexity, KL, logit differences, NaN/Inf, cache and batch consistency).
#: Prompts of mixed lengths for batching: rows that join, run together and leave.
MIXED_PROMPTS = [
    "The quick brown fox",
    "In Python, a list is a mutable sequence of",
    "Hello",
    "a b c d e f g h i j k l m n o p",
    "x",
    "Once upon a time there",
    "1 2 3",
    "zzz top",
]

RANDOM_MODEL_GATES = ("top1=0.4", "top5=0.4", "greedy=0.05")


@pytest.fixture(scope="session")
def built_package(tmp_path_factory, tiny_checkpoint) -> Path:
    """Shape A built end to end (fp32, int8, int4: export, quantize, check). Read-only: use ``built_copy`` to mutate."""
    from gpt2deploy.building import build_package

    out = tmp_path_factory.mktemp("built") / "pkg"
    build_package(
        str(tiny_checkpoint),
        out,
        variants=("fp32", "int8", "int4"),
        max_tokens=BUILD_TOKENS,
        thresholds=RANDOM_MODEL_GATES,
    )
    return out


@pytest.fixture
def built_copy(tmp_path, built_package) -> Path:
    dst = tmp_path / "built"
    shutil.copytree(built_package, dst, symlinks=True)
    return dst


@pytest.fixture
def cli():
    """Invoke the CLI in-process: ``cli("export", str(path), "-o", out)`` -> click Result."""
    from typer.testing import CliRunner

    from gpt2deploy.cli import app

    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


def assert_cli_error(r, *needles: str, code: int | None = 2, only: bool = False, before: str | None = None) -> str:
    """The command failed the project's way; return its error line.

    Exit ``code`` (None: any non-zero), no traceback, exactly one ``error: `` line on stderr and it is the
    last one, naming each of ``needles``. Progress lines may precede it: ``only`` allows none, ``before``
    requires each to start with that prefix.
    """
    assert r.exit_code != 0 if code is None else r.exit_code == code, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    if only:
        assert len(lines) == 1, r.stderr
    if before is not None:
        assert all(line.startswith(before) for line in lines[:-1]), r.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


#: Fixtures that make a model (a seeded checkpoint, then exports and builds from it): a test using one, even
#: indirectly, is in the slow tier. ``pytest -m "not slow"`` runs the rest, the fast tier.
MODEL_FIXTURES = {"tiny_checkpoint", "tiny_checkpoint_b"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


requires_gpt2_ref = pytest.mark.skipif(
    not GPT2_REF.is_dir(), reason=f"{GPT2_REF} is not present (it is in CI and beside the project root)"
)
