"""Ray Serve scale-out vs one `gpt2deploy serve` process, on this machine (a benchmark, not a test).

Workload: the GPT-2-small-shaped int8 package (``benchmarks/.work``, built by ``prepare.py`` on first use),
``--clients`` concurrent clients each sending ``--requests`` greedy completions of ``--max-tokens`` tokens
after prompts of mixed lengths. Three servers, measured in the same run, in rotating order over ``--rounds``:

* ``serve``: one ``gpt2deploy serve`` process, ``--threads 2``, one continuous-batching loop;
* ``ray 1x2``: Ray Serve, 1 replica reserving 2 CPUs (2 ONNX Runtime threads);
* ``ray 2x1``: Ray Serve, 2 replicas reserving 1 CPU each (1 thread each, two batching loops).

Reported: aggregate completion tok/s (median over rounds), median request latency, and the overhead per request:
median latency of one client's ``max_tokens=1`` requests, minus the same on the plain server. The table goes to
``benchmarks/RESULTS.md`` (section "Ray Serve scale-out") through ``results.record``.

    python benchmarks/ray_scale.py [--clients 8] [--requests 3] [--max-tokens 48] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

PROMPTS = [
    "The history of the city begins",
    "In computer science, a hash table is a data structure that",
    "Once upon a time",
    "The committee met on Tuesday to discuss the budget for the coming year, and after a long debate",
    "Water boils at",
    "def fibonacci(n):",
    "The results of the experiment suggest that the effect is small but",
    "She opened the door and saw",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx

    latencies, tokens = [], 0

    async def client(c: int, http: httpx.AsyncClient):
        nonlocal tokens
        for r in range(requests):
            prompt = PROMPTS[(c + r) % len(PROMPTS)]
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            t = time.perf_counter()
            resp = await http.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - t)
            resp.raise_for_status()
            tokens += resp.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
    return {"tok_s": tokens / wall, "latency": statistics.median(latencies), "tokens": tokens}


def measure(url: str, args) -> dict:
    """Warm up, time one client's 1-token requests (overhead), then the concurrent load."""
    asyncio.run(_load(url, 2, 1, 4))
    single = asyncio.run(_load(url, 1, args.overhead_requests, 1))
    out = asyncio.run(_load(url, args.clients, args.requests, args.max_tokens))
    out["one_token_latency"] = single["latency"]
    return out


def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy")


class PlainServer:
    """`gpt2deploy serve PKG --threads 2` in a subprocess on a free port."""

    def __init__(self, package: Path, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from gpt2deploy.cli import main; main()", "serve", str(package)]
        cmd += ["--port", str(self.port), "--threads", str(threads), "--variant", "int8", "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_health(self.url, self.proc)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=3, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--overhead-requests", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--package", type=Path, help="an int8 package (default: GPT-2-small shape in benchmarks/.work)")
    p.add_argument("--no-record", action="store_true", help="print the table only")
    args = p.parse_args()

    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    package = args.package
    if package is None:
        from prepare import default_checkpoint, gpt2deploy_package

        package, failed = gpt2deploy_package(default_checkpoint(), ["int8"])
        if package is None or failed:
            raise SystemExit(f"cannot build the int8 package: {failed}")

    import ray
    from ray import serve

    from gpt2deploy.serving import ray as rs

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    configs = {
        "serve 1 process x 2 threads": None,
        "ray 1 replica x 2 threads": (1, 2),
        "ray 2 replicas x 1 thread": (2, 1),
    }
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    try:
        order = list(configs)
        for r in range(args.rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                shape = configs[name]
                print(f"round {r + 1}: {name}", flush=True)
                if shape is None:
                    server = PlainServer(package, 2)
                    try:
                        runs[name].append(measure(server.url, args))
                    finally:
                        server.stop()
                else:
                    opts = rs.RayOptions(str(package), replicas=shape[0], threads_per_replica=shape[1], variant="int8")
                    url = rs.deploy(opts, host="127.0.0.1", port=port)
                    try:
                        runs[name].append(measure(url, args))
                    finally:
                        serve.delete(rs.APP_NAME)
                print(f"  {runs[name][-1]}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    def med(name, key):
        return statistics.median(x[key] for x in runs[name])

    base = "serve 1 process x 2 threads"
    rows = []
    for name in configs:
        overhead = (med(name, "one_token_latency") - med(base, "one_token_latency")) * 1000
        rows.append(
            [
                name,
                round(med(name, "tok_s"), 1),
                f"{med(name, 'tok_s') / med(base, 'tok_s'):.2f}x",
                round(med(name, "latency"), 2),
                round(med(name, "one_token_latency") * 1000, 1),
                "-" if name == base else f"{overhead:+.1f}",
            ]
        )
    from results import md_table, record

    header = [
        "server",
        f"aggregate tok/s ({args.clients} clients)",
        "vs serve",
        "median request s",
        "1-token request ms",
        "Ray overhead ms/request",
    ]
    body = (
        f"GPT-2-small shape, int8, {args.clients} concurrent clients x {args.requests} greedy requests of "
        f"{args.max_tokens} tokens (prompts of mixed lengths), 2 CPUs for Ray; medians over {args.rounds} rounds in "
        "rotating order. Overhead: one client's 1-token requests, minus the same on the plain server.\n\n"
        + md_table(header, rows)
    )
    print(body)
    if not args.no_record:
        record("Ray Serve scale-out", body)


if __name__ == "__main__":
    main()
