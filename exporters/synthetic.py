"""Seeded random GPT-2 checkpoints for tests and benchmarks (speed does not depend on weight values).

Unlike Hugging Face's initialisation (zero biases, unit LayerNorm), every bias and LayerNorm parameter
here is non-zero, as in a trained checkpoint, so exporters and graph optimizers see realistic graphs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

#: GPT-2-small (124M) shape.
SMALL = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)


def make_random_checkpoint(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 64,
    n_positions: int = 128,
    seed: int = 0,
    weights: str = "safetensors",
    tie_word_embeddings: bool = True,
) -> Path:
    """Write a GPT2LMHeadModel checkpoint with the tokenizer files of ``tokenizer_dir``.

    ``tie_word_embeddings=False`` gives the lm_head its own weights, as some fine-tunes do.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer_dir = Path(tokenizer_dir)
    out_dir = Path(out_dir)
    cfg = GPT2Config(
        vocab_size=50257,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        bos_token_id=50256,
        eos_token_id=50256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith("wte.weight") or name == "lm_head.weight":
                # scaled so tiny models still produce peaked, non-uniform distributions
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=(weights == "safetensors"))
    if weights != "safetensors" and not (out_dir / "pytorch_model.bin").exists():
        # transformers 5 always writes safetensors; write the legacy format explicitly.
        for f in out_dir.glob("model*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), out_dir / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        src = tokenizer_dir / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write a seeded random GPT-2 checkpoint (default: GPT-2-small shape).")
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (e.g. ../shared/gpt2-tokenizer)")
    ap.add_argument("--layers", type=int, default=SMALL["n_layer"])
    ap.add_argument("--heads", type=int, default=SMALL["n_head"])
    ap.add_argument("--hidden", type=int, default=SMALL["n_embd"])
    ap.add_argument("--positions", type=int, default=SMALL["n_positions"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = make_random_checkpoint(a.out, a.tokenizer, a.layers, a.heads, a.hidden, a.positions, a.seed)
    print(path)


if __name__ == "__main__":
    main()
