"""`gpt2deploy serve` as a real process on 127.0.0.1: completions equal ``generate``, concurrent requests
batch and still equal their solo output, disconnects free their row, the queue is bounded, auth and CORS,
every bad request is a JSON 4xx, and SIGTERM shuts down gracefully with exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import MIXED_PROMPTS

import gpt2deploy

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120  # seconds for the server to load the package and answer /health (shared CI machines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, pkg: Path, *args: str, env: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = dict(os.environ, **(env or {}))
        full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-c", "from gpt2deploy.cli import main; main()", "serve", str(pkg)]
        cmd += ["--port", str(self.port), "--threads", "1", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"server did not become healthy in {START_TIMEOUT}s")
            time.sleep(0.2)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10, headers=getattr(self, "headers", None)).text
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == name:
                return float(value)
        raise KeyError(name)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("server did not stop within its grace period") from None
        return self.proc.returncode


@contextmanager
def serving(pkg, *args, env=None):
    s = Server(pkg, *args, env=env)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def model(tiny_package):
    return gpt2deploy.load(tiny_package, device="cpu", threads=1)


@pytest.fixture(scope="module")
def server(tiny_package):
    with serving(tiny_package, "--max-batch", "8") as s:
        yield s


def _complete(server, **body) -> dict:
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(server, **body) -> tuple[str, list[dict]]:
    chunks = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        assert ln.startswith("data: ")
        chunks.append(json.loads(ln[6:]))
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    return text, chunks


# -- completions equal generate -----------------------------------------------------------------
@pytest.mark.timeout(120, func_only=True)
def test_completion_and_stream_equal_generate(server, model):
    prompt = "The quick brown fox"
    want = model.generate(prompt, max_new_tokens=20)
    r = _complete(server, prompt=prompt, max_tokens=20, temperature=0)
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == want
    ids = model.encode(prompt)
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 20, "total_tokens": len(ids) + 20}
    assert r["choices"][0]["finish_reason"] == "length"
    text, chunks = _stream(server, prompt=prompt, max_tokens=20, temperature=0)
    assert text == want
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    # seeded sampling with per-request options
    opts = dict(temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.2, seed=11)
    want = model.generate(prompt, max_new_tokens=16, do_sample=True, **opts)
    body = dict(prompt=prompt, max_tokens=16, **opts)
    assert _complete(server, **body)["choices"][0]["text"] == want
    assert _stream(server, **body)[0] == want
    # token-id prompts, a list of prompts, n choices and stop strings
    r = _complete(server, prompt=[prompt, "Hello"], max_tokens=8, temperature=0, n=2)
    texts = [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])]
    solo = model.generate([prompt, "Hello"], max_new_tokens=8)
    assert texts == [solo[0], solo[0], solo[1], solo[1]]
    assert _complete(server, prompt=ids, max_tokens=8, temperature=0)["choices"][0]["text"] == solo[0]
    stop = solo[1][3:6]
    r = _complete(server, prompt="Hello", max_tokens=8, temperature=0, stop=[stop])
    assert r["choices"][0]["text"] == model.generate("Hello", max_new_tokens=8, stop=[stop])
    assert r["choices"][0]["finish_reason"] == "stop"


@pytest.mark.timeout(120, func_only=True)
def test_openai_client(server, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    [m] = client.models.list().data
    assert m.id == "pkg"
    r = client.completions.create(model=m.id, prompt="Hello there", max_tokens=12, temperature=0)
    assert r.choices[0].text == model.generate("Hello there", max_new_tokens=12)
    assert r.usage.completion_tokens == 12
    pieces = client.completions.create(model=m.id, prompt="Hello there", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == r.choices[0].text
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=m.id, messages=[{"role": "user", "content": "hi"}])
    assert "completions" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=m.id, prompt="Hello", max_tokens=12, temperature=5)


@pytest.mark.timeout(120, func_only=True)
def test_echo_and_logprobs_score_the_prompt(server, model):
    prompt = "The quick brown fox jumps"
    ids = model.encode(prompt)
    r = _complete(server, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    c = r["choices"][0]
    assert c["text"] == prompt + model.generate(prompt, max_new_tokens=3)
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3 and lp["token_logprobs"][0] is None
    logits, _ = model.session.forward(np.array([ids]), logits_to_keep=0)
    x = logits[0, 0].astype(np.float64)
    ref = x[ids[1]] - x.max() - np.log(np.exp(x - x.max()).sum())
    assert lp["token_logprobs"][1] == pytest.approx(ref, abs=1e-3)
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    # scoring a text: echo, max_tokens 0
    r = _complete(server, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    c = r["choices"][0]
    assert c["text"] == prompt and c["finish_reason"] == "length"
    assert c["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][: len(ids)], abs=1e-4)
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    _, chunks = _stream(server, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1)
    assert chunks[0]["choices"][0]["text"] == prompt


# -- continuous batching --------------------------------------------------------------------------
@pytest.mark.timeout(180, func_only=True)
def test_concurrent_greedy_requests_equal_their_solo_output(server, model):
    prompts = MIXED_PROMPTS
    budgets = [40, 12, 60, 25, 33, 8, 50, 20]
    solo = [model.generate(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, budgets, strict=True)]
    steps_before = server.metric("gpt2deploy_decode_steps_total")
    rows_before = server.metric("gpt2deploy_decode_rows_total")
    seconds_before = server.metric("gpt2deploy_decode_seconds_total")
    prompt_seconds_before = server.metric("gpt2deploy_prompt_seconds_total")
    out: dict[int, str] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(len(prompts))

    def client(i: int) -> None:
        try:
            go.wait()
            body = dict(prompt=prompts[i], max_tokens=budgets[i], temperature=0, ignore_eos=True)
            if i % 2:
                out[i] = _stream(server, **body)[0]
            else:
                out[i] = _complete(server, **body)["choices"][0]["text"]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not errors, errors
    assert [out[i] for i in range(len(prompts))] == solo
    steps = server.metric("gpt2deploy_decode_steps_total") - steps_before
    # alone, the requests would take sum(budget - 1) decode steps; batched they share steps
    assert steps < sum(b - 1 for b in budgets) * 0.75, steps
    # every token but each sequence's first (from its prompt run) comes from a decode step
    assert server.metric("gpt2deploy_decode_rows_total") - rows_before == sum(b - 1 for b in budgets)
    assert server.metric("gpt2deploy_decode_seconds_total") > seconds_before
    assert server.metric("gpt2deploy_prompt_seconds_total") > prompt_seconds_before


@pytest.mark.timeout(120, func_only=True)
def test_client_disconnect_frees_its_row(server):
    cancelled = server.metric("gpt2deploy_rows_cancelled_total")
    body = {"prompt": "Hello", "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body) as r:
            it = r.iter_lines()
            got = [next(it) for _ in range(4)]
            assert got[0].startswith("data: ")
            assert server.metric("gpt2deploy_batch_size") >= 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.metric("gpt2deploy_rows_cancelled_total") > cancelled and server.metric("gpt2deploy_batch_size") == 0:
            break
        time.sleep(0.05)
    assert server.metric("gpt2deploy_rows_cancelled_total") == cancelled + 1
    assert server.metric("gpt2deploy_batch_size") == 0
    assert server.metric('gpt2deploy_requests_total{outcome="cancelled"}') >= 1


# -- limits, validation, security ---------------------------------------------------------------------
@pytest.mark.timeout(120, func_only=True)
def test_queue_overflow_answers_503_with_retry_after(tiny_package):
    with serving(tiny_package, "--max-batch", "1", "--max-queue", "1") as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "n": 3}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_overloaded"
        codes: list[int] = []
        body = {"prompt": "Hello", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        go = threading.Barrier(6)

        def client():
            go.wait()
            codes.append(httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert sorted(set(codes)) == [200, 503] and len(codes) == 6
        assert s.metric('gpt2deploy_requests_total{outcome="rejected"}') == 1 + codes.count(503)
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200


@pytest.mark.timeout(120, func_only=True)
def test_api_key_and_cors(tiny_package, server):
    # auth off, no CORS by default
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://example.com"}, timeout=10)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    env = {"GPT2DEPLOY_API_KEY": "s3cret"}
    with serving(tiny_package, "--cors", "http://app.local", env=env) as s:
        s.headers = {"Authorization": "Bearer s3cret"}
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(s.url + path, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        bad = {"Authorization": "Bearer wrong"}
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=bad, timeout=10)
        assert r.status_code == 401
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=s.headers, timeout=30)
        assert r.status_code == 200
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert client.completions.create(model="pkg", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()
        pre = httpx.options(
            s.url + "/v1/completions",
            headers={"Origin": "http://app.local", "Access-Control-Request-Method": "POST"},
            timeout=10,
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.local"
        r = httpx.get(s.url + "/v1/models", headers={"Origin": "http://evil.example", **s.headers}, timeout=10)
        assert "access-control-allow-origin" not in r.headers


BAD = [
    ("not json", 400, None),
    ("[1, 2]", 400, None),
    ({}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": [[1, 2], "a"]}, 400, "prompt"),
    ({"prompt": [999999]}, 400, "prompt"),
    ({"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": -1, "echo": True}, 400, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "Hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "Hi", "top_k": -2}, 400, "top_k"),
    ({"prompt": "Hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "Hi", "n": 0}, 400, "n"),
    ({"prompt": "Hi", "n": 1000}, 400, "n"),
    ({"prompt": "Hi", "seed": -1}, 400, "seed"),
    ({"prompt": "Hi", "seed": True}, 400, "seed"),
    ({"prompt": "Hi", "logprobs": 100}, 400, "logprobs"),
    ({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "Hi", "stop": [""]}, 400, "stop"),
    ({"prompt": "Hi", "stop": 3}, 400, "stop"),
    ({"prompt": "Hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": "Hi", "echo": 1}, 400, "echo"),
    ({"prompt": "Hi", "frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"prompt": "Hi", "best_of": 3}, 400, "best_of"),
    ({"prompt": "Hi", "suffix": "x"}, 400, "suffix"),
    ({"prompt": "Hi", "bogus": 1}, 400, "bogus"),
    ({"prompt": "Hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "word " * 120, "max_tokens": 20}, 400, "max_tokens"),
]


@pytest.mark.timeout(120, func_only=True)
def test_every_bad_request_is_a_json_4xx(server):
    for body, status, param in BAD:
        raw = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(server.url + "/v1/completions", content=raw, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and "Traceback" not in r.text and err["param"] == param, (body, err)
    # a prompt that does not fit is accepted when truncation is asked for
    r = _complete(server, prompt="word " * 120, max_tokens=20, temperature=0, truncate=True)
    assert r["usage"]["prompt_tokens"] == 128 - 20
    big = json.dumps({"prompt": "x" * (2 << 20)})
    r = httpx.post(server.url + "/v1/completions", content=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": []}, timeout=10)
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]
    r = httpx.get(server.url + "/nowhere", timeout=10)
    assert r.status_code == 404 and r.json()["error"]
    assert server.metric('gpt2deploy_requests_total{outcome="error"}') == 0


@pytest.mark.timeout(60, func_only=True)
def test_health_models_and_metrics(server, model):
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    [m] = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
    assert m["id"] == "pkg" and m["variant"] == model.variant and m["context_length"] == 128
    assert httpx.get(server.url + "/v1/models/pkg", timeout=10).status_code == 200
    assert httpx.get(server.url + "/v1/models/other", timeout=10).status_code == 404
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in (
        "gpt2deploy_requests_total",
        "gpt2deploy_prompt_tokens_total",
        "gpt2deploy_completion_tokens_total",
        "gpt2deploy_queue_depth",
        "gpt2deploy_batch_size",
        "gpt2deploy_time_to_first_token_seconds_bucket",
        "gpt2deploy_inter_token_latency_seconds_bucket",
    ):
        assert name in text


# -- shutdown ---------------------------------------------------------------------------------------
@pytest.mark.timeout(120, func_only=True)
def test_sigterm_finishes_in_flight_requests_and_exits_0(tiny_package):
    s = Server(tiny_package, "--grace", "3")
    body = {"prompt": "Hello", "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
    lines = []
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        lines.append(next(it))
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        lines += [ln for ln in it if ln]
    assert lines[-1] == "data: [DONE]"
    finals = [json.loads(ln[6:]) for ln in lines[:-1] if ln.startswith("data: {")]
    assert any(c["choices"] and c["choices"][0]["finish_reason"] in ("length", "cancelled") for c in finals)
    assert s.proc.wait(30) == 0
    assert time.monotonic() - t0 < 3 + 10
    with pytest.raises(httpx.HTTPError):
        httpx.get(s.url + "/health", timeout=2)


def test_serve_rejects_bad_options_before_loading(cli, tmp_path, server):
    r = cli("serve", tmp_path / "missing", "--port", "0")
    assert r.exit_code == 2 and "port" in r.output
    r = cli("serve", tmp_path / "missing", "--port", server.port)  # taken by the running server
    assert r.exit_code == 2 and "cannot listen" in r.output
    r = cli("serve", tmp_path / "missing")
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output


def test_runtime_and_cli_import_no_web_stack():
    code = (
        "import sys, gpt2deploy, gpt2deploy.cli, gpt2deploy.runtime.batcher, gpt2deploy.serving; "
        "bad = [m for m in ('starlette', 'uvicorn', 'fastapi', 'httpx') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
