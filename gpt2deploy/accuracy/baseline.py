"""Baseline guard: compare a check against a previous report of the same model on the same text.

Between releases, a metric may get worse than the baseline report by at most its tolerance
(``gates.GATES[name].tolerance``, overridable with ``--threshold NAME.tol=VALUE``), even when it still
passes its absolute gate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..errors import UsageError
from .gates import GATES, _fmt
from .report import REPORT_FORMAT, REPORT_VERSION


def load_baseline(path: str | Path) -> dict:
    """Read a report written by ``gpt2deploy check --json``; UsageError when it is not one."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise UsageError(f"baseline {p} {what}; pass a report written by 'gpt2deploy check --json'")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(
            f"baseline {p} is not valid JSON ({e}); pass a report written by 'gpt2deploy check --json'"
        ) from None
    except OSError as e:
        raise UsageError(f"cannot read baseline {p} ({e.strerror or e}); check its permissions") from None
    return validate_baseline(data, str(p))


def validate_baseline(data, where: str = "baseline") -> dict:
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise UsageError(f"{where} is not a gpt2deploy check report; pass a file written by 'gpt2deploy check --json'")
    if data.get("version") != REPORT_VERSION:
        raise UsageError(
            f"{where} is a check report of version {data.get('version')!r} (this gpt2deploy reads {REPORT_VERSION}); "
            "re-create it with this version"
        )
    for key in ("model", "text", "variants"):
        if not isinstance(data.get(key), dict):
            raise UsageError(f"{where} lacks the '{key}' section; re-create it with 'gpt2deploy check --json'")
    return data


def check_compatible(baseline: dict, model: Mapping, text: Mapping, where: str = "baseline") -> None:
    """UsageError when the baseline was measured on another model (dims, vocabulary, weights) or another text."""
    theirs = baseline["model"]
    diffs = [f"{k} {theirs.get(k)!r} vs {model[k]!r}" for k in model if theirs.get(k) != model[k]]
    if diffs:
        raise UsageError(
            f"{where} was measured on another model ({'; '.join(diffs[:3])}); "
            "pass a baseline report of this package's model"
        )
    t = baseline["text"]
    if t.get("sha256") != text["sha256"] or t.get("tokens") != text["tokens"]:
        raise UsageError(
            f"{where} was measured on other text ({t.get('source')}, {t.get('tokens')} tokens) than this check "
            f"({text['source']}, {text['tokens']} tokens); pass the same --text and --max-tokens as the baseline"
        )


def compare(metrics: Mapping, base_metrics: Mapping, tolerances: Mapping[str, float]) -> tuple[list[str], dict]:
    """(failures, per-gate {baseline, value, worse_by, tolerance}) of ``metrics`` against a baseline's."""
    failures, detail = [], {}
    for name, gate in GATES.items():
        base = gate.value(base_metrics)
        value = gate.value(metrics)
        worse = gate.worse_by(value, base)
        if worse is None:
            continue
        tol = tolerances[name]
        detail[name] = {"baseline": base, "value": value, "worse_by": worse, "tolerance": tol}
        if worse > tol:
            failures.append(
                f"{name} {_fmt(value)} is worse than the baseline's {_fmt(base)} by {_fmt(worse)} (tolerance "
                f"{_fmt(tol)})"
            )
    return failures, detail
