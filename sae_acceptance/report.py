"""Reports: the JSON a CI system reads, and the tables a person reads."""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sae_acceptance.baseline import RegressionCheck
from sae_acceptance.errors import SAEAcceptanceError
from sae_acceptance.geometry import LayerGeometry
from sae_acceptance.io import write_atomic
from sae_acceptance.metrics import latent_densities
from sae_acceptance.render import format_table
from sae_acceptance.results import EvalReport, SAEResult, SpliceResult
from sae_acceptance.verdict import MetricValue, Status, Verdict

SUMMARY_METRICS = ("ce_rec", "ce_loss_score", "kl_div", "cosine", "rel_error", "r2", "l0", "alive_frac")
SUMMARY_HEADER = ("sae", "hook", *SUMMARY_METRICS, "pr_ratio", "canyon", "verdict")
REGRESSION_HEADER = ("sae", "metric", "change [paired CI] vs baseline", "verdict")
SPLICE_METRICS_SHOWN = ("ce_rec", "ce_loss_score", "kl_div")
SPLICE_HEADER = ("splice", "saes", *SPLICE_METRICS_SHOWN, "verdict")


class ReportError(SAEAcceptanceError):
    """Reports that cannot be merged: a shard missing, repeated, cut short, or not a shard's."""


def merge_reports(reports: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """JSON reports of parts of one gate (xdist workers, shards) as one: SAEs joined, times added."""
    merged = None
    for report in reports:
        if merged is None:
            merged = {**report, "saes": dict(report["saes"]), "eval": dict(report.get("eval", {}))}
            merged["splices"] = dict(report.get("splices", {}))
            continue
        merged["saes"].update(report["saes"])
        merged["splices"].update(report.get("splices", {}))
        merged["timing"] = _add_timing(merged.get("timing", {}), report.get("timing", {}))
        part = report.get("eval", {})  # a part that evaluated nothing has no tokens or models
        if "tokens" in part:
            merged["eval"].setdefault("tokens", part["tokens"])
        if "models" in part:
            merged["eval"]["models"] = {**merged["eval"].get("models", {}), **part["models"]}
    return merged


def shard_record(index: int, count: int, saes: list[str]) -> dict[str, Any]:
    """What a shard's JSON report says of itself, so `merge` can tell a missing or partial shard."""
    return {"index": index, "count": count, "saes": list(saes)}


def merge_shards(shards: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Shard reports ((where, JSON)) as the one report a single run writes. Every shard of the
    count must be there once, each with a result for every SAE of its share; otherwise one
    error naming the shard."""
    count = None
    by_index: dict[int, tuple[str, dict[str, Any]]] = {}
    for where, report in shards:
        shard = report.get("shard") if isinstance(report, dict) else None
        if not isinstance(shard, dict) or not {"index", "count", "saes"} <= set(shard):
            raise ReportError(
                f'{where}: not a shard\'s report (no "shard": {{index, count, saes}}; run with --shard I/N)'
            )
        if count is not None and shard["count"] != count:
            raise ReportError(f"{where}: shard {shard['index']}/{shard['count']}, the others are of {count}")
        count = shard["count"]
        if shard["index"] in by_index:
            raise ReportError(f"{where}: shard {shard['index']}/{count} again (also {by_index[shard['index']][0]})")
        missing = [name for name in shard["saes"] if name not in report.get("saes", {})]
        if missing:
            raise ReportError(
                f"{where}: shard {shard['index']}/{count} failed or was cut short: no result for {', '.join(missing)}"
            )
        by_index[shard["index"]] = (where, report)
    absent = [f"{i}/{count}" for i in range(1, (count or 0) + 1) if i not in by_index]
    if absent:
        raise ReportError(f"shard {', '.join(absent)} missing (got {', '.join(w for w, _ in by_index.values())})")
    merged = merge_reports(report for _, (_, report) in sorted(by_index.items()))
    merged.pop("shard", None)
    return merged


def report_from_json(report: dict[str, Any]) -> EvalReport:
    """An `EvalReport` back from its JSON, as far as tables and verdicts need (no sums, no geometry
    beyond the canyon flag): how `merge` prints and decides exactly as a single run."""

    def value(stored: dict[str, Any]) -> MetricValue:
        ci = stored.get("ci")
        return MetricValue(_number(stored.get("value")), None if ci is None else tuple(_number(c) for c in ci))

    saes = {}
    for name, sae in report["saes"].items():
        fields = {
            key: sae.get(key)
            for key in (
                "model",
                "hook",
                "layer",
                "architecture",
                "d_in",
                "d_sae",
                "k",
                "r2_warning",
                "error",
                "tokens_fingerprint",
                "excluded_ids",
            )
        }
        saes[name] = SAEResult(
            name=name,
            path=sae.get("path"),
            expect_fail=list(sae.get("expect_fail") or []),
            **fields,
            metrics={m: value(v) for m, v in (sae.get("metrics") or {}).items()},
            verdicts={
                m: Verdict(**{**v, "checked": _number(v.get("checked"))})
                for m, v in (sae.get("verdicts") or {}).items()
            },
            geometry=None if sae.get("geometry") is None else LayerGeometry(**sae["geometry"]),
        )
    splices = {
        name: SpliceResult(
            name=name,
            saes=list(s.get("saes") or []),
            hooks=list(s.get("hooks") or []),
            model=s.get("model"),
            error=s.get("error"),
            tokens_fingerprint=s.get("tokens_fingerprint"),
            excluded_ids=s.get("excluded_ids"),
            expect_fail=list(s.get("expect_fail") or []),
            metrics={m: value(v) for m, v in (s.get("metrics") or {}).items()},
            verdicts={
                m: Verdict(**{**v, "checked": _number(v.get("checked"))}) for m, v in (s.get("verdicts") or {}).items()
            },
        )
        for name, s in (report.get("splices") or {}).items()
    }
    return EvalReport(settings=report.get("eval", {}), timing=report.get("timing", {}), saes=saes, splices=splices)


def _number(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _add_timing(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = {key: (a.get(key) or 0) + (b.get(key) or 0) for key in ("eval_s", "n_tokens", "wall_s")}
    merged["tokens_per_s"] = merged["n_tokens"] / merged["eval_s"] if merged["eval_s"] else None
    return merged


def _metric_cell(result: SAEResult | SpliceResult, name: str) -> str:
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


def splice_rows(splices: Iterable[SpliceResult]) -> list[list[str]]:
    """One row per `[[splice]]` group under `SPLICE_HEADER`."""
    rows = []
    for r in splices:
        cells = ["-"] * len(SPLICE_METRICS_SHOWN) if r.error else [_metric_cell(r, m) for m in SPLICE_METRICS_SHOWN]
        rows.append([r.name, " + ".join(r.saes), *cells, r.verdict_word])
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
    if report.splices:
        lines.append(format_table(SPLICE_HEADER, splice_rows(report.splices.values())))
    for r in report.entries:
        label = r.name if isinstance(r, SAEResult) else f"splice {r.name}"
        if r.error:
            lines.append(f"ERROR {label}: {r.error}")
        for metric in r.verdicts:
            result = r.outcome(metric)
            if not result.as_expected:
                lines.append(f"FAIL  {label}: {result.message}")
            elif result.status is Status.CAUGHT:
                lines.append(f"XFAIL {label}: {result.message}")
        if getattr(r, "r2_warning", None):
            lines.append(f"WARN  {r.r2_warning}")
    tokens = report.settings.get("tokens", {})
    if tokens:
        rate = report.timing.get("tokens_per_s")
        speed = f"; {rate:.0f} tokens/s" if rate else ""
        lines.append(
            f"{tokens['n_counted']} of {tokens['n_tokens']} tokens counted (excluded: {tokens['rule']}){speed}"
        )
    return "\n".join(lines)


def format_regressions(checks: list[tuple[str, RegressionCheck]], errors: list[tuple[str, str]]) -> str:
    """The CLI's view of the regression checks: their table, then each failure and error on its
    own line (the words of the pytest items: skipped as new, failed, error)."""
    lines = [format_table(REGRESSION_HEADER, regression_rows(checks))] if checks else []
    lines += [f"FAIL  {name}: {check.message}" for name, check in checks if not check.passed and not check.skipped]
    lines += [f"ERROR {name}: {message}" for name, message in errors]
    return "\n".join(lines)


def check_record(name: str, check: RegressionCheck) -> dict[str, Any]:
    """A regression check as plain data (what xdist workers send, what the HTML report reads)."""
    return {"name": name, **dataclasses.asdict(check), "ci": None if check.ci is None else list(check.ci)}


def check_from_record(record: dict[str, Any]) -> tuple[str, RegressionCheck]:
    fields = {k: v for k, v in record.items() if k != "name"}
    fields["ci"] = None if fields.get("ci") is None else tuple(fields["ci"])
    return record["name"], RegressionCheck(**fields)


def latent_record(result: SAEResult) -> dict[str, Any]:
    """An SAE's per-latent firing counts over the counted tokens, as plain data."""
    return {"fired": result.sums.fired.tolist(), "n_tokens": float(result.sums.scalars["n_tokens"].sum())}


def latents_of(report: EvalReport) -> dict[str, dict[str, Any]]:
    return {name: latent_record(r) for name, r in report.saes.items() if r.sums is not None}


def densities_path(json_path: Path, sae: str) -> Path:
    """Where an SAE's per-latent densities go: `<report>.<sae>.densities.npz` beside the JSON report."""
    return json_path.with_name(f"{json_path.stem}.{sae}.densities.npz")


def write_densities(json_path: Path, latents: dict[str, dict[str, Any]], dense_threshold: float) -> list[Path]:
    """Per SAE, a compressed npz beside the JSON report: `density` (firing share of counted tokens,
    per latent), `fired` (counts), `n_tokens`, `dense_threshold`."""
    written = []
    for name, record in latents.items():
        fired = np.asarray(record["fired"], dtype=np.int64)
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            density=latent_densities(fired, record["n_tokens"]),
            fired=fired,
            n_tokens=np.float64(record["n_tokens"]),
            dense_threshold=np.float64(dense_threshold),
        )
        written.append(write_atomic(densities_path(json_path, name), buffer.getvalue()))
    return written
