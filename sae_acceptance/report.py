"""Reports: the JSON a CI system reads, and the table a person reads.

Writes are atomic (a temporary file in the same directory, then a rename), so a
crashed or concurrent run never leaves half a report.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sae_acceptance.evaluate import EvalReport, SAEResult

SUMMARY_METRICS = ("ce_rec", "ce_loss_score", "kl_div", "cosine", "rel_error", "r2", "l0", "alive_frac")


def write_atomic(path: str | Path, text: str) -> Path:
    """Replace `path` with `text` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a normal file, not mkstemp's private 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, payload: dict[str, Any], indent: int | None = 2) -> Path:
    return write_atomic(path, json.dumps(payload, indent=indent, allow_nan=False, default=str) + "\n")


def merge_report_json(path: str | Path, report: EvalReport) -> Path:
    """Add `report`'s SAEs to the JSON at `path` (several pytest-xdist workers share one file)."""
    from filelock import FileLock

    path = Path(path)
    with FileLock(str(path) + ".lock"):
        payload = report.to_dict()
        if path.exists():
            previous = json.loads(path.read_text())
            payload["saes"] = {**previous.get("saes", {}), **payload["saes"]}
            payload["timing"] = _add_timing(previous.get("timing", {}), payload["timing"])
        return write_json(path, payload)


def _add_timing(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = {key: (a.get(key) or 0) + (b.get(key) or 0) for key in ("eval_s", "n_tokens", "wall_s")}
    merged["tokens_per_s"] = merged["n_tokens"] / merged["eval_s"] if merged["eval_s"] else None
    return merged


def _cell(result: SAEResult, name: str) -> str:
    metric = result.metrics.get(name)
    if metric is None:
        return "-"
    text = f"{metric.value:.3f}" if abs(metric.value) < 1e4 else f"{metric.value:.3g}"
    verdict = result.verdicts.get(name)
    if verdict is not None:
        text += " ✓" if verdict.passed else " ✗"
    return text


def summary_rows(results: Iterable[SAEResult], metrics: tuple[str, ...] = SUMMARY_METRICS) -> list[list[str]]:
    rows = [["sae", "hook", *metrics, "pr_ratio", "canyon", "verdict"]]
    for r in results:
        if r.error is not None:
            rows.append([r.name, r.hook or "-", *["-"] * len(metrics), "-", "-", "ERROR"])
            continue
        geo = r.geometry
        rows.append(
            [
                r.name,
                r.hook or "-",
                *[_cell(r, m) for m in metrics],
                f"{geo.pr_ratio:.4f}" if geo else "-",
                ("yes" if geo.canyon else "no") if geo else "-",
                _verdict_word(r),
            ]
        )
    return rows


def _verdict_word(result: SAEResult) -> str:
    if not result.verdicts:
        return "no bounds"  # measured only: nothing was checked
    if not result.passed:
        return "FAIL"
    return "CAUGHT (control)" if result.expect_fail else "PASS"


def format_table(rows: list[list[str]]) -> str:
    """Plain aligned columns: readable in a terminal and in a CI log."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def format_report(report: EvalReport) -> str:
    """The CLI's view: the summary table, then each failure and warning on its own line."""
    lines = [format_table(summary_rows(report.saes.values()))]
    for r in report.saes.values():
        if r.error:
            lines.append(f"ERROR {r.name}: {r.error}")
        for metric, v in r.verdicts.items():
            if not r.as_expected(metric):
                lines.append(f"FAIL  {r.name}: {v.message}" if not v.passed else f"FAIL  {r.name}: negative control passed: {v.message}")
            elif not v.passed:
                lines.append(f"XFAIL {r.name}: negative control caught: {v.message}")
        if r.r2_warning:
            lines.append(f"WARN  {r.r2_warning}")
    tokens = report.settings.get("tokens", {})
    if tokens:
        lines.append(
            f"{tokens['n_counted']} of {tokens['n_tokens']} tokens counted (excluded: {tokens['rule']}); "
            f"{report.timing.get('tokens_per_s') or 0:.0f} tokens/s"
        )
    return "\n".join(lines)
