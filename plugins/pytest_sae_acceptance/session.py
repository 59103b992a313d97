"""The plugin's heavy half: each entry evaluated once, compared with its baseline once.

Items ask for their entry's result; the first ask evaluates every selected entry
it may share passes with (the whole file without xdist; its xdist run on a
worker), so SAEs at one hook share the model's first pass. At the end this
process's reports become its `Part`, which the controller turns into the one
report that `gate.write_outputs` writes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_sae_acceptance.selection import (
    PYTEST_FLAGS,
    Part,
    is_xdist_worker,
    process_part,
    read_baseline,
    selected_names,
    selected_splices,
)
from sae_acceptance.config import LoadedThresholds, eval_default, splice_key
from sae_acceptance.errors import BaselineError, SAEAcceptanceError
from sae_acceptance.evaluate import evaluate
from sae_acceptance.gate import compare
from sae_acceptance.results import CLTResult, EntryResult, EvalReport, SAEResult, SpliceResult
from sae_acceptance.shard import xdist_runs
from sae_acceptance.sources.model import ModelCache
from sae_acceptance.train.analysis import write_analysis
from sae_acceptance.train.sweep import default_cache, load_profile, run_sweep
from sae_acceptance.train.sweep_profile import DEFAULT_PROFILE
from sae_acceptance.verdict import RegressionCheck


class SAESession:
    """One pytest process's evaluations: models loaded once, each entry evaluated once, its
    regression checks computed once, and the reports this process hands on."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.models = ModelCache()
        self.reports: dict[Path, EvalReport] = {}
        self.results: dict[tuple[Path, str], SAEResult | CLTResult] = {}
        self.splices: dict[tuple[Path, str], SpliceResult] = {}
        self.failures: dict[tuple[Path, str], SAEAcceptanceError | Warning] = {}
        self.compared: set[tuple[Path, str]] = set()
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
            run = xdist_runs(loaded, int(self.config.workerinput["workercount"]))  # type: ignore[attr-defined]  # set by xdist
            saes = [n for n in saes if run[n] == run[key]]
            splices = [n for n in splices if run[splice_key(n)] == run[key]]
        return saes, splices

    def result(self, loaded: LoadedThresholds, name: str) -> SAEResult | CLTResult:
        """The SAE's (or CLT's) result, evaluating it (with the SAEs and splices it shares passes with) once.

        An evaluation that fails as a whole (the model or tokens cannot load) fails every
        item of its SAEs with the same error, without being run again for each.
        """
        key = (loaded.path, name)
        known = [entry.key for entry in loaded.config.sae] + [entry.key for entry in loaded.config.clt]
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
        clts = {clt.key: clt.name for clt in loaded.config.clt}
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
                if isinstance(err, SAEAcceptanceError):  # the report shows what could not be evaluated
                    failed = EvalReport({}, {}, {n: SAEResult(n, error=str(err)) for n in names if n not in clts})
                    failed.clts = {n: CLTResult(clts[n], error=str(err)) for n in names if n in clts}
                    failed.splices = {n: SpliceResult(n, error=str(err)) for n in splices}
                    self._keep(loaded.path, failed)
                raise
            if reporter is not None:
                rate = report.timing.get("tokens_per_s")
                reporter.write_line(
                    f"sae-acceptance: {what} evaluated in {report.timing['wall_s']:.1f} s"
                    + (f" ({rate:,.0f} tokens/s)" if rate else "")
                )
        self._keep(loaded.path, report)

    def _keep(self, path: Path, report: EvalReport) -> None:
        previous = self.reports.get(path)
        if previous is not None:
            report.saes = {**previous.saes, **report.saes}
            report.splices = {**previous.splices, **report.splices}
            report.clts = {**previous.clts, **report.clts}
        self.reports[path] = report
        for name, result in report.saes.items():
            self.results[(path, name)] = result
        for clt_result in report.clts.values():
            self.results[(path, clt_result.key)] = clt_result
        for name, splice in report.splices.items():
            self.splices[(path, name)] = splice

    def regression(self, loaded: LoadedThresholds, result: EntryResult, metric: str) -> RegressionCheck:
        """`metric`'s check against the baseline; every regressed metric of the entry is compared
        at its first item, from one paired bootstrap, and kept in the result (so the report holds
        it). An entry measured on something else raises at each of its items."""
        key = (loaded.path, result.key)
        if key not in self.compared:
            self.compared.add(key)
            baseline = read_baseline(self.config, loaded)
            if baseline is not None:
                compare(loaded, result, baseline, self.config.getoption("--sae-baseline-strict"), PYTEST_FLAGS)
        if result.baseline_error:
            raise BaselineError(result.baseline_error)
        return result.regressions[metric]

    def part(self) -> Part:
        """This process's part of the run, for the controller."""
        return process_part(self.config, dict(self.reports))

    def sweep(self, out: Path) -> tuple[EvalReport, list[dict[str, Any]], Path]:
        """The `sae_sweep` fixture's value: the `--sae-sweep` profile trained (or loaded), gated, tabulated."""
        cache = Path(self.config.getoption("--sae-sweep-cache") or default_cache()).expanduser()
        profile = load_profile(self.config.getoption("--sae-sweep") or DEFAULT_PROFILE)
        worker = None
        if is_xdist_worker(self.config):  # worker i starts on its own run of the grids
            given = self.config.workerinput  # type: ignore[attr-defined]  # set by xdist
            worker = (int(given["workerid"].removeprefix("gw")), int(given["workercount"]))
        progress = not self.config.getoption("--sae-no-progress")
        report, points = run_sweep(profile, out, cache, self.device or eval_default("device"), progress, worker=worker)
        write_analysis(points, out)
        return report, points, out


def worker_device(config: pytest.Config) -> str | None:
    """One GPU per xdist worker (gw0 -> cuda:0, gw1 -> cuda:1, ...) where several are visible.

    Chosen as a device, not by rewriting CUDA_VISIBLE_DEVICES: nothing outside this
    plugin's own evaluations changes. None keeps `[eval] device`.
    """
    if not is_xdist_worker(config) or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    index = int(config.workerinput["workerid"].removeprefix("gw"))  # type: ignore[attr-defined]  # set by xdist
    return f"cuda:{index % torch.cuda.device_count()}"
