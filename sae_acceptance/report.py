"""Reports: the JSON a CI system reads, and the tables a person reads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sae_acceptance.baseline import RegressionCheck
from sae_acceptance.render import format_table
from sae_acceptance.results import EvalReport, SAEResult
from sae_acceptance.verdict import Status

SUMMARY_METRICS = ("ce_rec", "ce_loss_score", "kl_div", "cosine", "rel_error", "r2", "l0", "alive_frac")
SUMMARY_HEADER = ("sae", "hook", *SUMMARY_METRICS, "pr_ratio", "canyon", "verdict")
REGRESSION_HEADER = ("sae", "metric", "change [paired CI] vs baseline", "verdict")


def merge_reports(reports: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """JSON reports of parts of one gate (xdist workers, shards) as one: SAEs joined, times added."""
    merged = None
    for report in reports:
        if merged is None:
            merged = {**report, "saes": dict(report["saes"])}
            continue
        merged["saes"].update(report["saes"])
        merged["timing"] = _add_timing(merged.get("timing", {}), report.get("timing", {}))
    return merged


def _add_timing(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = {key: (a.get(key) or 0) + (b.get(key) or 0) for key in ("eval_s", "n_tokens", "wall_s")}
    merged["tokens_per_s"] = merged["n_tokens"] / merged["eval_s"] if merged["eval_s"] else None
    return merged


def _metric_cell(result: SAEResult, name: str) -> str:
    metric = result.metrics.get(name)
    if metric is None:
        return "-"
    text = f"{metric.value:.3f}" if abs(metric.value) < 1e4 else f"{metric.value:.3g}"
    if name in result.verdicts:
        text += " ✓" if result.verdicts[name].passed else " ✗"
    return text


def summary_rows(results: Iterable[SAEResult]) -> list[list[str]]:
    """One row per SAE under `SUMMARY_HEADER`."""
    rows = []
    for r in results:
        geo = r.geometry
        if r.error is not None:
            cells = ["-"] * (len(SUMMARY_METRICS) + 2)
        else:
            cells = [
                *[_metric_cell(r, m) for m in SUMMARY_METRICS],
                f"{geo.pr_ratio:.4f}" if geo else "-",
                ("yes" if geo.canyon else "no") if geo else "-",
            ]
        rows.append([r.name, r.hook or "-", *cells, r.verdict_word])
    return rows


def regression_rows(checks: Iterable[tuple[str, RegressionCheck]]) -> list[list[str]]:
    """One row per (SAE, metric) under `REGRESSION_HEADER`."""
    rows = []
    for name, check in checks:
        ci = f" [{check.ci[0]:+.4f}, {check.ci[1]:+.4f}]" if check.ci else ""
        verdict = "new" if check.skipped else "ok" if check.passed else "REGRESSED"
        rows.append([name, check.metric, f"{check.change:+.4f}{ci}", verdict])
    return rows


def format_report(report: EvalReport) -> str:
    """The CLI's view: the summary table, then each failure and warning on its own line."""
    lines = [format_table(SUMMARY_HEADER, summary_rows(report.saes.values()))]
    for r in report.saes.values():
        if r.error:
            lines.append(f"ERROR {r.name}: {r.error}")
        for metric in r.verdicts:
            result = r.outcome(metric)
            if not result.as_expected:
                lines.append(f"FAIL  {r.name}: {result.message}")
            elif result.status is Status.CAUGHT:
                lines.append(f"XFAIL {r.name}: {result.message}")
        if r.r2_warning:
            lines.append(f"WARN  {r.r2_warning}")
    tokens = report.settings.get("tokens", {})
    if tokens:
        rate = report.timing.get("tokens_per_s")
        speed = f"; {rate:.0f} tokens/s" if rate else ""
        lines.append(f"{tokens['n_counted']} of {tokens['n_tokens']} tokens counted (excluded: {tokens['rule']}){speed}")
    return "\n".join(lines)
