"""Load generator for ``gpt2deploy serve``: N concurrent streaming clients, prompts of mixed lengths.

    python benchmarks/serve_load.py [--pkg DIR] [--variant int8] [--threads 2] [--clients 1,8] [--requests 3]
        [--max-tokens 64] [--prompt-lens 16,64,128,256] [--max-batch 8] [--prefill-chunk 64] [--json OUT]
        [--rounds 3] [--no-record]

Defaults: the GPT-2-small-shaped (124M) random checkpoint of ``benchmarks/prepare.py``, exported and
quantized to int8 when absent; the server runs with 2 ONNX Runtime threads on 127.0.0.1.

For each client count, every client sends ``--requests`` streaming completions one after another (greedy,
EOS ignored, so each produces exactly ``--max-tokens`` tokens) with token-id prompts whose lengths cycle
through ``--prompt-lens``. Reported per client count: aggregate tok/s (all generated tokens over the phase's
wall time), time to first token p50/p99, inter-token latency (gaps between streamed chunks) p50/p99, and
each request's decode tok/s. The server's overhead is its one-client decode tok/s against
``model.generate_ids`` in this process with the same package, threads, prompt and budget (measured before
and after the one-client phase, the server idle meanwhile).

Also reported: decode tok/s, the tokens of the server's decode steps over its time in them (``/metrics``),
and the share of the wall time the decode loop spent running prompts, which decode steps wait for.

Every phase runs once per round, ``--rounds`` rounds in turn; the ratios below are medians of per-round ratios.

Targets checked: decode tok/s (and, for reference, aggregate tok/s) with the most clients >= 3x one client;
p99 inter-token latency with the most clients <= 3x the one-client median; one-client overhead <= 10% of
``generate`` decode tok/s. The machine may be shared: the ratios within one run are what this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 50000, size=n).tolist()


def start_server(
    pkg: Path, variant: str, threads: int, max_batch: int, prefill_chunk: int = 64
) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", "from gpt2deploy.cli import main; main()", "serve", str(pkg), "--port", str(port)]
    cmd += ["--variant", variant, "--threads", str(threads), "--max-batch", str(max_batch), "--log-level", "warning"]
    cmd += ["--prefill-chunk", str(prefill_chunk)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not become healthy in 300 s")


async def one_request(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    times: list[float] = []
    pieces: list[str] = []
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
                pieces.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    ttft = times[0] - t0
    itl = list(np.diff(times))
    decode = (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    text = "".join(pieces)
    return {"ttft": ttft, "itl": itl, "tokens": tokens, "decode_tok_s": decode, "prompt": prompt, "text": text}


def server_counters(url: str) -> dict[str, float]:
    """The decode loop's counters from /metrics: decode rows, decode seconds, prompt seconds."""
    import httpx

    want = ("decode_rows_total", "decode_seconds_total", "prompt_seconds_total")
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for w in want:
            if line.startswith(f"gpt2deploy_{w} "):
                out[w] = float(line.split()[1])
    return out


