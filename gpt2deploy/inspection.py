"""`gpt2deploy inspect`: what a package holds, as a dict (``--json``) or a one-screen text summary.

Reads the manifest only (no hashing, no sessions), so it is instant on any package size.
"""

from __future__ import annotations

import os

from .manifest import VARIANT_FILES
from .package import Package

DEVICES = ("cpu", "cuda")

# Metric names in an accuracy record, most specific first.
_PPL_DELTA = ("ppl_delta", "ppl_rel_delta", "perplexity_rel_delta", "ppl_delta_rel")
_TOP1 = ("top1", "top1_agreement", "top1_agree")


def _first(metrics: dict, names: tuple[str, ...]):
    for n in names:
        if isinstance(metrics.get(n), (int, float)):
            return float(metrics[n])
    return None


def accuracy_summary(acc: dict | None) -> dict:
    """``{"passed", "ppl_delta", "top1"}`` from a manifest accuracy record or a check report entry."""
    if not acc:
        return {"passed": None, "ppl_delta": None, "top1": None}
    metrics = acc.get("metrics") or {}
    return {"passed": acc.get("passed"), "ppl_delta": _first(metrics, _PPL_DELTA), "top1": _first(metrics, _TOP1)}


def fmt_pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x * 100:+.2f}%" if signed else f"{x * 100:.2f}%"


def fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def auto_selection(manifest: dict) -> dict:
    """What ``load(variant=None)`` picks per device: {device: {"variant", "reason"}} (errors as reasons)."""
    try:
        from .runtime.select import select_variant
    except ImportError:
        return {
            d: {"variant": None, "reason": "variant selection is not available in this gpt2deploy"} for d in DEVICES
        }
    from .errors import Gpt2DeployError

    out = {}
    for device in DEVICES:
        try:
            name, reason = select_variant(manifest, device)
            out[device] = {"variant": name, "reason": reason}
        except Gpt2DeployError as e:
            out[device] = {"variant": None, "reason": str(e)}
    return out


def describe_package(path: str | os.PathLike) -> dict:
    """Everything ``inspect`` shows, JSON-serialisable."""
    pkg = Package.open(path)
    m = pkg.manifest
    variants = {}
    libraries: dict[str, set] = {}
    for name in sorted(pkg.variants, key=lambda n: list(VARIANT_FILES).index(n) if n in VARIANT_FILES else 99):
        v = pkg.variants[name]
        acc = v.get("accuracy")
        summary = accuracy_summary(acc)
        failures = (acc or {}).get("failures") or ((m.get("build") or {}).get("rejected") or {}).get(name) or []
        variants[name] = {
            "file": v.get("file"),
            "size": v.get("size"),
            "precision": v.get("precision"),
            "opset": v.get("opset"),
            "providers": v.get("providers", []),
            "kv_cache": v.get("kv_cache", "concat"),
            "ragged_rows": bool(v.get("ragged_rows")),
            "requires": v.get("requires"),
            "runs_here": _runs_here(v),
            "recipe": v.get("recipe", {}),
            "accuracy": None
            if acc is None
            else {
                **summary,
                "reference": acc.get("reference"),
                "failures": failures,
                "measured_on": acc.get("measured_on"),
            },
            "allowed_regression": bool(v.get("allowed_regression")),
            "parity": _parity_summary(v.get("parity")),
            "libraries": v.get("libraries", {}),
        }
        for lib, ver in (v.get("libraries") or {}).items():
            libraries.setdefault(lib, set()).add(ver)
    io = m["io"]
    return {
        "path": str(pkg.root),
        "format": m.get("format"),
        "schema_version": m.get("schema_version"),
        "gpt2deploy_version": m.get("gpt2deploy_version"),
        "created": m.get("created"),
        "source": m.get("source", {}),
        "model": m["model"],
        "io": {
            "inputs": [i["name"] for i in io.get("inputs", [])],
            "outputs": [o["name"] for o in io.get("outputs", [])],
            "optional_inputs": [t["name"] for t in io.get("optional_inputs") or []],
            "kv_layout": io.get("kv_layout"),
        },
        "generation": pkg.generation_defaults,
        "variants": variants,
        "libraries": {lib: sorted(vers) for lib, vers in sorted(libraries.items())},
        "build": m.get("build"),
        "auto": auto_selection(m),
        "runtime": _installed_runtime(),
    }


def _installed_runtime() -> str:
    from .compat import installed_distribution, installed_version

    return f"{installed_distribution()} {installed_version()}"


