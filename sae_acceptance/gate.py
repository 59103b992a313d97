"""The gate every path runs: evaluate, compare against the baseline, decide, write the outputs.

The CLI (`eval`, `merge`) and the pytest plugin call these same pieces, so a
thresholds file gates the same way under each of them: the same baseline (read
and checked before anything is evaluated), the same regression checks, held in
the report itself, the same exit status and the same files.

Exit status: 0 all as expected, 1 a gate or regression check failed, 2 bad
input or an error of the tool (an entry that could not be evaluated, a baseline
measured on something else, an output that could not be written).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sae_acceptance.baseline import (
    Baseline,
    BaselineEntry,
    RefreshFlags,
    compare_entry,
    remedy,
    update_baseline,
    write_baseline,
)
from sae_acceptance.ci_summary import in_actions, publish
from sae_acceptance.config import LoadedThresholds
from sae_acceptance.errors import EXIT_ERROR, EXIT_FAILED, EXIT_OK, BaselineError
from sae_acceptance.evaluate import evaluate
from sae_acceptance.html_report import write_html
from sae_acceptance.io import write_json
from sae_acceptance.report import write_densities
from sae_acceptance.results import EntryResult, EvalReport
from sae_acceptance.saebench import write_saebench
from sae_acceptance.sources.model import ModelCache
from sae_acceptance.verdict import EntryStatus


def tolerances_for(loaded: LoadedThresholds, key: str) -> dict[str, float | None]:
    """The metrics an entry is compared on against the baseline, and their tolerance (None: the
    metric's default)."""
    regression = loaded.config.regression
    entry = loaded.config.by_key[key]
    return {m: regression[m].tolerance if m in regression else None for m in loaded.config.regressed_for(entry)}


def compare(
    loaded: LoadedThresholds, result: EntryResult, baseline: Baseline, strict: bool, flags: RefreshFlags
) -> None:
    """Compare one evaluated entry with the baseline: its `regressions`, or the `baseline_error`
    that stopped them (measured on something else)."""
    if result.error is not None:
        return  # an error of its own already
    tolerances = tolerances_for(loaded, result.key)
    try:
        result.regressions = compare_entry(baseline, result, loaded.config.eval, tolerances, strict, flags)
    except BaselineError as err:
        result.baseline_error = remedy(err, flags)


def run_gate(
    loaded: LoadedThresholds,
    baseline: Baseline | None,
    flags: RefreshFlags,
    strict: bool = False,
    names: list[str] | None = None,
    progress: bool = True,
    models: ModelCache | None = None,
) -> EvalReport:
    """Evaluate the file's entries (all, or `names`) and, with a `baseline`, compare each one."""
    report = evaluate(loaded, names=names, progress=progress, models=models)
    if baseline is not None:
        for result in report.entries:
            compare(loaded, result, baseline, strict, flags)
    return report


def exit_status(report: EvalReport) -> int:
    """0 all as expected; 1 a gate or regression check failed; 2 an entry could not be evaluated
    or compared."""
    entries = report.entries
    if any(r.error or r.baseline_error for r in entries):
        return EXIT_ERROR
    regressed = any(not c.passed for r in entries for c in r.regressions.values())
    return EXIT_OK if report.passed and not regressed else EXIT_FAILED


VERDICT_NAMES = 8  # entries a verdict line names before it counts the rest


def verdict_line(report: EvalReport) -> str:
    """A run's closing line: its exit status in words, and the entries that decided it."""
    status = exit_status(report)

    def named(*kinds: EntryStatus) -> list[str]:
        return [r.label for r in report.entries if r.status in kinds]

    def listed(labels: list[str]) -> str:
        shown = ", ".join(labels[:VERDICT_NAMES])
        return shown + (f" and {len(labels) - VERDICT_NAMES} more" if len(labels) > VERDICT_NAMES else "")

    total = len(report.entries)
    if status == EXIT_ERROR:
        errors = named(EntryStatus.ERROR)
        return (
            f"verdict: ERROR (exit {status}): {len(errors)} of {total} entries could not be evaluated: {listed(errors)}"
        )
    if status == EXIT_FAILED:
        failed = named(EntryStatus.FAIL, EntryStatus.REGRESSED)
        return f"verdict: FAILED (exit {status}): {len(failed)} of {total} entries failed: {listed(failed)}"
    caught = len(named(EntryStatus.CONTROL))
    controls = f", {caught} negative control{'s' if caught != 1 else ''} caught" if caught else ""
    entries = "1 entry" if total == 1 else f"{total} entries"
    return f"verdict: PASSED (exit {status}): {entries} as expected{controls}"


@dataclass(frozen=True)
class Outputs:
    """Where a gate's outcome goes. Every path (CLI `eval` and `merge`, pytest) fills one and
    calls `write_outputs`, so the same report lands in the same files."""

    json: Path | None = None
    html: Path | None = None
    saebench: Path | None = None
    baseline_part: tuple[Path, Mapping[str, BaselineEntry]] | None = None
    refresh: Mapping[Path, Mapping[str, BaselineEntry]] = field(default_factory=dict)
    force: bool = False
    actions: bool = field(default_factory=in_actions)


def write_outputs(report: EvalReport, outputs: Outputs) -> list[str]:
    """Write the JSON report (and each SAE's densities beside it), the HTML report, the GitHub
    step summary, a baseline part and refreshed baselines, each atomically; returns the lines
    to show (where each went, and the `::error` annotations)."""
    lines = []
    if outputs.json is not None:
        write_json(outputs.json, report.to_dict())
        write_densities(outputs.json, report)
        lines.append(f"report written to {outputs.json} (per-latent densities beside it)")
    if outputs.html is not None:
        write_html(outputs.html, report)
        lines.append(f"HTML report written to {outputs.html}")
    if outputs.saebench is not None:
        written = write_saebench(outputs.saebench, report)
        lines.append(f"{len(written)} SAEBench core file(s) written to {outputs.saebench}")
    if outputs.actions:
        lines += publish(report)
    if outputs.baseline_part is not None:
        part, entries = outputs.baseline_part
        write_baseline(part, entries)
        lines.append(f"baseline entries written to {part}")
    for target, entries in outputs.refresh.items():
        update_baseline(target, entries, force=outputs.force)
        lines.append(f"baseline written to {target} ({len(entries)} entries refreshed)")
    return lines