async def phase(url: str, clients: int, requests: int, max_tokens: int, lens: list[int]) -> dict:
    import httpx

    results: list[dict] = []

    async def client(c: int, http) -> None:
        for k in range(requests):
            n = lens[(c + k) % len(lens)]
            results.append(await one_request(http, url, prompt_ids(n, seed=1000 * c + k), max_tokens))

    limits = httpx.Limits(max_connections=clients + 2)
    before = server_counters(url)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
    after = server_counters(url)
    delta = {k: after[k] - before[k] for k in after}
    itl = [x for r in results for x in r["itl"]]
    ttft = [r["ttft"] for r in results]
    decode = [r["decode_tok_s"] for r in results if r["decode_tok_s"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "outputs": [(r["prompt"], r["text"]) for r in results],
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        # tokens of decode steps over the loop's time in them (prompt runs excluded): the batch's decode rate
        "decode_tok_s": delta["decode_rows_total"] / delta["decode_seconds_total"],
        "prompt_share": delta["prompt_seconds_total"] / wall,
        "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3),
        "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3),
        "itl_p50_ms": float(np.percentile(itl, 50) * 1e3),
        "itl_p90_ms": float(np.percentile(itl, 90) * 1e3),
        "itl_p99_ms": float(np.percentile(itl, 99) * 1e3),
        "itl_ms": [x * 1e3 for x in itl],  # every gap, for the share of long ones (dropped before the report)
        "request_decode_tok_s": statistics.median(decode),
    }


def generate_decode(model, prompt_len: int, max_tokens: int, repeat: int) -> float:
    rates = []
    for k in range(repeat):
        r = model.generate_ids([prompt_ids(prompt_len, seed=99 + k)], max_new_tokens=max_tokens, ignore_eos=True)
        rates.append(r.timings["decode_tokens_per_second"])
    return statistics.median(rates)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pkg", type=Path, default=None)
    ap.add_argument("--variant", default="int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-lens", default="16,64,128,256")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--prefill-chunk", type=int, default=64, help="the server's --prefill-chunk")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all phases; medians are reported")
    ap.add_argument(
        "--untie-lm-head",
        action="store_true",
        help="serve an int8 copy quantized with --untie-lm-head (recorded in its own section)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-record", action="store_true", help="Do not write benchmarks/RESULTS.md.")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.clients.split(",")]
    lens = [int(x) for x in args.prompt_lens.split(",")]
    pkg = args.pkg
    if pkg is None:
        import prepare

        pkg, failed = prepare.gpt2deploy_package(prepare.default_checkpoint(), [args.variant])
        if pkg is None or args.variant in failed:
            raise SystemExit(f"could not prepare the package: {failed}")
    if args.untie_lm_head:
        if args.variant != "int8":
            raise SystemExit("error: --untie-lm-head needs --variant int8")
        from decode_profile import recipe_copy

        pkg = recipe_copy(pkg, "int8untied", print, mode="int8", share_embedding=False)
        if pkg is None:
            raise SystemExit("error: the --untie-lm-head copy could not be quantized")

    import gpt2deploy

    model = gpt2deploy.load(pkg, variant=args.variant, device="cpu", threads=args.threads)
    mid_len = lens[len(lens) // 2 - 1] if len(lens) > 1 else lens[0]
    generate_decode(model, mid_len, 8, 1)  # warm-up
    proc, url = start_server(pkg, args.variant, args.threads, args.max_batch, args.prefill_chunk)
    rounds: list[list[dict]] = []  # per round, its phases in order
    gen: list[float] = []
    try:
        asyncio.run(phase(url, 1, 1, 8, lens[:1]))  # warm-up
        for _ in range(args.rounds):  # every phase once per round, so slow spells of the host hit all of them
            phases = []
            for n in counts:
                if n == 1:
                    gen.append(generate_decode(model, mid_len, args.max_tokens, 3))
                    one = asyncio.run(phase(url, 1, args.requests, args.max_tokens, [mid_len]))
                    gen.append(generate_decode(model, mid_len, args.max_tokens, 3))
                    one["label"] = f"1 (prompt {mid_len})"
                    phases.append(one)
                p = asyncio.run(phase(url, n, args.requests, args.max_tokens, lens))
                p["label"] = f"{n} (prompts {args.prompt_lens})"
                phases.append(p)
            rounds.append(phases)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    gen_tok_s = statistics.median(gen) if gen else None
    # greedy: does every request's text equal the same request run alone through generate?
    solo: dict[tuple, str] = {}
    for p in (p for phases in rounds for p in phases):
        outputs = p.pop("outputs")
        p["itl_ms"] = np.asarray(p["itl_ms"])
        for prompt, _ in outputs:
            if tuple(prompt) not in solo:
                r = model.generate_ids([prompt], max_new_tokens=args.max_tokens, ignore_eos=True)
                solo[tuple(prompt)] = model.decode(r.tokens[0])
        p["equal_to_solo"] = sum(text == solo[tuple(prompt)] for prompt, text in outputs)
    per_round: dict[str, list[float]] = {}
    for phases in rounds:
        single = next((p for p in phases if p["clients"] == 1 and "prompts" in p["label"]), None)
        top = max(phases, key=lambda p: p["clients"])
        one_fixed = next((p for p in phases if p["label"].startswith("1 (prompt ")), None)
        ratios = {}
        if single and top is not single:
            ratios["aggregate_ratio"] = top["aggregate_tok_s"] / single["aggregate_tok_s"]
            ratios["decode_ratio"] = top["decode_tok_s"] / single["decode_tok_s"]
            ratios["p99_itl_over_single_median"] = top["itl_p99_ms"] / single["itl_p50_ms"]
            # p99 <= 3x needs fewer than 1% of the gaps above 3x; a gap that spans a joining row's prompt chunk
            # (a separate pass over the weights) is one of them
            ratios["long_itl_share"] = float(np.mean(top["itl_ms"] > 3 * single["itl_p50_ms"]))
        if one_fixed and gen_tok_s:
            ratios["overhead"] = 1 - one_fixed["request_decode_tok_s"] / gen_tok_s
        for k, v in ratios.items():
            per_round.setdefault(k, []).append(v)
    checks = {k: statistics.median(v) for k, v in per_round.items()}
    for phases_of_round in rounds:
        for p in phases_of_round:
            p.pop("itl_ms")
    # one row per phase: the median of each measure over the rounds, solo matches summed
    phases = []
    for i, first in enumerate(rounds[0]):
        runs = [r[i] for r in rounds]
        row = {k: (statistics.median(x[k] for x in runs) if isinstance(v, float) else v) for k, v in first.items()}
        row["requests"] = sum(x["requests"] for x in runs)
        row["tokens"] = sum(x["tokens"] for x in runs)
        row["equal_to_solo"] = sum(x["equal_to_solo"] for x in runs)
        phases.append(row)
    top = max(phases, key=lambda p: p["clients"])
    out = {
        "phases": phases,
        "generate_decode_tok_s": gen_tok_s,
        "checks": checks,
        "checks_per_round": per_round,
        "server_exit": code,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if not args.no_record:
        from results import md_table, per_cpu_kind, record

        rows = [
            [
                p["label"],
                p["requests"],
                p["tokens"],
                round(p["aggregate_tok_s"], 1),
                round(p["decode_tok_s"], 1),
                f"{p['prompt_share'] * 100:.0f}%",
                round(p["ttft_p50_ms"], 1),
                round(p["ttft_p99_ms"], 1),
                round(p["itl_p50_ms"], 1),
                round(p["itl_p90_ms"], 1),
                round(p["itl_p99_ms"], 1),
                round(p["request_decode_tok_s"], 1),
                f"{p['equal_to_solo']}/{p['requests']}",
            ]
            for p in phases
        ]
        header = ["clients", "requests", "tokens", "aggregate tok/s", "decode tok/s", "prompt time"]
        header += ["TTFT p50 ms", "TTFT p99 ms"]
        header += ["ITL p50 ms", "ITL p90 ms", "ITL p99 ms", "per-request decode tok/s", "text = solo generate"]
        body = md_table(header, rows)
        body += f"\n\n`generate_ids` decode in-process (same package and threads): {gen_tok_s:.1f} tok/s.\n\n"

        def spread(key: str, pct: bool = False) -> str:
            v = per_round[key]
            f = (lambda x: f"{x * 100:.1f}%") if pct else (lambda x: f"{x:.2f}x")
            return f"{f(checks[key])} ({f(min(v))} - {f(max(v))})"

        targets = []
        if "aggregate_ratio" in checks:
            r = checks["decode_ratio"]
            targets.append(
                [f"decode tok/s {top['clients']} clients / 1 client", spread("decode_ratio"), ">= 3x", r >= 3]
            )
            r = checks["aggregate_ratio"]
            targets.append([f"aggregate tok/s (wall) {top['clients']} / 1", spread("aggregate_ratio"), ">= 3x", r >= 3])
            r = checks["p99_itl_over_single_median"]
            name = f"ITL p99 ({top['clients']} clients) / ITL p50 (1)"
            targets.append([name, spread("p99_itl_over_single_median"), "<= 3x", r <= 3])
            r = checks["long_itl_share"]
            name = f"share of ITLs ({top['clients']} clients) > 3x ITL p50 (1)"
            targets.append([name, spread("long_itl_share", True), "< 1% (what p99 <= 3x needs)", r < 0.01])
        if "overhead" in checks:
            r = checks["overhead"]
            targets.append(["server overhead, 1 client vs generate", spread("overhead", True), "<= 10%", r <= 0.10])
        body += md_table(["target", "measured", "goal", "met"], targets)
        body += (
            f"\n\nPackage: {Path(pkg).name} variant {args.variant}"
            + (" (quantized with --untie-lm-head)" if args.untie_lm_head else "")
            + f", {args.threads} threads, max batch "
            f"{args.max_batch}, prefill chunk {args.prefill_chunk}, {args.max_tokens} tokens per request, "
            f"{args.requests} requests per client per phase, {args.rounds} rounds of all phases in turn: the "
            "first table gives each measure's median over the rounds (requests, tokens and solo matches summed), "
            "the second the median (min - max) of the per-round ratios. Aggregate tok/s: every generated token "
            "over the phase's wall time; decode tok/s: tokens of decode steps over the server's time in decode "
            "steps (from /metrics); prompt time: the share of the wall time the decode loop spent running prompts.\n"
        )
        name = "Serve load (continuous batching" + (", int8 --untie-lm-head)" if args.untie_lm_head else ")")
        record(per_cpu_kind(name), body)
    return out


if __name__ == "__main__":
    main()
