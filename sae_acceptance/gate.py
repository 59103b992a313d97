"""The whole gate in one call: evaluate, compare against the baseline, decide the exit status.

The CLI (`eval --config`) runs `run_gate`; the pytest plugin runs the same
pieces one item at a time (`regression_checks` for a regression item,
`exit_status`'s rule for the session), so a thresholds file gates the same way
under both: the same baseline, the same regression checks, the same controls,
the same exit status.

Exit status: 0 all as expected, 1 a gate or regression check failed, 2 bad
input or an error of the tool (an SAE that could not be evaluated, a baseline
measured on something else, an output that could not be written).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sae_acceptance.baseline import Baseline, RegressionCheck, compare_sae, load_baseline
from sae_acceptance.config import LoadedThresholds, SAEEntry
from sae_acceptance.errors import EXIT_ERROR, EXIT_FAILED, EXIT_OK, SAEAcceptanceError
from sae_acceptance.evaluate import evaluate
from sae_acceptance.results import EvalReport, SAEResult
from sae_acceptance.sources.model import ModelCache

if TYPE_CHECKING:
    from sae_acceptance.config import SpliceEntry
    from sae_acceptance.results import SpliceResult


def tolerances_for(loaded: LoadedThresholds, entry: SAEEntry | SpliceEntry) -> dict[str, float | None]:
    """The metrics compared against the baseline and their tolerance (None: the metric's default)."""
    regression = loaded.config.regression
    return {m: regression[m].tolerance if m in regression else None for m in loaded.config.regressed_for(entry)}


def regression_checks(
    loaded: LoadedThresholds,
    entry: SAEEntry | SpliceEntry,
    result: SAEResult | SpliceResult,
    settings: dict,
    baseline: Baseline,
    strict: bool = False,
    key: str | None = None,
) -> dict[str, RegressionCheck]:
    """Every regressed metric of one entry against the baseline (one paired bootstrap).

    `key` is the entry's name in the baseline (a splice's `splice:<name>`); raises a
    `BaselineError` when the whole entry cannot be compared (measured on something else).
    """
    if key is not None and key != result.name:
        result = dataclasses.replace(result, name=key)
    return compare_sae(baseline, result, settings, tolerances_for(loaded, entry), strict)


@dataclass
class GateRun:
    """A gate's outcome: the report, and per entry its regression checks or the error that stopped them."""

    report: EvalReport
    regressions: dict[str, dict[str, RegressionCheck] | str] = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        return exit_status(self.report, self.regressions.values())

    def regression_rows(self) -> list[tuple[str, RegressionCheck]]:
        return [
            (name, check)
            for name, checks in self.regressions.items()
            if isinstance(checks, dict)
            for check in checks.values()
        ]

    def regression_errors(self) -> list[tuple[str, str]]:
        return [(name, checks) for name, checks in self.regressions.items() if isinstance(checks, str)]

    def errors(self) -> list[str]:
        """Every entry that could not be evaluated or compared, one line each (all of its problems)."""
        return [r.error for r in self.report.entries if r.error] + [message for _, message in self.regression_errors()]


def exit_status(report: EvalReport, regressions=()) -> int:
    """0 all as expected; 1 a gate or regression failed; 2 an entry could not be evaluated or compared."""
    regressions = list(regressions)
    if any(r.error for r in report.entries) or any(isinstance(c, str) for c in regressions):
        return EXIT_ERROR
    regressed = any(not c.passed for checks in regressions for c in checks.values())
    return EXIT_OK if report.passed and not regressed else EXIT_FAILED


def run_gate(
    loaded: LoadedThresholds,
    baseline: Path | None = None,
    strict: bool = False,
    names: list[str] | None = None,
    progress: bool = True,
    models: ModelCache | None = None,
) -> GateRun:
    """Evaluate the file's SAEs (all, or `names`) and, with a `baseline`, compare each measured
    entry against it. A baseline that cannot be read is every entry's error."""
    report = evaluate(loaded, names=names, progress=progress, models=models)
    run = GateRun(report)
    if baseline is None:
        return run
    try:
        stored: Baseline | str = load_baseline(baseline)
    except SAEAcceptanceError as err:
        stored = str(err)
    entries = {e.display_name: e for e in loaded.config.sae}
    splices = {e.name: e for e in loaded.config.splice}
    compared = [(name, entries[name], r, name) for name, r in report.saes.items()]
    compared += [(splices[name].key, splices[name], r, splices[name].key) for name, r in report.splices.items()]
    for shown, entry, result, key in compared:
        if result.error is not None:
            continue  # already an error of its own
        if isinstance(stored, str):
            run.regressions[shown] = stored
            continue
        try:
            run.regressions[shown] = regression_checks(loaded, entry, result, report.settings, stored, strict, key)
        except SAEAcceptanceError as err:
            run.regressions[shown] = str(err)
    return run
