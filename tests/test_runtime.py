"""Runtime generation on a tiny random package: parity with transformers, batching, seeds, streaming, stops,
EOS, the KV cache's contents, and imports that stay free of torch/transformers/onnx."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gpt2deploy
from gpt2deploy.errors import GenerationError, UsageError
from gpt2deploy.runtime.kvcache import KVStepper
from gpt2deploy.runtime.providers import cuda_available

PROMPTS = ["The quick brown fox", "In Python, a list is a mutable sequence of", "Hello"]


@pytest.fixture(scope="module", params=["shared", "concat"])
def model(request, tiny_package, tiny_portable_package):
    """The default export (GroupQueryAttention, one in-place KV buffer per tensor) and the portable one
    (plain ONNX, past and present as separate buffers): every test runs on both cache layouts."""
    pkg = tiny_package if request.param == "shared" else tiny_portable_package
    m = gpt2deploy.load(pkg, device="cpu", threads=1)
    assert m.package.variant(m.variant).get("kv_cache", "concat") == request.param
    return m


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()


def _hf_greedy(hf_model, ids: list[int], new: int) -> list[int]:
    import torch

    with torch.no_grad():
        x = torch.tensor([ids])
        out = hf_model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def test_greedy_matches_transformers_generate(model, hf_model):
    for prompt in PROMPTS:
        ids = model.encode(prompt)
        r = model.generate_ids([ids], max_new_tokens=24)
        ref = _hf_greedy(hf_model, ids, 24)
        assert r.tokens[0] == ref, prompt
        assert len(ref) == 24  # the prompt step + 23 decode steps, no early EOS
        assert r.timings["decode_steps"] == 23 and r.timings["prompt_tokens"] == len(ids)
        assert model.generate(prompt, max_new_tokens=24) == model.tokenizer.decode(ref)


def test_batch_of_different_lengths_equals_each_alone(model):
    rows = [model.encode(p) for p in PROMPTS]
    assert len({len(r) for r in rows}) == 3
    batch = model.generate_ids(rows, max_new_tokens=24)
    for i, r in enumerate(rows):
        alone = model.generate_ids([r], max_new_tokens=24)
        assert batch.tokens[i] == alone.tokens[0], i
    texts = model.generate(PROMPTS, max_new_tokens=24)
    assert isinstance(texts, list) and texts == [model.generate(p, max_new_tokens=24) for p in PROMPTS]


def test_sampled_batch_rows_equal_alone_when_greedy_limits(model):
    """top_k=1 sampling is greedy whatever the seed: batch rows still equal their solo runs."""
    rows = [model.encode(p) for p in PROMPTS[:2]]
    batch = model.generate_ids(rows, max_new_tokens=12, do_sample=True, top_k=1, seed=5)
    greedy = model.generate_ids(rows, max_new_tokens=12)
    assert batch.tokens == greedy.tokens


def test_seed_reproducible_and_different_seeds_differ(model):
    kw = dict(max_new_tokens=24, do_sample=True, temperature=1.0, top_p=0.95)
    a = model.generate(PROMPTS[0], seed=1, **kw)
    b = model.generate(PROMPTS[0], seed=1, **kw)
    c = model.generate(PROMPTS[0], seed=2, **kw)
    assert a == b
    assert a != c
    assert model.generate(PROMPTS[0], max_new_tokens=24) != a  # sampling is on
    # streaming with the same seed gives the same text
    assert "".join(model.stream(PROMPTS[0], seed=1, **kw)) == a


def test_stream_pieces_join_to_generate_text(model):
    for prompt in PROMPTS:
        s = model.stream(prompt, max_new_tokens=30)
        pieces = list(s)
        assert all(isinstance(p, str) and p for p in pieces)
        full = model.generate(prompt, max_new_tokens=30)
        assert "".join(pieces) == full == s.text
        assert full == model.tokenizer.decode(s.result.tokens[0])


def test_stop_string_cuts_before_it(model):
    prompt = PROMPTS[1]
    full = model.generate(prompt, max_new_tokens=30)
    stop = full[12:16]
    assert len(stop.strip()) > 0
    cut = full[: full.find(stop)]
    r = model.generate_result(prompt, max_new_tokens=30, stop=[stop, "\x00never"])
    assert r.texts[0] == cut and r.finish_reasons == ["stop"]
    assert stop not in r.texts[0]
    assert len(r.tokens[0]) < 30  # generation ended early
    pieces = list(model.stream(prompt, max_new_tokens=30, stop=stop))
    assert "".join(pieces) == cut
    # batch: the row with the stop ends, the other runs to its budget and equals its solo text
    texts = model.generate([prompt, PROMPTS[0]], max_new_tokens=30, stop=stop)
    other = model.generate(PROMPTS[0], max_new_tokens=30, stop=stop)
    assert texts == [cut, other]


def test_eos_stops_rows_independently(model):
    rows = [model.encode(p) for p in PROMPTS[:2]]
    free = model.generate_ids(rows, max_new_tokens=20)
    eos = free.tokens[0][5]  # pretend this token is the end of text
    first = free.tokens[0].index(eos)
    r = model.generate_ids(rows, max_new_tokens=20, eos_token_id=eos)
    assert r.tokens[0] == free.tokens[0][: first + 1] and r.finish_reasons[0] == "eos"
    alone = model.generate_ids(rows[1:], max_new_tokens=20, eos_token_id=eos)
    assert r.tokens[1] == alone.tokens[0]
    ignored = model.generate_ids(rows, max_new_tokens=20, eos_token_id=eos, ignore_eos=True)
    assert ignored.tokens == free.tokens and ignored.finish_reasons == ["length", "length"]
    # the text of an EOS-finished row excludes the EOS token's text
    text = model.generate(PROMPTS[0], max_new_tokens=20, eos_token_id=eos)
    assert text == model.decode(free.tokens[0][:first])


@pytest.mark.parametrize("opts", [{}, {"do_sample": True, "top_k": 1, "repetition_penalty": 1.3, "seed": 3}])
def test_finished_rows_leave_the_batch(model, opts):
    """A row finished mid-generation is dropped from the batch: the others go on as if it were still there."""
    from gpt2deploy.runtime.generate import Generation

    rows = [model.encode(p) for p in PROMPTS]
    o = model.options(max_new_tokens=12, ignore_eos=True, **opts)
    free = Generation(model.session, rows, o)
    for _ in free:
        pass
    gen = Generation(model.session, rows, o)
    gen.stepper = stepper = KVStepper(model.session, len(rows), gen.capacity)
    for i, _ in enumerate(gen):
        if i == 3:
            gen.finish(1, "stop")  # as a stop string would, after the row's fourth token
        if i == 6:
            gen.finish(0, "stop")
    res = gen.result()
    assert res.tokens[1] == free.tokens[1][:4] and res.tokens[0] == free.tokens[0][:7]
    assert res.tokens[2] == free.tokens[2]  # the row that stayed computes what it did beside the others
    assert res.finish_reasons == ["stop", "stop", "length"]
    assert res.timings["batch_shrinks"] == 2 and stepper.batch == 1
    # its cache, past the left padding, is the full recompute of its sequence
    seq, pad = rows[2] + res.tokens[2][:-1], max(len(r) for r in rows) - len(rows[2])
    _, present = model.session.forward(np.array([seq]))
    for got, ref in zip(stepper.cache(), present, strict=False):
        np.testing.assert_allclose(got[:, :, pad:], ref, atol=1e-4)
    # the lent stepper, now one row wide, serves a one-row generation
    again = Generation(model.session, rows[2:], o)
    again.stepper = stepper
    for _ in again:
        pass
    assert again.result().tokens[0] == free.tokens[2]


def test_kv_cache_holds_the_full_recompute(model):
    """After prefill + decode steps the bound cache equals present from one pass over the whole sequence."""
    ids = model.encode(PROMPTS[1])
    st = KVStepper(model.session, 1, len(ids) + 8)
    logits = st.prefill(np.array([ids]), np.ones((1, len(ids)), np.int64))
    seq = list(ids)
    for _ in range(6):
        tok = int(logits.argmax())
        seq.append(tok)
        logits = st.step(np.array([tok]))
    ref_logits, ref_present = model.session.forward(np.array([seq]))
    np.testing.assert_allclose(logits[0], ref_logits[0, -1], atol=1e-4)
    for got, ref in zip(st.cache(), ref_present, strict=False):
        np.testing.assert_allclose(got, ref, atol=1e-4)
    # the buffers are reused in place: their addresses never change
    assert st.ptrs[0][0] == st.sets[0][0].value.ctypes.data
    shared = model.package.variant(model.variant).get("kv_cache") == "shared"
    assert st.shared is shared and len(st.sets) == (1 if shared else 2)


@pytest.mark.parametrize("chunk", [1, 3])
def test_prompt_in_chunks_computes_what_one_run_does(model, hf_model, chunk, monkeypatch):
    """Long prompts run through the prompt step in chunks, each attending to the cache the previous wrote.

    With chunks of 1 and 3 positions: generation still equals transformers, alone and in a left-padded
    batch, and the prompt's logits and cache equal those of one run over the whole prompt.
    """
    import gpt2deploy.runtime.kvcache as kvcache
    from gpt2deploy.runtime.generate import left_pad

    monkeypatch.setattr(kvcache, "PREFILL_CHUNK", chunk)
    rows = [model.encode(p) for p in PROMPTS]
    assert max(len(r) for r in rows) > 3 * chunk
    batch = model.generate_ids(rows, max_new_tokens=10)
    for i, r in enumerate(rows):
        assert batch.tokens[i] == _hf_greedy(hf_model, r, 10), i
        assert model.generate_ids([r], max_new_tokens=10).tokens[0] == batch.tokens[i], i
    ids, mask = left_pad(rows, 0)
    one, many = (KVStepper(model.session, len(rows), ids.shape[1] + 2) for _ in range(2))
    np.testing.assert_allclose(many.prefill(ids, mask, chunk=chunk), one.prefill(ids, mask, chunk=10**6), atol=1e-5)
    real = mask.astype(bool)  # pad positions hold don't-care values
    for a, b in zip(many.cache(), one.cache(), strict=False):
        np.testing.assert_allclose(a.transpose(0, 2, 1, 3)[real], b.transpose(0, 2, 1, 3)[real], atol=1e-5)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        many.prefill(ids, mask, chunk=0)


def test_public_binding_api_fallback_gives_the_same_tokens(model):
    """Without onnxruntime's internal binding object the stepper binds through IOBinding's public methods."""
    from gpt2deploy.runtime.kvcache import _binders

    class PublicOnly:  # exposes only the documented methods
        def __init__(self, io):
            self.bind_input, self.bind_output = io.bind_input, io.bind_output

    ids = model.encode(PROMPTS[0])
    runs = []
    for public in (False, True):
        st = KVStepper(model.session, 1, len(ids) + 6)
        if public:
            st._bind_in, st._bind_out = _binders(PublicOnly(st.io), "cpu", 0)
        logits, toks = st.prefill(np.array([ids]), np.ones((1, len(ids)), np.int64)), []
        for _ in range(5):
            toks.append(int(logits.argmax()))
            logits = st.step(np.array([toks[-1]]))
        runs.append(toks)
    assert runs[0] == runs[1]


def test_left_padded_cache_rows_match(model):
    rows = [model.encode(PROMPTS[0]), model.encode(PROMPTS[1])]
    r = model.generate_ids(rows, max_new_tokens=3)
    assert r.timings["batch"] == 2 and r.prompt_tokens == [len(rows[0]), len(rows[1])]


def test_truncate_keeps_the_end_of_the_prompt(model):
    n = model.dims.n_positions
    ids = list(range(300, 300 + n))
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        model.generate_ids([ids], max_new_tokens=8)
    r = model.generate_ids([ids], max_new_tokens=8, truncate=True)
    assert r.truncated == [8] and r.prompt_tokens == [n - 8]
    assert r.tokens == model.generate_ids([ids[8:]], max_new_tokens=8).tokens


def test_default_budget_is_what_the_context_leaves(model):
    n = model.dims.n_positions  # 128 here, so the default of 128 new tokens does not fit
    r = model.generate_ids([list(range(300, 400))], ignore_eos=True)
    assert r.new_tokens == [n - 100]
    r = model.generate_ids([[300, 301]], ignore_eos=True)
    assert r.new_tokens == [n - 2]


def test_bad_options_raise_typed_errors(model):
    with pytest.raises(UsageError, match="unknown generation option"):
        model.generate("hi", max_tokens=3)
    with pytest.raises(UsageError, match="prompts must be strings"):
        model.generate([1, 2])
    with pytest.raises(GenerationError, match="empty"):
        model.generate("")
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        model.generate_ids([[1, 999999]])
    with pytest.raises(UsageError, match="stop strings apply to text"):
        model.generate_ids([[1, 2]], stop=["x"])


def test_threads_and_selection_attributes(tiny_package):
    m = gpt2deploy.load(tiny_package, device="cpu", threads=1, verify=False)
    assert m.variant == "fp32" and m.device == "cpu"
    assert "fp32" in m.selection_reason and "auto on cpu" in m.selection_reason
    with pytest.raises(UsageError, match="threads"):
        gpt2deploy.load(tiny_package, device="cpu", threads=0, verify=False)


@pytest.mark.skipif(
    not cuda_available(), reason="onnxruntime's CUDA execution provider is not available on this machine"
)
def test_cuda_matches_cpu(tiny_package, model):
    gpu = gpt2deploy.load(tiny_package, device="cuda", variant="fp32")
    assert gpu.device == "cuda"
    rows = [model.encode(p) for p in PROMPTS]
    assert gpu.generate_ids(rows, max_new_tokens=16).tokens == model.generate_ids(rows, max_new_tokens=16).tokens


_GENERATE = """
import sys
import gpt2deploy
m = gpt2deploy.load(sys.argv[1], device="cpu", threads=1)
print(repr(m.generate("Hello there", max_new_tokens=5)))
print(len(list(m.stream("Hello there", max_new_tokens=5, do_sample=True, seed=0))) > 0)
heavy = sorted(n for n in ("torch", "transformers", "onnx") if n in sys.modules)
print("HEAVY", heavy)
"""

_BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "onnx"):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, _Block())
try:
    import torch  # noqa: F401
    raise SystemExit("torch was importable")
except ImportError:
    pass
"""


