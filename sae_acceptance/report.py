"""Reports: the tables a person reads, the lines the CLI prints, merging reports of parts of a
gate, and each SAE's per-latent densities beside the JSON report."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sae_acceptance.errors import ReportError
from sae_acceptance.io import npz_within, write_atomic
from sae_acceptance.render import format_table
from sae_acceptance.results import CLTResult, EntryResult, EvalReport, Latents, SAEResult, SpliceResult
from sae_acceptance.verdict import EntryStatus, Status

SUMMARY_METRICS = (
    "ce_rec",
    "ce_loss_score",
    "kl_div",
    "cosine",
    "rel_error",
    "r2",
    "l0",
    "alive_frac",
    "error_kl_ratio",
    "grad_alignment",
)
SUMMARY_HEADER = ("sae", "hook", *SUMMARY_METRICS, "pr_ratio", "canyon", "verdict")
REGRESSION_HEADER = ("entry", "metric", "change [paired CI] vs baseline", "verdict")
SPLICE_METRICS_SHOWN = ("ce_rec", "ce_loss_score", "kl_div")
SPLICE_HEADER = ("splice", "saes", *SPLICE_METRICS_SHOWN, "verdict")
CLT_HEADER = ("clt", "layers", *SPLICE_METRICS_SHOWN, "verdict")


def merge_reports(reports: Iterable[EvalReport]) -> EvalReport | None:
    """Reports of parts of one gate (pytest processes, shards) as one: entries joined, times added,
    the eval settings of the first part that evaluated anything."""
    parts = list(reports)
    if not parts:
        return None
    settings: dict[str, Any] = {}
    for part in parts:  # a part that evaluated nothing has no settings, tokens or models
        for key, value in part.settings.items():
            if key == "models":
                settings["models"] = {**settings.get("models", {}), **value}
            else:
                settings.setdefault(key, value)
    merged = EvalReport(settings=settings, timing={}, saes={}, splices={})
    for part in parts:
        merged.saes.update(part.saes)
        merged.splices.update(part.splices)
        merged.clts.update(part.clts)
        if part.timing:  # a part that evaluated nothing took no time
            merged.timing = _add_timing(merged.timing, part.timing)
    return merged


def _add_timing(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = {key: (a.get(key) or 0) + (b.get(key) or 0) for key in ("eval_s", "n_tokens", "wall_s")}
    merged["tokens_per_s"] = merged["n_tokens"] / merged["eval_s"] if merged["eval_s"] else None
    return merged


def merge_shards(shards: list[tuple[str, EvalReport]], run: str | None = None) -> EvalReport:
    """Shard reports ((where, report)) as the one report a single run writes. Every shard of the
    count must be there once, each with a result for every SAE it was given, and all of one run:
    the same run id (`run`, when given), the same fingerprint, the same token data. Otherwise
    one error naming the offending file."""
    first: dict[str, tuple[str, Any]] = {}
    by_index: dict[int, tuple[str, EvalReport]] = {}

    def same(what: str, value: object, where: str, explain: str) -> None:
        seen = first.setdefault(what, (where, value))
        if seen[1] != value:
            raise ReportError(f"{where}: {explain} than {seen[0]} ({what} {value!r}, there {seen[1]!r}); refused")

    if run is not None:
        first["run"] = ("--run-id", run)
    for where, report in shards:
        shard = report.shard
        if shard is None:
            raise ReportError(
                f'{where}: not a shard\'s report (no "shard": {{index, count, saes}}; run with --shard I/N)'
            )
        same("run", shard.run, where, "belongs to another run (a file left from an earlier run?)")
        same(
            "fingerprint", shard.fingerprint, where, "ran another gate (thresholds file, baseline, settings or version)"
        )
        same("count", shard.count, where, f"is shard {shard.index}/{shard.count}, of another count")
        tokens = report.settings.get("tokens", {}).get("fingerprint")
        if tokens is not None:
            same("token data", tokens, where, "evaluated other token data")
        if shard.index in by_index:
            raise ReportError(f"{where}: shard {shard.index}/{shard.count} again (also {by_index[shard.index][0]})")
        done = {*report.saes, *(clt.key for clt in report.clts.values())}
        missing = [name for name in shard.saes if name not in done]
        if missing:
            raise ReportError(
                f"{where}: shard {shard.index}/{shard.count} failed or was cut short: no result for {', '.join(missing)}"
            )
        by_index[shard.index] = (where, report)
    count = int(first["count"][1]) if "count" in first else 0  # type-checked by ShardRecord
    if len(by_index) < count:
        absent = []
        for i in range(1, count + 1):  # the first few, without sizing anything from the count
            if i not in by_index:
                absent.append(f"{i}/{count}")
            if len(absent) == 3:
                break
        more = count - len(by_index) - len(absent)
        listed = ", ".join(absent) + (f" and {more} more" if more > 0 else "")
        raise ReportError(f"shard {listed} missing (got {', '.join(w for w, _ in by_index.values())})")
    merged = merge_reports(report for _, (_, report) in sorted(by_index.items()))
    if merged is None:
        raise ReportError("no shard reports given")
    return merged


def _metric_cell(result: EntryResult, name: str) -> str:
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
        rows.append([r.name, r.hook or "-", *cells, r.status.word])
    return rows


def splice_rows(splices: Iterable[SpliceResult]) -> list[list[str]]:
    """One row per `[[splice]]` group under `SPLICE_HEADER`."""
    rows = []
    for r in splices:
        cells = ["-"] * len(SPLICE_METRICS_SHOWN) if r.error else [_metric_cell(r, m) for m in SPLICE_METRICS_SHOWN]
        rows.append([r.name, " + ".join(r.saes), *cells, r.status.word])
    return rows


CLT_LAYER_HEADER = ["clt", "layer", "reads", "writes", "nmse", "cosine", "l0"]


def clt_rows(clts: Iterable[CLTResult]) -> list[list[str]]:
    """One row per `[[clt]]` under `CLT_HEADER`."""
    rows = []
    for r in clts:
        cells = ["-"] * len(SPLICE_METRICS_SHOWN) if r.error else [_metric_cell(r, m) for m in SPLICE_METRICS_SHOWN]
        what = f"{r.clt_kind or 'CLT'}, {len(r.hooks)} layers" if r.hooks else "-"
        rows.append([r.name, what, *cells, r.status.word])
    return rows


def clt_layer_rows(clts: Iterable[CLTResult]) -> list[list[str]]:
    """Per CLT and layer, the MLP output's reconstruction inside the replacement forward."""
    return [
        [
            r.name,
            str(row["layer"]),
            row["hook_in"],
            row["hook_out"],
            *(_float(row[k]) for k in ("nmse", "cosine", "l0")),
        ]
        for r in clts
        for row in r.layers
    ]


