"""Per-run state of the plugin: each SAE evaluated once, baselines compared once, reports written.

Items ask for their SAE's result; the first ask evaluates every selected SAE it
may share passes with (the whole file without xdist; its hookpoint group on an
xdist worker, which gets the whole group), so SAEs at one hookpoint share the
model's first pass. The controller gathers the summary rows from the workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_sae_acceptance.selection import (
    baseline_path,
    baseline_target,
    is_xdist_worker,
    selected_names,
    selected_splices,
    xdist_runs,
)
from sae_acceptance.baseline import (
    Baseline,
    RegressionCheck,
    baseline_entries,
    load_baseline,
    update_baseline,
)
from sae_acceptance.ci_summary import Failure, in_actions, markdown, publish, workspace_path
from sae_acceptance.config import EvalSettings, LoadedThresholds, SAEEntry, SpliceEntry, splice_key
from sae_acceptance.errors import SAEAcceptanceError
from sae_acceptance.evaluate import evaluate
from sae_acceptance.gate import regression_checks
from sae_acceptance.html_report import write_html
from sae_acceptance.io import write_json
from sae_acceptance.render import format_table
from sae_acceptance.report import (
    REGRESSION_HEADER,
    SPLICE_HEADER,
    SUMMARY_HEADER,
    check_from_record,
    check_record,
    latent_record,
    merge_reports,
    regression_rows,
    report_from_json,
    shard_record,
    splice_rows,
    summary_rows,
    write_densities,
)
from sae_acceptance.results import EvalReport, SAEResult, SpliceResult
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
        self.failures: dict[tuple[Path, str], SAEAcceptanceError | Warning] = {}
        self.baselines: dict[Path, Baseline] = {}
        self.regressions: list[tuple[str, RegressionCheck]] = []
        self.regression_checks: dict[tuple[Path, str], dict[str, RegressionCheck] | SAEAcceptanceError] = {}
        self.splices: dict[tuple[Path, str], SpliceResult] = {}
        self.progress = not config.getoption("--sae-no-progress") and not is_xdist_worker(config)
        self.device = worker_device(config)

    def _pending(self, loaded: LoadedThresholds, key: str) -> tuple[list[str], list[str]]:
        """The selected SAEs and splices not yet evaluated that go with `key` (an SAE name or
        splice key) in one evaluation: the file's, or on an xdist worker its run's."""
        saes = [n for n in selected_names(self.config).get(loaded.path, []) if (loaded.path, n) not in self.results]
        splices = [
            n for n in selected_splices(self.config).get(loaded.path, []) if (loaded.path, n) not in self.splices
        ]
        if is_xdist_worker(self.config):
            run = xdist_runs(loaded, int(self.config.workerinput["workercount"]))
            saes = [n for n in saes if run[n] == run[key]]
            splices = [n for n in splices if run[splice_key(n)] == run[key]]
        return saes, splices

    def result(self, loaded: LoadedThresholds, name: str) -> SAEResult:
        """The SAE's result, evaluating it (with the SAEs and splices it shares passes with) once.

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
            names, splices = self._pending(loaded, name)
            self._evaluate(loaded, names if name in names else [*names, name], splices)
        return self.results[key]

    def splice(self, loaded: LoadedThresholds, name: str) -> SpliceResult:
        """A `[[splice]]` group's result, evaluated with its members (and what goes with them) once."""
        key = (loaded.path, name)
        if key in self.failures:
            raise self.failures[key]
        if key not in self.splices:
            names, splices = self._pending(loaded, splice_key(name))
            self._evaluate(loaded, names, splices if name in splices else [*splices, name])
        return self.splices[key]

    def _evaluate(self, loaded: LoadedThresholds, names: list[str], splices: list[str]) -> None:
        """One evaluation; its progress shows in the terminal, past pytest's output capture."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter") if self.progress else None
        capture = self.config.pluginmanager.get_plugin("capturemanager") if self.progress else None
        what = f"{len(names)} SAE(s)" + (f" and {len(splices)} splice(s)" if splices else "")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            if reporter is not None:  # inside: a line written while the item runs is captured otherwise
                reporter.write_line(f"sae-acceptance: evaluating {what} of {loaded.path.name}")
            try:
                report = evaluate(
                    loaded, names=names, progress=self.progress, models=self.models, device=self.device, splices=splices
                )
            except (SAEAcceptanceError, Warning) as err:  # a warning when -W error escalates it
                self.failures.update({(loaded.path, n): err for n in [*names, *splices]})
                raise
            if reporter is not None:
                rate = report.timing.get("tokens_per_s")
                reporter.write_line(
                    f"sae-acceptance: {what} evaluated in {report.timing['wall_s']:.1f} s"
                    + (f" ({rate:,.0f} tokens/s)" if rate else "")
                )
        self.loaded[loaded.path] = loaded
        self._keep(loaded.path, report)

    def _keep(self, path: Path, report: EvalReport) -> None:
        previous = self.reports.get(path)
        if previous is not None:
            report.saes = {**previous.saes, **report.saes}
            report.splices = {**previous.splices, **report.splices}
        self.reports[path] = report
        for name, result in report.saes.items():
            self.results[(path, name)] = result
        for name, result in report.splices.items():
            self.splices[(path, name)] = result

    def regression(
        self,
        loaded: LoadedThresholds,
        entry: SAEEntry | SpliceEntry,
        result: SAEResult | SpliceResult,
        metric: str,
        key: str | None = None,
    ) -> RegressionCheck:
        """`metric`'s check against the baseline; every regressed metric of the SAE is
        compared at its first item, from one paired bootstrap. An error that covers the
        whole SAE (another fingerprint, no metrics) is kept and raised by each item.
        `key` names the baseline entry (a splice's `splice:<name>`; an SAE's own name)."""
        if key is not None and key != result.name:
            result = dataclasses.replace(result, name=key)
        key = (loaded.path, result.name)
        if key not in self.regression_checks:
            try:
                path = baseline_path(self.config, loaded)
                if path not in self.baselines:
                    self.baselines[path] = load_baseline(path)
                strict = self.config.getoption("--sae-baseline-strict")
                settings = self.reports[loaded.path].settings
                checks = regression_checks(loaded, entry, result, settings, self.baselines[path], strict)
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
        splices = [r for report in self.reports.values() for r in report.splices.values()]
        part: dict[str, Any] = {
            "reports": [report.to_dict() for report in self.reports.values()],
            "gate": summary_rows(results),
            "splices": splice_rows(splices),
            "regression": regression_rows(self.regressions),
            "regression_checks": [check_record(name, check) for name, check in self.regressions],
            "latents": {name: latent_record(r) for name, r in ((r.name, r) for r in results) if r.sums is not None},
            "baselines": {},
            "selected": [n for names in selected_names(self.config).values() for n in names],  # a shard's record
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
            shard = self.config.getoption("--sae-shard")
            if shard is not None:  # an empty share still writes its report, for `merge`
                merged = merged or EvalReport.empty().to_dict()
                names = list(dict.fromkeys(n for part in parts for n in part.get("selected", [])))
                merged["shard"] = shard_record(shard.index, shard.count, names)
            if merged is not None:
                write_json(Path(json_path).expanduser(), merged)
        self._write_views(parts)
        if interrupted:
            return
        targets: dict[str, dict[str, Any]] = {}
        for part in parts:
            for target, entries in part["baselines"].items():
                targets.setdefault(target, {}).update(entries)
        force = self.config.getoption("--sae-update-baseline") == "force"
        for target, entries in targets.items():
            update_baseline(Path(target), entries, force=force)

    def _write_views(self, parts: list[dict[str, Any]]) -> None:
        """Beside the JSON report, each SAE's per-latent densities; and the HTML report."""
        json_path, html_path = self.config.getoption("--sae-json"), self.config.getoption("--sae-html")
        merged = merge_reports(report for part in parts for report in part["reports"])
        if merged is None:
            return
        latents = {name: record for part in parts for name, record in part.get("latents", {}).items()}
        threshold = merged["eval"].get("dense_threshold", EvalSettings.model_fields["dense_threshold"].default)
        if json_path:
            write_densities(Path(json_path).expanduser(), latents, threshold)
        if html_path:
            checks = dict.fromkeys(
                check_from_record(record) for part in parts for record in part.get("regression_checks", [])
            )
            write_html(Path(html_path).expanduser(), report_from_json(merged), latents, list(checks))

    def sweep(self, out: Path) -> tuple[EvalReport, list[dict[str, Any]], Path]:
        """The `sae_sweep` fixture's value: the `--sae-sweep` profile trained (or loaded), gated, tabulated."""
        cache = Path(self.config.getoption("--sae-sweep-cache") or default_cache()).expanduser()
        profile = load_profile(self.config.getoption("--sae-sweep") or "tiny")
        spread = None
        if is_xdist_worker(self.config):  # worker i starts on its own share of the grids
            worker = self.config.workerinput
            spread = (int(worker["workerid"].removeprefix("gw")), int(worker["workercount"]))
        progress = not self.config.getoption("--sae-no-progress")
        report, points = run_sweep(profile, out, cache, self.device or "auto", progress, spread=spread)
        write_analysis(points, out)
        return report, points, out

    @staticmethod
    def tables(parts: list[dict[str, Any]]) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
        """The gate's, the splices' and the regression rows; each row once (workers may repeat one)."""
        gate = _unique([row for part in parts for row in part["gate"]])
        splices = _unique([row for part in parts for row in part.get("splices", [])])
        changes = _unique([row for part in parts for row in part["regression"]])
        return gate, splices, changes

    def publish_ci(self, parts: list[dict[str, Any]], failed: list[tuple[str, int, str, str]]) -> list[str]:
        """Under GitHub Actions: the step summary appended, and the annotation lines to print."""
        if not in_actions():
            return []
        failures = [Failure(workspace_path(file), line, node, message) for file, line, node, message in failed]
        return publish(markdown(*self.tables(parts), failures), failures)

    @classmethod
    def summary(cls, parts: list[dict[str, Any]]) -> str:
        """The gate's table, the splices', then the regression table."""
        gate, splices, changes = cls.tables(parts)
        text = format_table(SUMMARY_HEADER, gate) if gate else ""
        if splices:
            text += "\n\n" + format_table(SPLICE_HEADER, splices)
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
