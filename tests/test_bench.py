"""`gpt2deploy bench`: measured fields, long-context curve, plot, and every bad input (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_cli_error

from gpt2deploy.benchmark.longctx import curve_positions
from gpt2deploy.benchmark.memory import PeakRss, current_rss, gpu_memory
from gpt2deploy.benchmark.stats import summarize
from gpt2deploy.benchmark.workload import BenchConfig, synthetic_prompts

TINY = ("--repeat", "2", "--new-tokens", "4", "--prompt-tokens", "4", "--device", "cpu", "--threads", "1")
CURVE = ("--curve-points", "3", "--curve-steps", "4")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_summary(s: dict, n: int) -> None:
    assert s["n"] == n
    assert 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]


@pytest.fixture(scope="module")
def bench_run(tiny_package, tmp_path_factory):
    """One CLI run writing the table, the JSON report and the PNG (shared by the checks below)."""
    from typer.testing import CliRunner

    from gpt2deploy.cli import app

    out = tmp_path_factory.mktemp("bench")
    args = [
        "bench",
        str(tiny_package),
        "--variant",
        "fp32",
        *TINY,
        *CURVE,
        "--json",
        str(out / "r.json"),
        "--plot",
        str(out / "curve.png"),
    ]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result, json.loads((out / "r.json").read_text()), out / "curve.png"


def test_bench_reports_expected_fields(bench_run):
    result, report, _ = bench_run
    assert report["config"]["prompt_tokens"] == 4 and report["config"]["new_tokens"] == 4
    assert report["config"]["device"] == "cpu" and report["model"]["n_positions"] == 128
    v = report["variants"]["fp32"]
    assert v["variant"] == "fp32" and v["device"] == "cpu" and v["file_mb"] > 0
    for key in ("ttft_ms", "decode_tok_s", "e2e_tok_s"):
        _assert_summary(v[key], 2)
    assert len(v["samples"]) == 2
    for s in v["samples"]:
        assert s["ttft_ms"] > 0 and s["decode_tok_s"] > 0 and s["e2e_tok_s"] > 0
        assert s["total_seconds"] * 1000 >= s["ttft_ms"]
    mem = v["memory"]
    assert mem["peak_rss_mb"] > 0 and mem["peak_rss_mb"] >= mem["rss_after_load_mb"] * 0.5
    assert mem["method"] in ("VmHWM", "psutil-sampling", "getrusage")
    assert "gpu" not in mem  # CPU run: no GPU number, no error
    # the human table on stdout, progress on stderr
    assert "fp32" in result.stdout and "TTFT ms" in result.stdout and "decode tok/s" in result.stdout
    assert "load s" in result.stdout and 0 < v["load_seconds"] < 60
    assert f"{v['load_seconds']:.2f}" in result.stdout
    assert "long context" in result.stdout
    assert "[bench] fp32: run 2/2" in result.stderr


def test_long_context_curve_reaches_the_context(bench_run):
    _, report, _ = bench_run
    curve = report["variants"]["fp32"]["long_context"]
    positions = [p["position"] for p in curve]
    assert len(positions) == 3 and positions == sorted(set(positions))
    assert positions[0] >= 1
    assert curve[-1]["end"] == 128 - 1  # prompt + 4 timed steps + the first token == context
    for p in curve:
        assert p["decode_tok_s"] > 0 and p["prefill_ms"] > 0 and p["end"] == p["position"] + 4


def test_plot_writes_png(bench_run):
    _, _, png = bench_run
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_json_to_stdout_batch_and_default_variant(tiny_package, cli):
    r = cli("bench", tiny_package, *TINY, "--batch", "2", "--no-long-context", "--json", "-")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["config"]["batch"] == 2
    ((name, v),) = report["variants"].items()
    assert name == "fp32" and "long_context" not in v
    assert v["e2e_tok_s"]["median"] > 0


def test_all_variants(package_copy, cli):
    from gpt2deploy.quantizing import quantize_package

    quantize_package(package_copy, "int8")
    r = cli("bench", package_copy, "--all", *TINY, "--no-long-context", "--json", "-", "--no-verify")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert list(report["variants"]) == ["fp32", "int8"]
    for v in report["variants"].values():
        assert v["decode_tok_s"]["median"] > 0 and v["memory"]["peak_rss_mb"] > 0


# -- library pieces --------------------------------------------------------------------------------


def test_summarize_median_and_spread():
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert s["q1"] == pytest.approx(1.75) and s["q3"] == pytest.approx(4.75)
    assert summarize([5])["median"] == 5.0


def test_curve_positions():
    pos = curve_positions(1024, 16, 8)
    assert pos[0] == 32 and pos[-1] == 1024 - 16 - 1 and len(pos) == 8 and pos == sorted(set(pos))
    assert curve_positions(128, 4, 3) == [32, 78, 123]
    assert curve_positions(20, 4, 8)[-1] == 15 and curve_positions(20, 4, 1) == [15]
    assert curve_positions(5, 4, 3) == []


def test_synthetic_prompts_are_deterministic_and_avoid_eos():
    a = synthetic_prompts(2, 50, 100, seed=3, avoid=(7,))
    assert a == synthetic_prompts(2, 50, 100, seed=3, avoid=(7,))
    assert a != synthetic_prompts(2, 50, 100, seed=4, avoid=(7,))
    assert [len(r) for r in a] == [50, 50] and all(0 <= i < 100 and i != 7 for r in a for i in r)


def test_peak_rss_tracks_an_allocation():
    import mmap

    size = 40 * 1024 * 1024
    with PeakRss() as tracker:
        block = mmap.mmap(-1, size)  # fresh pages (malloc could reuse memory that is already resident)
        for offset in range(0, size, 4096):
            block[offset] = 1
        block.close()
    assert current_rss() > 0
    assert tracker.peak >= tracker.start_rss + 30 * 1024 * 1024


def test_gpu_memory_is_skipped_cleanly(monkeypatch):
    import sys

    assert gpu_memory("cpu") is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML bindings absent
    assert "nvidia-ml-py" in gpu_memory("cuda")["skipped"]


def test_config_validation_messages():
    from gpt2deploy.errors import UsageError

    with pytest.raises(UsageError, match="--new-tokens must be"):
        BenchConfig(new_tokens=0).validate()
    with pytest.raises(UsageError, match="beyond the model's context"):
        BenchConfig(prompt_tokens=100, new_tokens=100).validate_for(128)
    BenchConfig(prompt_tokens=64, new_tokens=64).validate_for(128)


# -- bad input: one line, exit 2, no traceback, nothing written --------------------------------------


def _assert_clean_failure(r, *needles: str, out: Path | None = None):
    assert_cli_error(r, *needles, only=True)
    if out is not None:
        assert not out.exists()


@pytest.mark.parametrize(
    "args, needles",
    [
        (("--prompt-tokens", "0"), ("--prompt-tokens must be",)),
        (("--new-tokens", "0"), ("--new-tokens must be",)),
        (("--batch", "0"), ("--batch must be",)),
        (("--repeat", "0"), ("--repeat must be",)),
        (("--threads", "0"), ("--threads must be",)),
        (("--prompt-tokens", "200"), ("--prompt-tokens 200 is beyond the model's context of 128",)),
        (("--prompt-tokens", "100", "--new-tokens", "50"), ("= 150 is beyond the model's context of 128",)),
        (("--variant", "int4"), ("variant 'int4'", "present: fp32")),
        (("--variant", "fp32", "--all"), ("either --variant or --all",)),
        (("--device", "tpu"), ("unknown device 'tpu'",)),
        (("--no-long-context", "--plot", "x.png"), ("drop --no-long-context",)),
        (("--plot", "curve.jpg"), ("must end with .png",)),
    ],
)
def test_bad_input(tiny_package, tmp_path, cli, args, needles):
    out = tmp_path / "r.json"
    # sizes that fit the tiny model unless the case overrides them (the last value of an option wins)
    base = ("--new-tokens", "4", "--prompt-tokens", "4")
    _assert_clean_failure(cli("bench", tiny_package, *base, *args, "--json", out), *needles, out=out)


def test_bad_cuda_without_provider(tiny_package, cli):
    from gpt2deploy.runtime.providers import cuda_available

    if cuda_available():
        pytest.skip("this onnxruntime has the CUDA provider; the error case needs it absent")
    _assert_clean_failure(
        cli("bench", tiny_package, "--device", "cuda", "--new-tokens", "4"),
        "CUDA execution provider",
        "onnxruntime-gpu",
    )


def test_bad_package_missing(tmp_path, cli):
    _assert_clean_failure(cli("bench", tmp_path / "nope"), "does not exist")


def test_bad_not_a_package(tmp_path, cli):
    _assert_clean_failure(cli("bench", tmp_path), "not a gpt2deploy package")


def test_bad_json_directory_missing(tiny_package, tmp_path, cli):
    _assert_clean_failure(cli("bench", tiny_package, "--json", tmp_path / "no" / "r.json"), "does not exist")