def _float(value: Any) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def regression_rows(report: EvalReport) -> list[list[str]]:
    """One row per (entry, metric) compared with the baseline, under `REGRESSION_HEADER`."""
    rows = []
    for result in report.entries:
        for check in result.regressions.values():
            ci = f" [{check.ci[0]:+.4f}, {check.ci[1]:+.4f}]" if check.ci else ""
            change = f"{check.change:+.4f}{ci}" if check.status is not Status.NEW else "-"
            rows.append([result.key, check.metric, change, check.status.word])
    return rows


def tables(report: EvalReport, markdown: bool = False) -> list[tuple[str, str]]:
    """The report's tables as (title, table): the gate's, the splices', the CLTs' (and their
    layers') and the regression checks', each where it has rows."""
    out = []
    if report.saes:
        out.append(("SAEs", format_table(SUMMARY_HEADER, summary_rows(report.saes.values()), markdown)))
    if report.splices:
        out.append(("Splices", format_table(SPLICE_HEADER, splice_rows(report.splices.values()), markdown)))
    if report.clts:
        out.append(("Cross-layer transcoders", format_table(CLT_HEADER, clt_rows(report.clts.values()), markdown)))
        layers = clt_layer_rows(report.clts.values())
        if layers:
            out.append(("CLT layers", format_table(CLT_LAYER_HEADER, layers, markdown)))
    changes = regression_rows(report)
    if changes:
        out.append(("Regression changes against the baseline", format_table(REGRESSION_HEADER, changes, markdown)))
    return out


