"""Per-run state of the plugin: each SAE evaluated once, baselines compared once, reports written.

Items ask for their SAE's result; the first ask evaluates every selected SAE it
may share passes with (the whole file without xdist; its hookpoint group on an
xdist worker, which gets the whole group), so SAEs at one hookpoint share the
model's first pass. The controller gathers the summary rows from the workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_sae_acceptance.selection import (
    baseline_path,
    baseline_target,
    group_key,
    is_xdist_worker,
    selected_names,
)
from sae_acceptance.baseline import (
    Baseline,
    RegressionCheck,
    baseline_entries,
    compare_sae,
    load_baseline,
    update_baseline,
)
from sae_acceptance.config import LoadedThresholds, SAEEntry
from sae_acceptance.errors import SAEAcceptanceError
from sae_acceptance.evaluate import evaluate
from sae_acceptance.io import write_json
from sae_acceptance.render import format_table
from sae_acceptance.report import (
    REGRESSION_HEADER,
    SUMMARY_HEADER,
    merge_reports,
    regression_rows,
    summary_rows,
)
from sae_acceptance.results import EvalReport, SAEResult
from sae_acceptance.sources.model import ModelCache
from sae_acceptance.train.analysis import write_analysis
from sae_acceptance.train.sweep import default_cache, load_profile, run_sweep


class SAESession:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.models = ModelCache()
        self.reports: dict[Path, EvalReport] = {}
        self.loaded: dict[Path, LoadedThresholds] = {}
        self.results: dict[tuple[Path, str], SAEResult] = {}
        self.failures: dict[tuple[Path, str], SAEAcceptanceError] = {}
        self.baselines: dict[Path, Baseline] = {}
        self.regressions: list[tuple[str, RegressionCheck]] = []
        self.regression_checks: dict[tuple[Path, str], dict[str, RegressionCheck] | SAEAcceptanceError] = {}
        self.progress = not config.getoption("--sae-no-progress") and not is_xdist_worker(config)
        self.device = worker_device(config)

    def _together(self, loaded: LoadedThresholds, name: str) -> list[str]:
        """The selected SAEs to evaluate with `name`: the file's, or on a worker its group's."""
        entries = {entry.display_name: entry for entry in loaded.config.sae}
        selected = [n for n in selected_names(self.config).get(loaded.path, []) if (loaded.path, n) not in self.results]
        if is_xdist_worker(self.config):
            group = group_key(loaded, entries[name])
            selected = [n for n in selected if group_key(loaded, entries[n]) == group]
        return selected if name in selected else [*selected, name]

    def result(self, loaded: LoadedThresholds, name: str) -> SAEResult:
        """The SAE's result, evaluating it (with the SAEs it shares passes with) once.

        An evaluation that fails as a whole (the model or tokens cannot load) fails every
        item of its SAEs with the same error, without being run again for each.
        """
        key = (loaded.path, name)
        known = [entry.display_name for entry in loaded.config.sae]
        if name not in known:
            raise SAEAcceptanceError(f"{loaded.path}: no [[sae]] named {name!r} (there are: {', '.join(known)})")
        if key in self.failures:
            raise self.failures[key]
        if key not in self.results:
            names = self._together(loaded, name)
            try:
                report = evaluate(loaded, names=names, progress=self.progress, models=self.models, device=self.device)
            except SAEAcceptanceError as err:
                self.failures.update({(loaded.path, n): err for n in names})
                raise
            self.loaded[loaded.path] = loaded
            self._keep(loaded.path, report)
        return self.results[key]

    def _keep(self, path: Path, report: EvalReport) -> None:
        previous = self.reports.get(path)
        if previous is not None:
            report.saes = {**previous.saes, **report.saes}
        self.reports[path] = report
        for name, result in report.saes.items():
            self.results[(path, name)] = result

    def regression(self, loaded: LoadedThresholds, entry: SAEEntry, result: SAEResult, metric: str) -> RegressionCheck:
        """`metric`'s check against the baseline; every regressed metric of the SAE is
        compared at its first item, from one paired bootstrap. An error that covers the
        whole SAE (another fingerprint, no metrics) is kept and raised by each item."""
        key = (loaded.path, result.name)
        if key not in self.regression_checks:
            try:
                path = baseline_path(self.config, loaded)
                if path not in self.baselines:
                    self.baselines[path] = load_baseline(path)
                regression = loaded.config.regression
                tolerances = {
                    m: regression[m].tolerance if m in regression else None for m in loaded.config.regressed_for(entry)
                }
                strict = self.config.getoption("--sae-baseline-strict")
                checks = compare_sae(self.baselines[path], result, self.reports[loaded.path].settings, tolerances, strict)
            except SAEAcceptanceError as err:
                checks = err
            self.regression_checks[key] = checks
        checks = self.regression_checks[key]
        if isinstance(checks, SAEAcceptanceError):
            raise type(checks)(*checks.args)  # a fresh one per item: no traceback piling up
        self.regressions.append((result.name, checks[metric]))
        return checks[metric]

    def finish(self) -> dict[str, Any]:
        """This process's part of the run, as plain data a worker can send to the controller:
        its reports, its baseline entries, and its summary rows."""
        results = [r for report in self.reports.values() for r in report.saes.values()]
        part: dict[str, Any] = {
            "reports": [report.to_dict() for report in self.reports.values()],
            "gate": summary_rows(results),
            "regression": regression_rows(self.regressions),
            "baselines": {},
        }
        if self.config.getoption("--sae-update-baseline"):
            for path, report in self.reports.items():
                target = str(baseline_target(self.config, self.loaded[path]))
                part["baselines"].setdefault(target, {}).update(baseline_entries(report))
        return part

    def write_outputs(self, parts: list[dict[str, Any]], interrupted: bool) -> None:
        """The controller's (or a plain run's) writes: the JSON report, then the baseline; a baseline
        only when the run was not interrupted."""
        json_path = self.config.getoption("--sae-json")
        if json_path:
            merged = merge_reports(report for part in parts for report in part["reports"])
            if merged is not None:
                write_json(Path(json_path).expanduser(), merged)
        if interrupted:
            return
        targets: dict[str, dict[str, Any]] = {}
        for part in parts:
            for target, entries in part["baselines"].items():
                targets.setdefault(target, {}).update(entries)
        for target, entries in targets.items():
            update_baseline(Path(target), entries)

    def sweep(self, out: Path) -> tuple[EvalReport, list[dict[str, Any]], Path]:
        """The `sae_sweep` fixture's value: the `--sae-sweep` profile trained (or loaded), gated, tabulated."""
        cache = Path(self.config.getoption("--sae-sweep-cache") or default_cache()).expanduser()
        profile = load_profile(self.config.getoption("--sae-sweep") or "tiny")
        report, points = run_sweep(profile, out, cache, "auto", not self.config.getoption("--sae-no-progress"))
        write_analysis(points, out)
        return report, points, out

    @staticmethod
    def summary(parts: list[dict[str, Any]]) -> str:
        """The gate's table, then the regression table; each row once (workers may repeat one)."""
        gate = _unique([row for part in parts for row in part["gate"]])
        changes = _unique([row for part in parts for row in part["regression"]])
        text = format_table(SUMMARY_HEADER, gate) if gate else ""
        if changes:
            text += "\n\n" + format_table(REGRESSION_HEADER, changes)
        return text


def worker_device(config: pytest.Config) -> str | None:
    """One GPU per xdist worker (gw0 -> cuda:0, gw1 -> cuda:1, ...) where several are visible.

    Chosen as a device, not by rewriting CUDA_VISIBLE_DEVICES: nothing outside this
    plugin's own evaluations changes. None keeps `[eval] device`.
    """
    if not is_xdist_worker(config) or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    index = int(config.workerinput["workerid"].removeprefix("gw"))
    return f"cuda:{index % torch.cuda.device_count()}"


def _unique(rows: list[list[str]]) -> list[list[str]]:
    return [list(row) for row in dict.fromkeys(tuple(row) for row in rows)]
