"""Server metrics in the Prometheus text format (no client library needed): counters, gauges, histograms."""

from __future__ import annotations

import threading

#: Histogram bucket upper bounds in seconds (time to first token, inter-token latency).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OUTCOMES = ("ok", "cancelled", "rejected", "invalid", "error")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for b, c in zip(self.buckets, self.counts, strict=False):
            cum += c
            out.append(f'{name}_bucket{{le="{b}"}} {cum}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """Thread-safe: the decode loop and the request handlers both update it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rows_cancelled = 0
        self.queue_depth = 0
        self.batch_size = 0
        self.steps = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def request(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] += 1

    def tokens(self, prompt: int = 0, completion: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def loop_state(self, queue_depth: int, batch_size: int, steps: int = 0, cancelled: int = 0) -> None:
        with self._lock:
            self.queue_depth, self.batch_size = queue_depth, batch_size
            self.steps += steps
            self.rows_cancelled += cancelled

    def render(self) -> str:
        p = "gpt2deploy"
        with self._lock:
            lines = [
                f"# HELP {p}_requests_total Completion requests by outcome.",
                f"# TYPE {p}_requests_total counter",
                *(f'{p}_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()),
                f"# HELP {p}_prompt_tokens_total Prompt tokens processed.",
                f"# TYPE {p}_prompt_tokens_total counter",
                f"{p}_prompt_tokens_total {self.prompt_tokens}",
                f"# HELP {p}_completion_tokens_total Tokens generated.",
                f"# TYPE {p}_completion_tokens_total counter",
                f"{p}_completion_tokens_total {self.completion_tokens}",
                f"# HELP {p}_rows_cancelled_total Sequences that left the batch because their client went away.",
                f"# TYPE {p}_rows_cancelled_total counter",
                f"{p}_rows_cancelled_total {self.rows_cancelled}",
                f"# HELP {p}_decode_steps_total Batched decode steps run.",
                f"# TYPE {p}_decode_steps_total counter",
                f"{p}_decode_steps_total {self.steps}",
                f"# HELP {p}_queue_depth Sequences waiting for a place in the batch.",
                f"# TYPE {p}_queue_depth gauge",
                f"{p}_queue_depth {self.queue_depth}",
                f"# HELP {p}_batch_size Sequences in the running batch.",
                f"# TYPE {p}_batch_size gauge",
                f"{p}_batch_size {self.batch_size}",
                f"# HELP {p}_time_to_first_token_seconds From request arrival to its first token.",
                f"# TYPE {p}_time_to_first_token_seconds histogram",
                *self.ttft.lines(f"{p}_time_to_first_token_seconds"),
                f"# HELP {p}_inter_token_latency_seconds Between consecutive tokens of one sequence.",
                f"# TYPE {p}_inter_token_latency_seconds histogram",
                *self.itl.lines(f"{p}_inter_token_latency_seconds"),
            ]
        return "\n".join(lines) + "\n"