def problems(result: EntryResult) -> list[tuple[str, str, str]]:
    """An entry's lines worth a look: (kind, node, message). Kind ERROR (not evaluated or not
    compared), FAIL (a check not as expected), XFAIL (a caught control) or WARN (R² in the
    canyon); nodes are `<key>` or `<key>::<check>`, as pytest names them."""
    if result.error:
        return [("ERROR", result.key, result.error)]
    found = []
    for metric in result.verdicts:
        decided = result.outcome(metric)
        if not decided.as_expected:
            found.append(("FAIL", f"{result.key}::{metric}", decided.message))
        elif decided.status is Status.CAUGHT:
            found.append(("XFAIL", f"{result.key}::{metric}", decided.message))
    if isinstance(result, SAEResult) and result.r2_warning:
        found.append(("WARN", f"{result.key}::r2", result.r2_warning))
    if result.baseline_error:
        found.append(("ERROR", result.key, result.baseline_error))
    for check in result.regressions.values():
        if not check.passed:
            found.append(("FAIL", f"{result.key}::regression_{check.metric}", check.message))
    return found


def worst_lines(report: EvalReport) -> list[str]:
    """For each SAE that failed a check (a caught control too), the context its reconstruction
    hurts most: the text before it, the token it should predict, the CE before and after."""
    lines = []
    for r in report.saes.values():
        if r.error is None and r.worst_contexts and r.status in (EntryStatus.FAIL, EntryStatus.CONTROL):
            w = r.worst_contexts[0]
            context = w.get("text") or " ".join(map(str, w["window"]))
            target = w.get("target_text") or str(w["target"])
            lines.append(
                f"WORST {r.name}: {_clip(context)!r} -> {target!r}: CE {w['ce_orig']:.2f} -> {w['ce_recon']:.2f} nats "
                f"(sequence {w['sequence']}, position {w['position']})"
            )
    return lines


def _clip(text: str, keep: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= keep else "…" + text[-keep:]


def format_report(report: EvalReport) -> str:
    """The CLI's view: the tables, then each error, failure, caught control and warning on its
    own line."""
    lines = [table for _, table in tables(report)]
    for result in report.entries:
        for kind, _, message in problems(result):
            lines.append(f"WARN  {message}" if kind == "WARN" else f"{kind:<5} {result.label}: {message}")
    lines += worst_lines(report)
    tokens = report.settings.get("tokens", {})
    if tokens:
        rate = report.timing.get("tokens_per_s")
        speed = f"; {rate:.0f} tokens/s" if rate else ""
        lines.append(
            f"{tokens['n_counted']} of {tokens['n_tokens']} tokens counted (excluded: {tokens['rule']}){speed}"
        )
    return "\n".join(lines)


def densities_path(json_path: Path, sae: str) -> Path:
    """Where an SAE's per-latent densities go: `<report>.<sae>.densities.npz` beside the JSON report."""
    return json_path.with_name(f"{json_path.stem}.{sae}.densities.npz")


def write_densities(json_path: Path, report: EvalReport) -> list[Path]:
    """Per SAE with latents, a compressed npz beside the JSON report: `density` (firing share of
    counted tokens, per latent), `fired` (counts), `n_tokens`, `dense_threshold`, and where the
    diagnostics ran `fired_sequences` and the weight statistics (`max_decoder_cosine`, ...)."""
    written = []
    threshold = np.float64(report.settings.get("dense_threshold", np.nan))
    for name, result in report.saes.items():
        if result.latents is None:
            continue
        latents = result.latents
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            density=latents.density,
            n_tokens=np.float64(latents.n_tokens),
            dense_threshold=threshold,
            **latents.arrays(),  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle's bool
        )
        written.append(write_atomic(densities_path(json_path, name), buffer.getvalue()))
    return written


def read_densities(json_path: Path, report: EvalReport) -> None:
    """The latents of each SAE of `report` from the densities beside its JSON (a shard's report,
    read by `merge`); an SAE without such a file keeps none."""
    for name, result in report.saes.items():
        path = densities_path(json_path, name)
        if result.error is None and path.is_file():
            npz_within(path, "an SAE's densities", error=ReportError)
            with np.load(path, allow_pickle=False) as stored:
                result.latents = Latents.from_arrays(
                    {key: stored[key] for key in stored.files}, float(stored["n_tokens"])
                )
