"""`gpt2deploy run PACKAGE --prompt TEXT`: stream a continuation to stdout."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import typer

from .app import _silence_stdout, app, command, say

#: Longest prompt read from stdin; anything longer cannot fit a GPT-2 context anyway.
STDIN_LIMIT = 16 << 20


def _read_prompt(prompt: str) -> str:
    """The prompt text: from stdin for '-' (invalid UTF-8 replaced, with a warning), else the argument itself
    (which must be valid Unicode: a lone surrogate from an undecodable argument is refused)."""
    from ..bounds import check_text, decode_input
    from ..errors import UsageError

    if prompt != "-":
        return check_text(prompt, "--prompt")
    stream = getattr(sys.stdin, "buffer", None)
    data = stream.read(STDIN_LIMIT + 1) if stream is not None else sys.stdin.read(STDIN_LIMIT + 1)
    if len(data) > STDIN_LIMIT:
        raise UsageError(f"the prompt on stdin is longer than {STDIN_LIMIT >> 20} MiB; pass a shorter text")
    if isinstance(data, bytes):
        text, replaced = decode_input(data)
        if replaced:
            say(f"warning: the prompt on stdin is not valid UTF-8; {replaced} invalid sequence(s) replaced by U+FFFD")
    else:
        text = data
    text = text.encode("utf-8", "replace").decode("utf-8") if text else text
    return text[:-1] if text.endswith("\n") else text


@app.command("run")
@command
def run_cmd(
    package: Path = typer.Argument(..., help="Package directory (written by 'gpt2deploy export' or 'build')."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text, or '-' to read it from stdin."),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", "-n", help="Tokens to generate (default 128, or what the context leaves)."
    ),
    do_sample: bool = typer.Option(False, "--do-sample", help="Sample instead of greedy decoding."),
    temperature: float | None = typer.Option(None, help="Sampling temperature (> 0)."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample from the k most likely tokens (0 = off)."),
    top_p: float | None = typer.Option(None, "--top-p", help="Nucleus sampling mass in (0, 1] (1 = off)."),
    repetition_penalty: float | None = typer.Option(
        None, "--repetition-penalty", help="> 1 discourages repeats (1 = off)."
    ),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop before this string (repeatable)."),
    seed: int | None = typer.Option(None, help="Random seed for sampling (same seed, same text)."),
    variant: str | None = typer.Option(None, help="Variant to load (default: picked for the device)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto (CUDA when available)."),
    threads: int | None = typer.Option(None, help="ONNX Runtime intra-op threads (default: all cores)."),
    truncate: bool = typer.Option(
        False, "--truncate", help="Drop the start of a prompt that does not fit the context."
    ),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating after the end-of-text token."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON result object instead of streaming text."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the sha256 check of the package files."),
    speculative: str = typer.Option(
        "off",
        "--speculative",
        help="Speculative decoding (greedy output unchanged): auto, off, prompt-lookup, or a draft package directory.",
    ),
) -> None:
    """Generate a continuation of PROMPT with a package, streamed to stdout as it is decoded."""
    from ..errors import GenerationError, UsageError
    from ..runtime.model import load
    from ..runtime.options import SPECULATIVE_MODES, build_options

    text = _read_prompt(prompt)
    if text == "":
        raise GenerationError("the prompt is empty; pass some text with --prompt (or pipe it with --prompt -)")
    opts = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "stop": tuple(stop or ()),
        "seed": seed,
        "truncate": truncate,
        "ignore_eos": ignore_eos or None,
    }
    opts = {k: v for k, v in opts.items() if v is not None}
    draft_dir = None if speculative in SPECULATIVE_MODES else Path(speculative)
    if draft_dir is not None and not draft_dir.is_dir():
        raise UsageError(
            f"--speculative {speculative!r} is neither {', '.join(SPECULATIVE_MODES)} nor a draft package directory"
        )
    build_options({}, {**opts, "speculative": speculative if draft_dir is None else None})  # fail before the load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load(package, variant=variant, device=device, threads=threads, verify=not no_verify)
        if draft_dir is not None:
            opts["speculative"] = load(draft_dir, device=model.device, threads=threads, verify=not no_verify)
            say(f"[run] draft {draft_dir.name} variant {opts['speculative'].variant}")
        else:
            opts["speculative"] = speculative
    say(f"[run] variant {model.variant} on {model.device} ({model.selection_reason})")
    for note in model.notes:
        say(f"warning: {note}")

    stream = model.stream(text, **opts)
    if stream.gen.dropped and stream.gen.dropped[0]:
        say(
            f"[run] prompt left-truncated by {stream.gen.dropped[0]} tokens to fit the context of "
            f"{model.dims.n_positions}"
        )
    if as_json:
        for _ in stream:
            pass
    else:
        try:
            for piece in stream:
                typer.echo(piece, nl=False)
                sys.stdout.flush()
            typer.echo("")
        except BrokenPipeError:  # the reader left (e.g. `| head`): stop generating, quietly
            _silence_stdout()
            raise typer.Exit(0) from None
    result = stream.result
    t = result.timings
    spec = t.get("speculation")
    if spec and spec.get("note") and speculative != "auto":
        say(f"[run] note: {spec['note']}")
    tok_s = t.get("decode_tokens_per_second")
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "text": result.texts[0],
                    "variant": model.variant,
                    "device": model.device,
                    "selection": model.selection_reason,
                    "prompt_tokens": result.prompt_tokens[0],
                    "new_tokens": result.new_tokens[0],
                    "finish_reason": result.finish_reasons[0],
                    "truncated_tokens": result.truncated[0] if result.truncated else 0,
                    "timings": {
                        "prefill_seconds": t["prefill_seconds"],
                        "decode_seconds": t["decode_seconds"],
                        "decode_steps": t["decode_steps"],
                        "speculation": spec,
                    },
                    "tokens_per_second": tok_s,
                },
                ensure_ascii=False,
            )
        )
    else:
        speed = f", decode {tok_s:.1f} tok/s" if tok_s else ""
        if spec and spec.get("proposer") and spec["rounds"]:
            speed += f", {spec['proposer']} accepted {spec['accepted']}/{spec['proposed']} proposed tokens"
        say(
            f"[run] {result.prompt_tokens[0]} prompt tokens, {result.new_tokens[0]} new tokens "
            f"({result.finish_reasons[0]}); "
            f"prefill {t['prefill_seconds'] * 1e3:.0f} ms{speed}"
        )