def _runs_here(v: dict) -> str:
    """ "yes", or why the installed onnxruntime cannot run the variant ("needs onnxruntime >= X ...")."""
    from .compat import runtime_problem

    return runtime_problem(v) or "yes"


def _needs(requires) -> str:
    """The requirement column: "ort>=1.22", or "-" for packages written before it was recorded."""
    need = requires.get("onnxruntime") if isinstance(requires, dict) else None
    return f"ort>={need}" if need else "-"


def _parity_summary(parity: dict | None) -> dict | None:
    if not parity:
        return None
    return {k: parity[k] for k in ("passed", "max_abs_diff", "atol", "decode_steps") if k in parity}


def format_description(info: dict) -> str:
    """The human-readable ``inspect`` text."""
    m, src = info["model"], info["source"]
    lines = [
        f"package   {info['path']}",
        f"schema    {info['format']} v{info['schema_version']}, written by gpt2deploy {info['gpt2deploy_version']} "
        f"at {info['created']}",
    ]
    if src:
        n = src.get("n_params")
        lines.append(
            f"source    {src.get('model')}"
            + (f" ({n / 1e6:.1f}M parameters" if n else " (")
            + (f", weights sha256 {src['weights_sha256'][:12]}…)" if src.get("weights_sha256") else ")")
        )
    lines.append(
        f"model     {m.get('n_layer')} layers, {m.get('n_head')} heads x {m.get('head_dim')}, hidden "
        f"{m.get('hidden_size')}, "
        f"vocab {m.get('vocab_size')}, context {m.get('n_positions')}, eos {m.get('eos_token_id')}"
    )
    n_kv = sum(1 for n in info["io"]["inputs"] if n.startswith("past_key_values."))
    optional = "".join(f" [+ {n}]" for n in info["io"].get("optional_inputs", []))
    lines.append(
        f"graph I/O input_ids, attention_mask, position_ids + {n_kv} past tensors{optional} -> logits + {n_kv} "
        f"present ({info['io']['kv_layout']})"
    )
    lines.append("")
    header = ("variant", "file", "size", "precision", "providers", "needs", "kv cache", "gate", "ppl Δ", "top-1")
    rows = [header]
    for name, v in info["variants"].items():
        acc = v["accuracy"]
        if acc is None:
            gate = "reference" if v["parity"] else "-"
        else:
            gate = "pass" if acc["passed"] else ("FAIL (kept)" if v["allowed_regression"] else "FAIL")
        providers = ",".join(p.replace("ExecutionProvider", "") for p in v["providers"]) or "-"
        rows.append(
            (
                name,
                v["file"] or "-",
                fmt_size(v["size"]),
                v["precision"] or "-",
                providers,
                _needs(v.get("requires")),
                ("in place, ragged" if v["ragged_rows"] else "in place") if v["kv_cache"] == "shared" else "concat",
                gate,
                fmt_pct(acc and acc["ppl_delta"], signed=True),
                fmt_pct(acc and acc["top1"]),
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
    for name, v in info["variants"].items():
        if v["accuracy"] and v["accuracy"].get("failures"):
            lines.append(f"  {name} gate failures: {'; '.join(map(str, v['accuracy']['failures']))}")
    build = info.get("build") or {}
    for name, why in (build.get("rejected") or {}).items():
        if name not in info["variants"]:
            lines.append(f"  {name} was not packaged: {'; '.join(map(str, why))}")
    if build and not build.get("reference_in_package", True):
        lines.append(f"  accuracy measured against {build.get('reference')}, which is not shipped in this package")
    lines.append("")
    gen = info["generation"]
    lines.append("generation " + (", ".join(f"{k}={v}" for k, v in gen.items()) if gen else "(none)"))
    libs = info["libraries"]
    lines.append(
        "libraries  " + (", ".join(f"{k} {'/'.join(v)}" for k, v in libs.items()) if libs else "(not recorded)")
    )
    if info.get("runtime"):
        here = [n for n, v in info["variants"].items() if v.get("runs_here", "yes") == "yes"]
        lines.append(f"installed  {info['runtime']}: runs {', '.join(here) or 'no variant of this package'}")
        for n, v in info["variants"].items():
            if v.get("runs_here", "yes") != "yes":
                lines.append(f"  {n} {v['runs_here']}")
    for device, pick in info["auto"].items():
        what = pick["variant"] or "none"
        lines.append(f"auto {device:<5} {what}" + (f" ({pick['reason']})" if pick.get("reason") else ""))
    return "\n".join(lines)
