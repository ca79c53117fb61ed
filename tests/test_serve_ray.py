"""Ray Serve scale-out: the serve app as 2 replicas on a local Ray instance started and stopped here.

One module-scoped Ray instance (2 logical CPUs, no dashboard, HTTP proxy on 127.0.0.1 and a free port) serves
every test: outputs equal the single-process server's, routing reaches both replicas, /metrics is per replica,
a killed replica's clients get a clean error while the other replica's complete and Ray restarts it, and bad
input gives one line naming the fix.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytest.importorskip("ray.serve", reason="the 'ray' extra is not installed (pip install -e '.[ray]')")
pytest.importorskip("starlette", reason="the 'serve' extra is not installed")

import httpx  # noqa: E402

PROMPTS = [
    "The quick brown fox",
    "Hello",
    "In the beginning the world was",
    "A",
    "Numbers: 1 2 3 4 5 6 7",
    "def main():",
    "Once upon a time, in a land far away, there lived",
    "x = [",
    "Why is the sky",
    "import numpy as np\nimport",
    "The capital of France is",
    "Ray Serve",
    "To be or not to be, that is",
    "SELECT * FROM",
    "One two three",
    "It was a dark and stormy night; the rain fell in torrents, except",
]
MAX_TOKENS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve():
    """A local Ray instance with Serve's proxy on 127.0.0.1:<free port>; stopped (with its processes) at the end."""
    import ray
    from ray import serve

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    # Workers import this checkout's code, and Ray reports nothing anywhere.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved["PYTHONPATH"]) if p)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def expected(tiny_package):
    """Each prompt's greedy completion from the single-process server (the same app, in this process)."""
    from starlette.testclient import TestClient

    from gpt2deploy.serving.app import create_app
    from gpt2deploy.serving.engine import Engine

    app = create_app(Engine.from_package(tiny_package, device="cpu", threads=1))
    with TestClient(app) as client:
        out = {}
        for p in PROMPTS:
            r = client.post("/v1/completions", json={"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0})
            assert r.status_code == 200, r.text
            out[p] = r.json()["choices"][0]["text"]
    return out


@pytest.fixture(scope="module")
def two_replicas(ray_serve, tiny_package):
    """The tiny package deployed as 2 replicas x 1 thread; deleted at the end of the module."""
    from ray import serve

    from gpt2deploy.serving import ray as rs

    # The options a Serve config file or `serve run ... key=value` passes to app_builder.
    args = {"package": str(tiny_package), "replicas": "2", "threads_per_replica": "1", "health_check_period_s": "1"}
    opts = rs.options_from_args(args)
    url = rs.deploy(opts, host="127.0.0.1", port=int(ray_serve.rsplit(":", 1)[1]), timeout=240)
    assert url == ray_serve
    yield url
    serve.delete(rs.APP_NAME)


def _replica_pids(timeout: float = 60.0) -> dict[str, int]:
    """replica id -> worker pid, asked through a deployment handle until both replicas answered."""
    from ray import serve

    from gpt2deploy.serving import ray as rs

    handle = serve.get_app_handle(rs.APP_NAME)
    seen, deadline = {}, time.monotonic() + timeout
    while len(seen) < 2 and time.monotonic() < deadline:
        info = handle.replica_info.remote().result(timeout_s=30)
        assert info["threads"] == 1 and info["ready"]
        seen[info["replica"]] = info["pid"]
    assert len(seen) == 2, f"a deployment handle reached only {seen}"
    return seen


async def _complete(client: httpx.AsyncClient, prompt: str, stream: bool):
    """One greedy request -> (status or exception name, replica header, text, whether the answer was whole)."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        text = r.json()["choices"][0]["text"] if r.status_code == 200 else None
        return r.status_code, r.headers.get("x-gpt2deploy-replica"), text, r.status_code == 200
    import json

    async with client.stream("POST", "/v1/completions", json=body) as r:
        replica, parts, done = r.headers.get("x-gpt2deploy-replica"), [], False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                parts.extend(c["text"] for c in json.loads(line[6:])["choices"])
        return r.status_code, replica, "".join(parts), done


def _proxy_reaches(url: str, replicas: int = 2, timeout: float = 90.0) -> set[str]:
    """Replica ids seen in /health answers through the proxy, until ``replicas`` were seen (the proxy learns of
    new replicas shortly after the application reports RUNNING)."""
    seen, deadline = set(), time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=30) as client:
        while len(seen) < replicas and time.monotonic() < deadline:
            r = client.get("/health")
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-gpt2deploy-replica"])
    return seen


@pytest.mark.timeout(420)
def test_two_replicas_serve_the_same_outputs_and_share_the_load(two_replicas, expected):
    assert len(_proxy_reaches(two_replicas)) == 2

    async def load():
        async with httpx.AsyncClient(base_url=two_replicas, timeout=120) as client:
            return await asyncio.gather(*(_complete(client, p, i % 4 == 0) for i, p in enumerate(PROMPTS)))

    results = asyncio.run(load())
    assert len(results) == 16
    for prompt, (status, replica, text, whole) in zip(PROMPTS, results, strict=True):
        assert status == 200 and whole and replica
        assert text == expected[prompt], prompt
    assert len({r[1] for r in results}) == 2, "the HTTP proxy routed every request to one replica"

    # /metrics answers per replica: every sample carries its replica label, and both replicas decoded tokens.
    tokens = {}
    with httpx.Client(base_url=two_replicas, timeout=30) as client:
        for _ in range(40):
            r = client.get("/metrics")
            assert r.status_code == 200
            replica = r.headers["x-gpt2deploy-replica"]
            for line in r.text.splitlines():
                if line.startswith("gpt2deploy_completion_tokens_total{"):
                    assert f'replica="{replica}"' in line
                    tokens[replica] = int(float(line.split()[-1]))
            if len(tokens) == 2:
                break
        health = client.get("/health")
        assert health.status_code == 200
    assert len(tokens) == 2 and all(v > 0 for v in tokens.values()), tokens
    assert sum(tokens.values()) >= 16  # every request generated at least one token, each counted once


@pytest.mark.timeout(480)
def test_killed_replica_fails_cleanly_and_is_restarted(two_replicas, expected):
    from ray import serve

    from gpt2deploy.serving import ray as rs

    pids = _replica_pids()
    victim_id, victim_pid = next(iter(pids.items()))
    prompts = PROMPTS * 2  # 32 requests, half streaming, so both replicas have work in flight at the kill

    async def load():
        async with httpx.AsyncClient(base_url=two_replicas, timeout=httpx.Timeout(90.0)) as client:
            killed = asyncio.Event()
            outcomes = []

            async def one(i, prompt):
                stream = i % 2 == 1
                replica = None  # known once a stream's headers arrived
                try:
                    if stream:
                        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
                        import json

                        async with client.stream("POST", "/v1/completions", json=body) as r:
                            replica, parts, done = r.headers.get("x-gpt2deploy-replica"), [], False
                            async for line in r.aiter_lines():
                                if replica == victim_id and not killed.is_set():
                                    killed.set()  # the victim is mid-stream: kill its worker process now
                                    os.kill(victim_pid, signal.SIGKILL)
                                if line == "data: [DONE]":
                                    done = True
                                elif line.startswith("data: "):
                                    parts.extend(c["text"] for c in json.loads(line[6:])["choices"])
                            result = (r.status_code, replica, "".join(parts), done)
                    else:
                        result = await _complete(client, prompt, False)
                except httpx.TimeoutException:
                    outcomes.append(("lost", None, prompt))
                    return
                except httpx.TransportError:  # the stream was cut when its replica died: a clean failure
                    outcomes.append(("failed", replica, prompt))
                    return
                status, replica, text, whole = result
                if status == 200 and whole:
                    assert text == expected[prompt]
                    outcomes.append(("ok", replica, prompt))
                elif status >= 500 or (status == 200 and not whole):
                    outcomes.append(("failed", replica, prompt))
                else:
                    outcomes.append(("wrong", status, prompt))

            await asyncio.wait_for(asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))), 200)
            return outcomes, killed.is_set()

    t0 = time.monotonic()
    outcomes, killed = asyncio.run(load())
    elapsed = time.monotonic() - t0
    counts = {k: sum(1 for o in outcomes if o[0] == k) for k in ("ok", "failed", "lost", "wrong")}
    print(f"sent {len(prompts)}, succeeded {counts['ok']}, failed cleanly {counts['failed']}, lost {counts['lost']}")
    assert killed, "no stream of the victim replica was seen in flight"
    assert len(outcomes) == len(prompts)
    assert counts["lost"] == 0 and counts["wrong"] == 0, outcomes
    assert counts["failed"] >= 1, "the killed replica had requests in flight; their clients must see an error"
    (survivor,) = set(pids) - {victim_id}
    assert any(o[0] == "ok" and o[1] == survivor for o in outcomes), "no request completed on the other replica"
    assert not any(o[0] == "failed" and o[1] == survivor for o in outcomes), "the other replica's requests failed"
    assert elapsed < 200

    # Ray restarts the replica; later requests all succeed, on two live replicas again.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        app = serve.status().applications[rs.APP_NAME]
        dep = app.deployments[rs.DEPLOYMENT_NAME]
        if app.status == "RUNNING" and dep.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the killed replica was not restarted: {serve.status().applications[rs.APP_NAME]}")
    new_pids = _replica_pids()
    assert victim_id not in new_pids and victim_pid not in new_pids.values()

    async def after():
        async with httpx.AsyncClient(base_url=two_replicas, timeout=120) as client:
            return await asyncio.gather(*(_complete(client, p, False) for p in PROMPTS[:8]))

    for prompt, (status, _, text, whole) in zip(PROMPTS[:8], asyncio.run(after()), strict=True):
        assert status == 200 and whole and text == expected[prompt]


@pytest.mark.timeout(400)
def test_unreadable_package_and_zip_uri(ray_serve, tmp_path, two_replicas, tiny_package, expected):
    import shutil

    from ray import serve

    from gpt2deploy.errors import PackageError
    from gpt2deploy.serving import ray as rs

    port = int(ray_serve.rsplit(":", 1)[1])
    serve.delete(rs.APP_NAME)  # the app name is shared; this test runs last in the module
    missing = tmp_path / "not-there"
    with pytest.raises(PackageError) as e:
        rs.deploy(rs.RayOptions(str(missing), replicas=1), host="127.0.0.1", port=port, timeout=240)
    msg = str(e.value)
    assert "\n" not in msg and "cannot read the package" in msg and str(missing) in msg
    assert "storage every node mounts" in msg
    assert rs.APP_NAME not in serve.status().applications

    # A .zip URI: Ray downloads and unpacks it on each node; the replica loads the package from there.
    archive = shutil.make_archive(str(tmp_path / "pkg"), "zip", root_dir=tiny_package.parent, base_dir="pkg")
    url = rs.deploy(rs.RayOptions(f"file://{archive}", replicas=1), host="127.0.0.1", port=port, timeout=240)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            prompt = PROMPTS[0]
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[prompt]
    finally:
        serve.delete(rs.APP_NAME)


@pytest.mark.timeout(400)
def test_cli_serve_ray_joins_the_cluster_and_stops_on_sigint(ray_serve, tiny_package, expected):
    import queue
    import threading

    import ray
    from ray import serve

    from gpt2deploy.serving import ray as rs

    assert rs.APP_NAME not in serve.status().applications  # earlier tests deleted theirs
    gcs = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-c", "from gpt2deploy.cli import main; main()", "serve", str(tiny_package), "--ray"]
    cmd += ["--ray-address", gcs, "--replicas", "1", "--port", ray_serve.rsplit(":", 1)[1]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 300, []
        while not any(f"{ray_serve}/v1" in x for x in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        assert any("1 replica(s) x 1 thread(s)" in x for x in seen), seen
        with httpx.Client(base_url=ray_serve, timeout=60) as client:
            prompt = PROMPTS[2]
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[prompt]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rs.APP_NAME not in serve.status().applications  # deleted; the cluster and Serve keep running
    assert ray.is_initialized()


@pytest.mark.timeout(400)
def test_serve_run_with_a_config_file_names_the_app_builder(ray_serve, tiny_package, expected, tmp_path):
    import ray
    from ray import serve

    from gpt2deploy.serving import ray as rs

    config = tmp_path / "serve.yaml"
    config.write_text(
        "applications:\n"
        f"  - name: {rs.APP_NAME}\n"
        "    route_prefix: /\n"
        "    import_path: gpt2deploy.serving.ray:app_builder\n"
        f"    args: {{package: '{tiny_package}', replicas: 1, threads_per_replica: 1, max_batch: 4}}\n"
    )
    serve_cli = str(Path(sys.executable).parent / "serve")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    gcs = ray.get_runtime_context().gcs_address
    r = subprocess.run(
        [serve_cli, "run", "--non-blocking", "--address", gcs, str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    try:
        deadline = time.monotonic() + 240
        while (app := serve.status().applications.get(rs.APP_NAME)) is None or app.status != "RUNNING":
            assert time.monotonic() < deadline and (app is None or app.status != "DEPLOY_FAILED"), app
            time.sleep(0.5)
        with httpx.Client(base_url=ray_serve, timeout=60) as client:
            assert client.get("/v1/models").json()["data"][0]["max_batch"] == 4
            prompt = PROMPTS[3]
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[prompt]
    finally:
        serve.delete(rs.APP_NAME)


def test_app_builder_options(tiny_package):
    from ray import serve

    from gpt2deploy.errors import UsageError
    from gpt2deploy.serving import ray as rs

    args = {"package": str(tiny_package), "autoscale": "1,3", "threads_per_replica": "2", "max_batch": "4"}
    assert isinstance(rs.app_builder(args), serve.Application)
    opts = rs.options_from_args(args)
    assert opts.autoscale == (1, 3) and opts.threads_per_replica == 2
    dep = rs.deployment_options(opts)
    assert dep["ray_actor_options"]["num_cpus"] == 2 and "num_replicas" not in dep
    assert dep["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}
    assert dep["max_ongoing_requests"] == 8  # a full batch running and one waiting per replica
    assert rs.deployment_options(rs.RayOptions("p", replicas=3))["num_replicas"] == 3
    uri_opts = rs.deployment_options(opts, "https://example.org/pkg.zip")
    assert uri_opts["ray_actor_options"]["runtime_env"] == {"working_dir": "https://example.org/pkg.zip"}
    assert rs.package_source("file:///srv/pkg.zip") == (None, "file:///srv/pkg.zip")
    assert rs.package_source("local:///srv/pkg") == ("/srv/pkg", None)
    for bad in ({"package": "p", "replica": "2"}, {"replicas": "2"}, {"package": "p", "replicas": "two"}):
        with pytest.raises(UsageError):
            rs.options_from_args(bad)
    with pytest.raises(UsageError, match="not a .zip"):
        rs.package_source("https://example.org/pkg")
    with pytest.raises(UsageError, match="--replicas"):
        rs.build(rs.RayOptions("p", replicas=0))


def _cli(*args, env_extra=None, pre="", timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", **(env_extra or {})}
    code = f"{pre}from gpt2deploy.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(120)
def test_ray_without_the_extra_is_one_line(tiny_package):
    r = _cli("serve", tiny_package, "--ray", pre="import sys; sys.modules['ray'] = None; ")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "pip install 'gpt2deploy[ray]'" in r.stderr


@pytest.mark.timeout(120)
def test_bad_ray_options_are_one_line(tiny_package, tmp_path):
    r = _cli("serve", tmp_path / "missing", "--ray")
    assert r.returncode == 2 and "no package directory" in r.stderr and r.stderr.strip().count("\n") == 0
    r = _cli("serve", tiny_package, "--ray", "--autoscale", "3,1")
    assert r.returncode == 2 and "--autoscale" in r.stderr and r.stderr.strip().count("\n") == 0
    r = _cli("serve", tiny_package, "--ray", "--replicas", "2", "--autoscale", "1,2")
    assert r.returncode == 2 and "either" in r.stderr
    r = _cli("serve", "ftp://host/pkg.zip", "--ray")
    assert r.returncode == 2 and "scheme 'ftp'" in r.stderr


@pytest.mark.timeout(200)
def test_unreachable_cluster_is_one_line(tiny_package):
    port = _free_port()
    r = _cli("serve", tiny_package, "--ray", "--ray-address", f"127.0.0.1:{port}", timeout=180)
    assert r.returncode == 2, r.stderr
    assert "no Ray cluster is reachable" in r.stderr and "ray start --head" in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