def _run_py(code: str, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def test_generation_imports_no_torch_transformers_onnx(tiny_package):
    p = _run_py(textwrap.dedent(_GENERATE), tiny_package)
    assert p.returncode == 0, p.stderr
    assert "HEAVY []" in p.stdout


def test_generation_works_where_torch_cannot_be_imported(tiny_package):
    p = _run_py(textwrap.dedent(_BLOCKER) + textwrap.dedent(_GENERATE), tiny_package)
    assert p.returncode == 0, p.stderr
    assert "HEAVY []" in p.stdout and "True" in p.stdout


def test_forward_in_place_equals_plain_run(tiny_package):
    """DecoderSession.forward (used by check's probes) runs shared-KV variants the way generation does, with
    the past in a buffer written in place; it gives what the plain past/present run gives."""
    from gpt2deploy.package import Package
    from gpt2deploy.runtime.session import DecoderSession

    dec = DecoderSession(Package.open(tiny_package), "fp32", "cpu", threads=1)
    assert dec.kv_shared
    ids = np.array([[5, 6, 7, 8], [0, 0, 9, 10]], np.int64)
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], np.int64)
    runs = []
    for shared in (True, False):
        dec.kv_shared = shared
        logits, past = dec.forward(ids, mask)
        step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        step, present = dec.forward(np.array([[11], [12]], np.int64), step_mask, past=past)
        runs.append((logits, step, present))
    (la, sa, pa), (lb, sb, pb) = runs
    real = mask.astype(bool)
    assert np.abs(la[real] - lb[real]).max() <= 1e-5 and np.abs(sa - sb).max() <= 1e-5
    for x, y in zip(pa, pb, strict=False):
        assert x.shape == y.shape == (2, 4, 5, 16)
        assert np.abs(x[:, :, 2:] - y[:, :, 2:]).max() <= 1e-5
