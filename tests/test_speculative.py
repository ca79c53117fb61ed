"""Speculative decoding: greedy output identical to plain decoding, token for token, on real text with the
trained reference model, for both proposers, batch 1 and a batch; the KV cache after rejected proposals equals
a plain run's; speculation is off (with a note) where it cannot keep output identical."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import EVAL_TEXT, GPT2_REF, requires_gpt2_ref

pytestmark = [requires_gpt2_ref, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ref_package(tmp_path_factory):
    """gpt2-ref exported (fp32, in-place KV cache) with an int4 variant."""
    from gpt2deploy.exporting import export_package
    from gpt2deploy.quantizing import quantize_package

    out = tmp_path_factory.mktemp("ref") / "pkg"
    export_package(str(GPT2_REF), out)
    quantize_package(out, "int4")
    return out


@pytest.fixture(scope="module")
def ref(ref_package):
    import gpt2deploy

    return gpt2deploy.load(ref_package, variant="fp32", device="cpu", threads=2)


@pytest.fixture(scope="module")
def eval_ids(ref):
    return ref.encode(EVAL_TEXT.read_text(encoding="utf-8")[:60_000])


def grounded_prompt(ref, ids):
    """A 300-token passage of the evaluation text, then its first tokens again: the continuation rewrites it."""
    passage = ids[2000:2300]
    return passage + ref.encode("\n\n") + passage[:12]


def plain_and_speculative(model, rows, speculative, n=64):
    plain = model.generate_ids(rows, max_new_tokens=n, ignore_eos=True, speculative="off")
    spec = model.generate_ids(rows, max_new_tokens=n, ignore_eos=True, speculative=speculative)
    return plain, spec


def test_prompt_lookup_is_greedy_token_for_token(ref, eval_ids):
    for rows in ([grounded_prompt(ref, eval_ids)], [eval_ids[5000:5032]]):
        plain, spec = plain_and_speculative(ref, rows, "prompt-lookup")
        assert spec.tokens == plain.tokens
        s = spec.timings["speculation"]
        assert s["proposer"] == "prompt-lookup" and s["rounds"] > 0 and s["accepted"] > 0
        assert spec.timings["decode_steps"] < plain.timings["decode_steps"]  # fewer model runs for the same tokens


def test_prompt_lookup_batch_left_padded(ref, eval_ids):
    """The default graphs (onnxruntime 1.22 attention schema) check guesses for one row at a time: a batch
    decodes plainly, with the reason, and gives the plain tokens."""
    rows = [grounded_prompt(ref, eval_ids)[:180], eval_ids[7000:7020], eval_ids[9000:9110]]
    plain, spec = plain_and_speculative(ref, rows, "prompt-lookup", n=64)
    assert spec.tokens == plain.tokens
    if ref.session.single_row_chunks:
        assert "one row at a time" in spec.timings["speculation"]["note"]
    else:
        assert spec.timings["speculation"]["rounds"] > 0
    assert "speculation" not in ref.generate_ids(rows, max_new_tokens=4, speculative="auto").timings  # one prompt
    auto = ref.generate_ids(rows[:1], max_new_tokens=16, ignore_eos=True, speculative="auto")
    assert auto.timings["speculation"]["proposer"] == "prompt-lookup" and auto.tokens[0] == plain.tokens[0][:16]


def test_eos_and_budget_end_rows_as_plain_decoding(ref, eval_ids):
    """Without ignore_eos and with a small budget the rows stop where the plain loop stops them."""
    rows = [grounded_prompt(ref, eval_ids), eval_ids[12000:12040]]
    for n in (1, 2, 7, 40):
        plain = ref.generate_ids(rows, max_new_tokens=n, speculative="off")
        spec = ref.generate_ids(rows, max_new_tokens=n, speculative="prompt-lookup")
        assert spec.tokens == plain.tokens and spec.finish_reasons == plain.finish_reasons


def test_text_api_and_stop_strings(ref):
    prompt = EVAL_TEXT.read_text(encoding="utf-8")[3000:4200]
    for stop in ((), ("\n\n",)):
        plain = ref.generate_result(prompt, max_new_tokens=80, stop=stop, speculative="off")
        spec = ref.generate_result(prompt, max_new_tokens=80, stop=stop, speculative="prompt-lookup")
        assert spec.texts == plain.texts and spec.finish_reasons == plain.finish_reasons


def test_draft_model_proposer(ref_package, ref, eval_ids):
    """A smaller package (here the int4 variant of the same model) drafts; the fp32 output is unchanged."""
    import gpt2deploy

    draft = gpt2deploy.load(ref_package, variant="int4", device="cpu", threads=2)
    for rows in ([grounded_prompt(ref, eval_ids)], [eval_ids[5000:5032], eval_ids[8000:8100]]):
        plain, spec = plain_and_speculative(ref, rows, draft)
        assert spec.tokens == plain.tokens
        s = spec.timings["speculation"]
        if len(rows) > 1 and ref.session.single_row_chunks:
            assert "one row at a time" in s["note"]
            continue
        assert s["proposer"] == "draft" and s["accepted"] > 0 and s["accepted"] < s["proposed"]


def test_kv_cache_after_rejected_proposals_equals_plain(ref, eval_ids):
    from gpt2deploy.runtime.generate import Generation
    from gpt2deploy.runtime.kvcache import KVStepper
    from gpt2deploy.runtime.speculative import PromptLookup, SpeculativeGeneration

    rows = [eval_ids[3000:3060], eval_ids[4000:4030]]
    if ref.session.single_row_chunks:  # the default attention schema verifies guesses for one row at a time
        rows = rows[:1]
    opts = ref.options(max_new_tokens=48, ignore_eos=True)
    plain = Generation(ref.session, rows, opts)
    spec = SpeculativeGeneration(ref.session, rows, opts, PromptLookup(min_ngram=1))
    caches = []
    for gen in (plain, spec):
        gen.stepper = KVStepper(ref.session, gen.batch, gen.capacity)
        for _ in gen:
            pass
        caches.append((gen.stepper.length, gen.stepper.cache()))
    s = spec.timings["speculation"]
    assert s["proposed"] > s["accepted"]  # some proposals were rejected and rolled back
    assert spec.tokens == plain.tokens
    assert caches[0][0] == caches[1][0]
    for a, b in zip(caches[0][1], caches[1][1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_truncate_then_step_matches_a_plain_step(ref, eval_ids):
    """A verification step with wrong guesses, rolled back, leaves the cache as one plain step would."""
    from gpt2deploy.runtime.kvcache import KVStepper

    prompt = np.array([eval_ids[100:140]])
    mask = np.ones_like(prompt)
    a, b = (KVStepper(ref.session, 1, 64) for _ in range(2))
    la = a.prefill(prompt, mask)
    b.prefill(prompt, mask)
    tok = int(la.argmax())
    nxt_plain = a.step(np.array([tok])).copy()
    wrong = [(tok + 1 + i) % ref.dims.vocab_size for i in range(5)]
    scores = b.extend(np.array([[tok, *wrong]]))
    np.testing.assert_allclose(scores[:, 0], nxt_plain, atol=1e-4, rtol=0)
    b.truncate(b.length - 5)
    assert b.length == a.length and int(b.pos[0, 0]) == int(a.pos[0, 0])
    for x, y in zip(a.cache(), b.cache(), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    g = int(nxt_plain.argmax())
    np.testing.assert_allclose(a.step(np.array([g])), b.step(np.array([g])), atol=1e-4, rtol=0)
    with pytest.raises(ValueError):
        b.truncate(10)  # not into the prompt


def test_off_with_a_note_where_it_cannot_be_exact(built_package, ref, eval_ids, monkeypatch):
    import gpt2deploy
    from gpt2deploy.runtime import speculative

    rows = [eval_ids[5000:5032]]
    # sampling keeps its exact distribution: the plain loop runs, same seed, same tokens
    sampled = ref.generate_ids(rows, max_new_tokens=16, do_sample=True, seed=3, speculative="prompt-lookup")
    assert "sampling" in sampled.timings["speculation"]["note"]
    assert sampled.tokens == ref.generate_ids(rows, max_new_tokens=16, do_sample=True, seed=3).tokens
    # int8 and int4 round activations to int8: a multi-token step cannot reproduce single steps exactly
    for variant in ("int8", "int4"):
        model = gpt2deploy.load(built_package, variant=variant, device="cpu", threads=2)
        r = model.generate_ids([[5, 6, 7, 5, 6]], max_new_tokens=8, speculative="prompt-lookup")
        assert "round activations to int8" in r.timings["speculation"]["note"], variant
        assert r.tokens == model.generate_ids([[5, 6, 7, 5, 6]], max_new_tokens=8).tokens
        assert "speculation" not in model.generate_ids([[5, 6, 7]], max_new_tokens=8, speculative="auto").timings
    # a runtime without multi-token steps with past
    monkeypatch.setattr(speculative, "_ort_version", lambda: (1, 20))
    r = ref.generate_ids(rows, max_new_tokens=8, speculative="prompt-lookup")
    assert "lacks multi-token steps with past" in r.timings["speculation"]["note"]


def test_portable_variant_and_bad_values(tiny_portable_package):
    import gpt2deploy
    from gpt2deploy.errors import UsageError

    model = gpt2deploy.load(tiny_portable_package, device="cpu")
    r = model.generate_ids([[5, 6, 7, 5, 6]], max_new_tokens=4, speculative="prompt-lookup")
    assert "in-place KV cache" in r.timings["speculation"]["note"]
    with pytest.raises(UsageError, match="speculative must be one of"):
        model.generate_ids([[5, 6]], max_new_tokens=2, speculative="ngram")
    with pytest.raises(UsageError, match="speculative must be one of"):
        model.generate_ids([[5, 6]], max_new_tokens=2, speculative=3)


def test_draft_with_another_tokenizer_is_refused(ref, package_copy):
    import gpt2deploy
    from gpt2deploy.errors import UsageError

    tok = package_copy / "tokenizer.json"
    spec = json.loads(tok.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok.write_text(json.dumps(spec), encoding="utf-8")
    other = gpt2deploy.load(package_copy, device="cpu", verify=False)
    with pytest.raises(UsageError, match="tokenizer differs"):
        ref.generate_ids([[5, 6, 7]], max_new_tokens=4, speculative=other)


def test_cli_run_speculative(ref_package, cli):
    prompt = EVAL_TEXT.read_text(encoding="utf-8")[3000:3600]
    outs = {}
    for mode in ("off", "prompt-lookup", str(ref_package)):
        r = cli("run", ref_package, "--variant", "fp32", "-p", prompt, "-n", "40", "--json", "--speculative", mode)
        assert r.exit_code == 0, r.output
        outs[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    assert outs["off"]["text"] == outs["prompt-lookup"]["text"] == outs[str(ref_package)]["text"]
    assert outs["prompt-lookup"]["timings"]["speculation"]["proposer"] == "prompt-lookup"
    assert outs[str(ref_package)]["timings"]["speculation"]["proposer"] == "draft"
    r = cli("run", ref_package, "-p", "x", "--speculative", "nope")
    assert r.exit_code == 2 and "draft package directory" in r.output
