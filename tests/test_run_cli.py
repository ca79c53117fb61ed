"""`gpt2deploy run`: streaming output, --json, stdin prompts, and every bad input as a one-line error."""

from __future__ import annotations

import json

import pytest
from conftest import assert_cli_error

import gpt2deploy
from gpt2deploy.runtime.providers import cuda_available


def _one_line_error(r, *needles, code=2):
    return assert_cli_error(r, *needles, code=code)


@pytest.fixture(scope="module")
def greedy_text(tiny_package):
    m = gpt2deploy.load(tiny_package, device="cpu", threads=1)
    return m.generate("The assert statement", max_new_tokens=12)


def test_run_streams_the_continuation(cli, tiny_package, greedy_text):
    r = cli("run", tiny_package, "--prompt", "The assert statement", "-n", "12", "--device", "cpu", "--threads", "1")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == greedy_text + "\n"
    assert "[run] variant fp32 on cpu (auto on cpu: fp32 is the fastest CPU variant present" in r.stderr
    assert "12 new tokens" in r.stderr


def test_run_json_and_stdin(cli, tiny_package, greedy_text):
    r = cli(
        "run", tiny_package, "--prompt", "-", "-n", "12", "--json", "--device", "cpu", input="The assert statement\n"
    )
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == greedy_text
    assert out["variant"] == "fp32" and out["device"] == "cpu"
    assert out["prompt_tokens"] == 3 and out["new_tokens"] == 12 and out["finish_reason"] == "length"
    assert out["timings"]["decode_steps"] == 11 and out["tokens_per_second"] > 0
    r = cli("run", tiny_package, "--prompt", "The assert statement", "--json", "--ignore-eos")  # default budget
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["new_tokens"] == 128 - 3


def test_run_sampling_options_and_stop(cli, tiny_package, greedy_text):
    args = (
        "run",
        tiny_package,
        "--prompt",
        "The assert statement",
        "-n",
        "12",
        "--json",
        "--do-sample",
        "--seed",
        "7",
        "--temperature",
        "0.8",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--repetition-penalty",
        "1.2",
    )
    a, b = cli(*args), cli(*args)
    assert a.exit_code == 0, a.stderr
    assert json.loads(a.stdout)["text"] == json.loads(b.stdout)["text"]
    stop = greedy_text[5:8]
    r = cli(
        "run", tiny_package, "--prompt", "The assert statement", "-n", "12", "--stop", stop, "--stop", "zzzq", "--json"
    )
    out = json.loads(r.stdout)
    assert out["text"] == greedy_text[: greedy_text.find(stop)] and out["finish_reason"] == "stop"


def test_truncate_flag(cli, tiny_package):
    long_prompt = " word" * 200
    r = cli("run", tiny_package, "--prompt", long_prompt, "-n", "8")
    _one_line_error(r, "exceeds the model's context of 128", "--truncate")
    r = cli("run", tiny_package, "--prompt", long_prompt, "-n", "8", "--truncate", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_tokens"] == 120 and out["truncated_tokens"] == 80
    assert "left-truncated by 80 tokens" in r.stderr
    r = cli("run", tiny_package, "--prompt", " word" * 100, "-n", "40")  # fits alone, not with the new tokens
    _one_line_error(r, "prompt of 100 tokens + max_new_tokens 40")


@pytest.mark.parametrize(
    "extra, needles",
    [
        (("--do-sample", "--temperature", "0"), ("temperature must be > 0",)),
        (("--top-p", "0"), ("top_p must be in (0, 1]",)),
        (("--top-p", "1.5"), ("top_p must be in (0, 1]",)),
        (("--top-k", "-1"), ("top_k must be >= 0",)),
        (("--max-new-tokens", "0"), ("max_new_tokens must be >= 1",)),
        (("--repetition-penalty", "0"), ("repetition_penalty must be > 0",)),
        (("--max-new-tokens", "500"), ("leaves no room for a prompt",)),
        (("--variant", "int8"), ("variant 'int8' is not in package", "present: fp32")),
        (("--device", "tpu"), ("unknown device 'tpu'",)),
        (("--threads", "0"), ("threads must be >= 1",)),
    ],
)
def test_bad_options(cli, tiny_package, extra, needles):
    r = cli("run", tiny_package, "--prompt", "Hello", *extra)
    _one_line_error(r, *needles)
    assert r.stdout == ""


def test_empty_prompt(cli, tiny_package):
    _one_line_error(cli("run", tiny_package, "--prompt", ""), "prompt is empty")
    _one_line_error(cli("run", tiny_package, "--prompt", "-", input=""), "prompt is empty")


def test_not_a_package(cli, tmp_path):
    _one_line_error(cli("run", tmp_path, "--prompt", "Hi"), "is not a gpt2deploy package", "gpt2deploy export")
    f = tmp_path / "file.txt"
    f.write_text("x")
    _one_line_error(cli("run", f, "--prompt", "Hi"), "is a file")
    _one_line_error(cli("run", tmp_path / "missing", "--prompt", "Hi"), "does not exist")


def test_tampered_package_is_refused(cli, package_copy):
    path = package_copy / "onnx" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    line = _one_line_error(cli("run", package_copy, "--prompt", "Hi"), "onnx/model.onnx", "sha256", code=1)
    assert "integrity" in line
    from gpt2deploy.errors import IntegrityError

    with pytest.raises(IntegrityError):
        gpt2deploy.load(package_copy, device="cpu")


def test_tampered_tokenizer_is_refused(cli, package_copy):
    (package_copy / "tokenizer.json").write_text("{}")
    _one_line_error(cli("run", package_copy, "--prompt", "Hi"), "tokenizer.json", code=1)


@pytest.mark.skipif(cuda_available(), reason="this machine has the CUDA provider; the error path needs it absent")
def test_cuda_unavailable_says_how_to_install(cli, tiny_package):
    _one_line_error(cli("run", tiny_package, "--prompt", "Hi", "--device", "cuda"), "onnxruntime-gpu")
