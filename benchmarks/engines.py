"""One adapter per engine: load a model, generate exactly N greedy tokens, report when the first one appeared.

``generate(ids, n) -> (ttft_s, decode_s, total_s, generated)``: TTFT is from the call to the first new token,
decode is the time of the remaining n - 1 tokens, total is the wall clock of the call. Imports are lazy so each
worker process loads only its own engine (and the Optimum worker runs in its own environment).
"""

from __future__ import annotations

import time
from pathlib import Path


def _bytes(folder, patterns) -> int:
    return sum(f.stat().st_size for p in patterns for f in Path(folder).glob(p) if f.is_file())


class Gpt2deployEngine:
    """gpt2deploy's runtime: ``gpt2deploy.load`` + ``generate_ids``, timed as ``gpt2deploy bench`` does."""

    def __init__(self, spec: dict):
        import gpt2deploy

        self.model = gpt2deploy.load(spec["model"], variant=spec["variant"], device="cpu", threads=spec["threads"])
        self.name = f"gpt2deploy {self.model.variant}"
        from gpt2deploy.package import Package

        self.model_bytes = Package.open(spec["model"]).variant(self.model.variant)["size"]

    def generate(self, ids: list[int], n: int):
        from gpt2deploy.benchmark.measure import generate_timed

        run = generate_timed(self.model, [ids], n)
        return run.ttft, run.decode_seconds, run.total_seconds, run.new_tokens


class _FirstToken:
    """A generate() streamer that records when the first new token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.calls = 0
        self.first = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


class _HfGenerate:
    """transformers-style ``generate()`` (greedy, min_new_tokens == max_new_tokens so EOS cannot stop it)."""

    model = None
    eos = None

    def generate(self, ids: list[int], n: int):
        import torch

        streamer = _FirstToken()
        input_ids = torch.tensor([ids], dtype=torch.long)
        mask = torch.ones_like(input_ids)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=self.eos,
                streamer=streamer,
            )
        total = time.perf_counter() - t0
        ttft = (streamer.first or time.perf_counter()) - t0
        return ttft, total - ttft, total, int(out.shape[1]) - len(ids)


class TransformersEngine(_HfGenerate):
    """PyTorch eager ``GPT2LMHeadModel.generate()`` in fp32: the baseline."""

    def __init__(self, spec: dict):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec["threads"])
        torch.set_num_interop_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(spec["model"]).float().eval()
        self.eos = self.model.config.eos_token_id
        import transformers

        self.name = f"transformers {transformers.__version__} fp32"
        self.model_bytes = _bytes(spec["model"], ["*.safetensors", "*.bin"])


class OptimumEngine(_HfGenerate):
    """Optimum's ``ORTModelForCausalLM`` (exported once with Optimum's own exporter, cached beside the checkpoint)."""

    def __init__(self, spec: dict):
        from pathlib import Path

        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = spec["threads"]
        opts.inter_op_num_threads = 1
        cache = Path(spec["cache"])
        if not (cache / "config.json").is_file():
            self.prepare(spec)
        self.model = ORTModelForCausalLM.from_pretrained(
            cache, use_cache=True, session_options=opts, provider="CPUExecutionProvider"
        )
        self.eos = self.model.config.eos_token_id
        from importlib.metadata import version

        self.name = f"optimum-onnx {version('optimum-onnx')} ORTModelForCausalLM"
        self.model_bytes = _bytes(cache, ["*.onnx", "*.onnx_data", "*.onnx.data"])

    @staticmethod
    def prepare(spec: dict) -> None:
        """Export with Optimum's own exporter once (run in a process of its own so it is not in the peak RSS)."""
        import shutil

        from optimum.onnxruntime import ORTModelForCausalLM

        cache = Path(spec["cache"])
        if (cache / "config.json").is_file():
            return
        tmp = cache.with_name(cache.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model = ORTModelForCausalLM.from_pretrained(spec["model"], export=True, use_cache=True)
        model.save_pretrained(tmp)
        tmp.rename(cache)


class CTranslate2Engine:
    """CTranslate2 ``Generator.generate_tokens`` (greedy, min_length == max_length)."""

    def __init__(self, spec: dict):
        import ctranslate2
        from tokenizers import Tokenizer

        self.compute_type = spec["compute_type"]
        self.generator = ctranslate2.Generator(
            spec["model"], device="cpu", compute_type=self.compute_type, intra_threads=spec["threads"], inter_threads=1
        )
        self.tokenizer = Tokenizer.from_file(spec["tokenizer"])
        self.name = f"ctranslate2 {ctranslate2.__version__} {self.compute_type}"
        self.model_bytes = _bytes(spec["model"], ["model.bin"])

    def generate(self, ids: list[int], n: int):
        tokens = [self.tokenizer.id_to_token(i) for i in ids]
        first = None
        count = 0
        t0 = time.perf_counter()
        for _ in self.generator.generate_tokens(tokens, max_length=n, min_length=n, sampling_topk=1):
            if first is None:
                first = time.perf_counter()
            count += 1
        total = time.perf_counter() - t0
        ttft = (first or time.perf_counter()) - t0
        return ttft, total - ttft, total, count


class LlamaCppEngine:
    """llama.cpp's ``llama-bench`` on a GGUF model: decode of n tokens after the prompt's context, and the prompt
    step, one repetition each per call (see ``llamacpp.py``). It runs in a child process of the worker."""

    def __init__(self, spec: dict):
        import llamacpp

        self.spec = spec
        self.bench = llamacpp.bench
        self.name = f"llama.cpp {spec['quant']} (llama-bench, {spec['version']})"
        self.model_bytes = Path(spec["model"]).stat().st_size

    def generate(self, ids: list[int], n: int):
        s = self.spec
        ttft = len(ids) / self.bench(s["bench"], s["model"], s["threads"], len(ids), 0, 0)["avg_ts"]
        tg = self.bench(s["bench"], s["model"], s["threads"], 0, n, len(ids))["avg_ts"]
        decode = (n - 1) / tg  # the harness reports (n - 1) tokens over the decode time
        return ttft, decode, ttft + decode, n


ENGINES = {
    "gpt2deploy": Gpt2deployEngine,
    "transformers": TransformersEngine,
    "optimum": OptimumEngine,
    "ctranslate2": CTranslate2Engine,
    "llamacpp": LlamaCppEngine,
}
