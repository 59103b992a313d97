"""Per-session state of the plugin: results evaluated once, reports, baselines, summary.

Items ask for their SAE's result; the first ask evaluates every selected SAE of
that thresholds file together (so SAEs at one hookpoint share the model's
first pass). Under pytest-xdist each worker evaluates the SAEs it is given, and
the controller gathers the summary rows from the workers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sae_acceptance.config import LoadedThresholds, SAEEntry
from sae_acceptance.errors import SAEAcceptanceError
from sae_acceptance.evaluate import EvalReport, SAEResult, evaluate
from sae_acceptance.report import format_table, merge_report_json, summary_rows
from sae_acceptance.sources.model import ModelCache

STATE_KEY = pytest.StashKey["SAESession"]()


def pin_gpu_for_xdist_worker() -> None:
    """One GPU per xdist worker (gw0 -> first visible GPU, ...), set before CUDA is touched."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d for d in visible.split(",") if d.strip()]
    elif shutil.which("nvidia-smi"):
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
        devices = [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU")]
    else:
        devices = []
    if len(devices) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(worker[2:]) % len(devices)]


def is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


class SAESession:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.models = ModelCache()
        self.reports: dict[Path, EvalReport] = {}
        self.results: dict[tuple[Path, str], SAEResult] = {}
        self.failures: dict[tuple[Path, str], SAEAcceptanceError] = {}
        self.worker_gate_rows: list[list[str]] = []
        self.worker_regression_rows: list[list[str]] = []
        self.selected_names: dict[Path, list[str]] = {}
        self.baselines: dict[Path, dict] = {}
        self.regressions: list[tuple[str, object]] = []
        self.regression_checks: dict[tuple[Path, str], dict | SAEAcceptanceError] = {}
        self.loaded: dict[Path, LoadedThresholds] = {}
        self.progress = not config.getoption("--sae-no-progress") and not is_xdist_worker(config)
        json_path = config.getoption("--sae-json")
        self.json_path = Path(json_path).resolve() if json_path else None
        if self.json_path is not None and not is_xdist_worker(config):
            self.json_path.unlink(missing_ok=True)  # workers merge into a fresh file

    def selected(self, loaded: LoadedThresholds) -> list[str]:
        """SAE names of this file that this session runs items for."""
        if is_xdist_worker(self.config):
            return []  # the scheduler hands out SAEs one scope at a time
        return self.selected_names.get(loaded.path, [])

    def result(self, loaded: LoadedThresholds, name: str) -> SAEResult:
        """The SAE's result, evaluating it (with every other selected SAE of the file) once.

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
            names = [n for n in self.selected(loaded) if (loaded.path, n) not in self.results] or [name]
            if name not in names:
                names.append(name)
            try:
                report = evaluate(loaded, names=names, progress=self.progress, models=self.models)
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

    # -- regression baselines (sae_acceptance.baseline) ------------------------------------

    def baseline_target(self, loaded: LoadedThresholds) -> Path:
        """Where --sae-update-baseline writes: the option, the file's `baseline`, or a default."""
        option = self.config.getoption("--sae-baseline")
        if option:
            return Path(option).resolve()
        return loaded.path.parent / (loaded.config.baseline or f"{loaded.path.stem}.baseline.json")

    def baseline_path(self, loaded: LoadedThresholds) -> Path | None:
        """The baseline to compare against (none while it is being written)."""
        if self.config.getoption("--sae-update-baseline"):
            return None
        if self.config.getoption("--sae-baseline") or loaded.config.baseline:
            return self.baseline_target(loaded)
        return None

    def regression(self, loaded: LoadedThresholds, entry: SAEEntry, result: SAEResult, metric: str):
        """`metric`'s check against the baseline; every regressed metric of the SAE is
        compared at its first item, from one paired bootstrap. An error that covers the
        whole SAE (another fingerprint, no metrics) is kept and raised by each item."""
        from sae_acceptance.baseline import compare_sae, load_baseline

        key = (loaded.path, result.name)
        if key not in self.regression_checks:
            try:
                path = self.baseline_path(loaded)
                if path not in self.baselines:
                    self.baselines[path] = load_baseline(path)
                regression = loaded.config.regression
                tolerances = {
                    m: regression[m].tolerance if m in regression else None
                    for m in loaded.config.regressed_for(entry)
                }
                checks = compare_sae(
                    self.baselines[path],
                    result,
                    self.reports[loaded.path].settings,
                    tolerances,
                    strict=self.config.getoption("--sae-baseline-strict"),
                )
            except SAEAcceptanceError as err:
                checks = err
            self.regression_checks[key] = checks
        checks = self.regression_checks[key]
        if isinstance(checks, SAEAcceptanceError):
            raise type(checks)(*checks.args)  # a fresh one per item: no traceback piling up
        self.regressions.append((result.name, checks[metric]))
        return checks[metric]

    # -- end of session ----------------------------------------------------------------------

    def finish(self) -> None:
        for path, report in self.reports.items():
            if self.json_path is not None:
                merge_report_json(self.json_path, report)
            if self.config.getoption("--sae-update-baseline"):
                from sae_acceptance.baseline import update_baseline

                update_baseline(self.baseline_target(self.loaded[path]), report)
        if is_xdist_worker(self.config):
            self.config.workeroutput["sae_rows"] = self._gate_rows()
            self.config.workeroutput["sae_regression_rows"] = self._regression_rows()

    def absorb_worker(self, output: dict) -> None:
        self.worker_gate_rows += output.get("sae_rows", [])
        self.worker_regression_rows += output.get("sae_regression_rows", [])

    def _gate_rows(self) -> list[list[str]]:
        return summary_rows([r for report in self.reports.values() for r in report.saes.values()])[1:]

    def _regression_rows(self) -> list[list[str]]:
        rows = []
        for name, check in self.regressions:
            ci = f" [{check.ci[0]:+.4f}, {check.ci[1]:+.4f}]" if check.ci else ""
            verdict = "new" if check.skipped else "ok" if check.passed else "REGRESSED"
            rows.append([name, check.metric, f"{check.change:+.4f}{ci}", verdict])
        return rows

    def summary(self) -> str:
        """The gate's table, then the regression table; rows from xdist workers included, once each."""
        gate = _unique(self._gate_rows() + self.worker_gate_rows)
        text = format_table([summary_rows([])[0], *gate]) if gate else ""
        changes = _unique(self._regression_rows() + self.worker_regression_rows)
        if changes:
            header = ["sae", "metric", "change [paired CI] vs baseline", "verdict"]
            text += "\n\n" + format_table([header, *changes])
        return text


def _unique(rows: list[list[str]]) -> list[list[str]]:
    """Rows in order, without repeats (two workers may evaluate the same SAE)."""
    return [list(row) for row in dict.fromkeys(tuple(row) for row in rows)]
