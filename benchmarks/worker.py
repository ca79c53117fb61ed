"""One engine in its own process (so its memory is its own), driven over stdin/stdout with JSON lines.

    python worker.py SPEC.json        # {"engine", "model", "threads", "prompt", "new_tokens", "warmup", ...}
    python worker.py SPEC.json --prepare   # one-off conversions the engine needs, then exit

It loads the engine, warms up, prints {"event": "ready", ...}, then answers commands read from stdin:
``run`` (one timed generation), ``curve <json positions/steps/prompts>`` (decode speed after prompts of
growing length), ``memory`` (the process's peak and current RSS so far) and ``quit`` (the same, then exit).
Anything the libraries print goes to stderr so stdout carries only the protocol.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) if field == "VmHWM" else 0


def memory() -> dict:
    """This process's peak RSS, or its largest child's (engines that run a tool, e.g. llama-bench) if larger."""
    import resource

    peak = max(_status_kb("VmHWM"), int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
    return {"peak_rss_mb": round(peak / 1024, 1), "rss_mb": round(_status_kb("VmRSS") / 1024, 1)}


def timed(engine, ids: list[int], n: int) -> dict:
    ttft, decode, total, got = engine.generate(ids, n)
    if got != n:
        raise RuntimeError(f"{engine.name} generated {got} tokens instead of {n}")
    return {
        "ttft_ms": ttft * 1000.0,
        "decode_tok_s": (n - 1) / decode if n > 1 and decode > 0 else None,
        "e2e_tok_s": n / total,
        "total_s": total,
    }


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        with open(sys.argv[1]) as f:
            spec = json.load(f)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from engines import ENGINES

        cls = ENGINES[spec["engine"]]
        if "--prepare" in sys.argv[2:]:
            if hasattr(cls, "prepare"):
                cls.prepare(spec)
            send({"event": "prepared"})
            return
        t0 = time.perf_counter()
        engine = cls(spec)
        load_s = time.perf_counter() - t0
        for _ in range(spec.get("warmup", 1)):
            timed(engine, spec["prompt"], spec["new_tokens"])
        send(
            {
                "event": "ready",
                "name": engine.name,
                "load_s": load_s,
                "model_mb": round(getattr(engine, "model_bytes", 0) / 2**20, 1),
                **memory(),
            }
        )
    except Exception as e:  # report why this engine cannot run, the harness goes on without it
        traceback.print_exc()
        send({"event": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
        return

    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "run":
                send({"event": "run", **timed(engine, spec["prompt"], spec["new_tokens"])})
            elif cmd == "curve":
                req = json.loads(arg)
                points = []
                for p, ids in zip(req["positions"], req["prompts"], strict=False):
                    # the run with the median decode speed of req["repeat"] runs
                    runs = sorted(
                        (timed(engine, ids, req["steps"] + 1) for _ in range(req.get("repeat", 1))),
                        key=lambda r: r["decode_tok_s"] or 0.0,
                    )
                    r = runs[len(runs) // 2]
                    points.append(
                        {
                            "position": p,
                            "end": p + req["steps"],
                            "decode_tok_s": r["decode_tok_s"],
                            "prefill_ms": r["ttft_ms"],
                        }
                    )
                send({"event": "curve", "points": points})
            elif cmd == "memory":
                send({"event": "memory", **memory()})
            elif cmd == "quit":
                send({"event": "bye", **memory()})
                return
            else:
                send({"event": "error", "error": f"unknown command {cmd!r}"})
        except Exception as e:
            traceback.print_exc()
            send({"event": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})


if __name__ == "__main__":
    main()
