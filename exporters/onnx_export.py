"""GPT2LMHeadModel -> one ONNX graph with past/present KV tensors (Optimum I/O names).

The same graph serves the prompt step (past length 0) and decode steps. Axes batch, sequence and past
are dynamic; ids are int64; the KV layout is [batch, heads, seq, head_dim].
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

from .errors import ExportError
from .logits_to_keep import NAME as LOGITS_TO_KEEP
from .logits_to_keep import add_logits_to_keep

MIN_OPSET = 18  # the dynamo exporter's minimum
MAX_OPSET = 23
DEFAULT_OPSET = 18
PROTOBUF_LIMIT = 2_000_000_000  # bytes; larger graphs keep weights in model.onnx.data

BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = "past_sequence_length + sequence_length"


def input_names(n_layer: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(n_layer):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(n_layer: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layer):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def model_dims(config) -> dict:
    """Plain dims of a GPT2Config."""
    return {
        "model_type": "gpt2",
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "head_dim": config.n_embd // config.n_head,
        "hidden_size": config.n_embd,
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", True)),
    }


def check_opset(opset: int) -> None:
    if not isinstance(opset, int) or opset < MIN_OPSET or opset > MAX_OPSET:
        raise ExportError(
            f"opset {opset} is not supported; pass --opset between {MIN_OPSET} and {MAX_OPSET} (default "
            f"{DEFAULT_OPSET})"
        )


class CachedLM:
    """Wraps GPT2LMHeadModel as f(input_ids, attention_mask, position_ids, past) -> (logits, *present)."""

    def __new__(cls, model):
        import torch
        from transformers import DynamicCache

        config = model.config

        class _Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, past):
                pairs = [(past[2 * i], past[2 * i + 1]) for i in range(config.n_layer)]
                cache = DynamicCache(ddp_cache_data=pairs, config=config)
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=True,
                )
                result = [out.logits]
                for layer in cache.layers:
                    result += [layer.keys, layer.values]
                return tuple(result)

        return _Wrapper().eval()


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's chatter (progress lines, warnings) so the CLI owns the output."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "onnxscript", "transformers", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=False):
            lg.setLevel(lvl)


def export_onnx(model, onnx_path: str | Path, opset: int = DEFAULT_OPSET) -> dict:
    """Export ``model`` (GPT2LMHeadModel, eval, fp32) to ``onnx_path``.

    Returns plain metadata: dims, input/output names, whether weights went to external data.
    """
    import torch
    from torch.export import Dim

    check_opset(opset)
    config = model.config
    n_layer, n_head = config.n_layer, config.n_head
    head_dim = config.n_embd // n_head
    wrapper = CachedLM(model)

    # Trace with past length >= 2 and sequence >= 2 so no axis specialises to 0/1.
    b, s, p = 2, 3, 4
    ids = torch.randint(0, min(config.vocab_size, 1000), (b, s), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous()
    past = [torch.zeros(b, n_head, p, head_dim) for _ in range(2 * n_layer)]

    batch, seq, past_len = Dim(BATCH), Dim(SEQ), Dim(PAST)
    total = Dim("total_sequence_length")
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        [{0: batch, 2: past_len}] * (2 * n_layer),
    )
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding/lm_head counted once
    external = n_params * 4 > PROTOBUF_LIMIT
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (ids, mask, pos, past),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names(n_layer),
                output_names=output_names(n_layer),
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(
            f"torch.onnx.export failed ({type(e).__name__}: {reason}); check that torch and transformers are the "
            "supported versions"
        ) from None
    with _quiet():
        if external:
            program.save(str(onnx_path), external_data=True)
            data = onnx_path.with_name(onnx_path.name + ".data")
            if not data.exists():  # exporter versions name it differently; normalise
                cands = [f for f in onnx_path.parent.iterdir() if f.name != onnx_path.name]
                if len(cands) == 1:
                    os.replace(cands[0], data)
        else:
            program.save(str(onnx_path))
    _finalize_on_disk(onnx_path)
    return {
        "inputs": input_names(n_layer),
        "optional_inputs": [LOGITS_TO_KEEP],
        "outputs": output_names(n_layer),
        "external_data": external,
        "n_params": int(n_params),
        "opset": opset,
    }


def _finalize_on_disk(onnx_path: Path) -> None:
    """Give the dynamic axes Optimum's names, add the optional ``logits_to_keep`` input, drop debug metadata.

    The mask/present length becomes 'past_sequence_length + sequence_length'. Per-node metadata (stack
    traces with the exporting machine's file paths, fx node dumps) is removed so the same checkpoint gives
    byte-identical graphs wherever it is exported, and packages carry no builder paths.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for vi in list(model.graph.input) + list(model.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param not in (BATCH, SEQ, PAST, TOTAL):
                if vi.name == "attention_mask" or vi.name.startswith("present."):
                    d.dim_param = TOTAL
    add_logits_to_keep(model)
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for item in (*g.node, *g.value_info, *g.input, *g.output, *g.initializer):
            del item.metadata_props[:]
        for node in g.node:
            node.doc_string = ""
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
    for fn in model.functions:
        for node in fn.node:
            del node.metadata_props[:]
    onnx.save(model, str(onnx_path))
