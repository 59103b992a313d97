"""pytest plugin: thresholds.toml as tests. Hooks, options and fixtures only.

`pytest thresholds.toml` collects one collector per `[[sae]]` and one item per
gated metric (`thresholds.toml::<sae>::<metric>`), plus an `r2` item that warns
where the PR canyon flags the layer and `regression_<metric>` items when a
baseline is given. Models load at the first item that needs them, never at
collection; the logic lives in `sae_acceptance` and in `session.py` here.
"""

from __future__ import annotations

import fnmatch
import warnings
from pathlib import Path

import pytest

from pytest_sae_acceptance.session import STATE_KEY, SAESession, pin_gpu_for_xdist_worker
from sae_acceptance.config import LoadedThresholds, SAEEntry, load_thresholds
from sae_acceptance.errors import ConfigError, R2ProxyWarning, SAEAcceptanceError
from sae_acceptance.train import builtin_profiles


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sae-acceptance", "SAE acceptance gate")
    group.addoption("--sae-json", metavar="PATH", help="write the full JSON report here")
    group.addoption("--sae-baseline", metavar="PATH", help="compare against this regression baseline")
    group.addoption(
        "--sae-update-baseline", action="store_true", help="write (or refresh) the regression baseline"
    )
    group.addoption(
        "--sae-baseline-strict", action="store_true", help="fail SAEs that have no baseline entry"
    )
    group.addoption("--sae-thresholds", metavar="PATH", help="thresholds file for the sae_eval fixture")
    group.addoption("--sae-sweep", metavar="PROFILE", default="tiny",
                    help=f"training profile for the sae_sweep fixture ({', '.join(builtin_profiles())}, or a .toml)")
    group.addoption("--sae-sweep-cache", metavar="DIR", help="trained-SAE cache (default ~/.cache/sae-acceptance/sweeps)")
    group.addoption("--sae-no-progress", action="store_true", help="hide progress bars")
    parser.addini("sae_thresholds", "thresholds file for the sae_eval fixture", default="thresholds.toml")
    parser.addini(
        "sae_thresholds_pattern", "file names collected as thresholds files", default="thresholds*.toml"
    )


def pytest_configure(config: pytest.Config) -> None:
    pin_gpu_for_xdist_worker()
    config.addinivalue_line("markers", "sae: an SAE acceptance check from a thresholds file")
    config.stash[STATE_KEY] = SAESession(config)


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if fnmatch.fnmatch(file_path.name, parent.config.getini("sae_thresholds_pattern")):
        return ThresholdsFile.from_parent(parent, path=file_path)
    return None


class ThresholdsFile(pytest.File):
    def collect(self):
        try:
            loaded = load_thresholds(self.path)
        except ConfigError as err:
            raise self.CollectError(str(err)) from None
        for i, entry in enumerate(loaded.config.sae):
            yield SAECollector.from_parent(
                self, name=entry.display_name, loaded=loaded, entry=entry, line=loaded.line_of("sae", i)
            )


class SAECollector(pytest.Collector):
    def __init__(self, *, loaded: LoadedThresholds, entry: SAEEntry, line: int, **kwargs):
        super().__init__(**kwargs)
        self.loaded, self.entry, self.line = loaded, entry, line
        self.add_marker("sae")

    def collect(self):
        state: SAESession = self.config.stash[STATE_KEY]
        gated = list(self.loaded.config.gate_for(self.entry))
        for metric in [*gated, "r2"]:
            yield MetricItem.from_parent(self, name=metric, metric=metric)
        if state.baseline_path(self.loaded) is not None:
            for metric in self.loaded.config.regressed_for(self.entry):
                yield RegressionItem.from_parent(self, name=f"regression_{metric}", metric=metric)

    def reportinfo(self):
        return self.path, self.line - 1, self.name


class SAECheckFailed(Exception):
    """A failed acceptance check: its message is the whole report."""


class _SAEItem(pytest.Item):
    def __init__(self, *, metric: str, **kwargs):
        super().__init__(**kwargs)
        self.metric = metric

    @property
    def sae(self) -> SAECollector:
        return self.parent

    def result(self):
        state: SAESession = self.config.stash[STATE_KEY]
        try:
            result = state.result(self.sae.loaded, self.sae.entry.display_name)
        except SAEAcceptanceError as err:
            raise SAECheckFailed(str(err)) from None
        if result.error is not None:
            raise SAECheckFailed(result.error)
        return result

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, SAECheckFailed | SAEAcceptanceError):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, self.sae.line - 1, f"{self.sae.name}::{self.name}"


class MetricItem(_SAEItem):
    """One gated metric of one SAE (or `r2`: reported, and a warning in the canyon)."""

    def runtest(self) -> None:
        result = self.result()
        metric = result.metrics[self.metric]
        self.user_properties += [(self.metric, metric.value)]
        if metric.ci is not None:
            self.user_properties += [(f"{self.metric}_ci_low", metric.ci[0]), (f"{self.metric}_ci_high", metric.ci[1])]
        if self.metric == "r2":
            if result.geometry is not None:
                self.user_properties += [("pr", result.geometry.pr), ("pr_ratio", result.geometry.pr_ratio)]
            if result.r2_warning:
                warnings.warn(R2ProxyWarning(result.r2_warning), stacklevel=1)
            if metric.value != metric.value:
                raise SAECheckFailed(f"r2 is NaN for {result.name}")
            return
        verdict = result.verdicts[self.metric]
        self.user_properties += [("passed", verdict.passed)]
        if not verdict.finite:  # a failed eval, even on a negative control's metric
            raise SAECheckFailed(verdict.message)
        if self.metric in result.expect_fail:
            if verdict.passed:
                raise SAECheckFailed(f"negative control passed, the gate no longer catches it: {verdict.message}")
            pytest.xfail(f"negative control caught: {verdict.message}")
        if not verdict.passed:
            raise SAECheckFailed(verdict.message)


class RegressionItem(_SAEItem):
    """A metric against the committed baseline, by a paired bootstrap on the same sequences."""

    def runtest(self) -> None:
        state: SAESession = self.config.stash[STATE_KEY]
        result = self.result()
        check = state.regression(self.sae.loaded, self.sae.entry, result, self.metric)
        self.user_properties += [(f"{self.metric}_change", check.change)]
        if check.ci is not None:
            self.user_properties += [(f"{self.metric}_change_ci_low", check.ci[0]), (f"{self.metric}_change_ci_high", check.ci[1])]
        if check.skipped:
            pytest.skip(check.message)
        if not check.passed:
            raise SAECheckFailed(check.message)


@pytest.fixture(scope="session")
def sae_eval(request: pytest.FixtureRequest):
    """`sae_eval("name")` -> that SAE's `SAEResult` from the thresholds file (evaluated once)."""
    config = request.config
    path = Path(config.getoption("--sae-thresholds") or config.getini("sae_thresholds"))
    path = path if path.is_absolute() else config.rootpath / path
    loaded = load_thresholds(path)
    state: SAESession = config.stash[STATE_KEY]

    def get(name: str):
        return state.result(loaded, name)

    return get


@pytest.fixture(scope="session")
def sae_sweep(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The SAEs of the `--sae-sweep` profile, trained or loaded from the cache, gated and tabulated.

    Returns `(report, points, out_dir)`: the `EvalReport`, the sweep points, and the
    directory holding report.json, points.json and the analysis tables and plots.
    """
    from sae_acceptance.train.analysis import write_analysis
    from sae_acceptance.train.sweep import default_cache, load_profile, run_sweep

    config = request.config
    cache = Path(config.getoption("--sae-sweep-cache") or default_cache())
    out = tmp_path_factory.mktemp("sae-sweep")
    progress = not config.getoption("--sae-no-progress")
    report, points = run_sweep(load_profile(config.getoption("--sae-sweep")), out, cache, "auto", progress)
    write_analysis(points, out)
    return report, points, out


def pytest_collection_finish(session: pytest.Session) -> None:
    selected: dict[Path, list[str]] = {}
    for item in session.items:
        if isinstance(item, _SAEItem):
            names = selected.setdefault(item.sae.loaded.path, [])
            if item.sae.entry.display_name not in names:
                names.append(item.sae.entry.display_name)
    session.config.stash[STATE_KEY].selected_names = selected


def pytest_sessionfinish(session: pytest.Session) -> None:
    session.config.stash[STATE_KEY].finish()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under the default `--dist load`, keep each SAE's items on one worker (evaluated once)."""
    if config.getoption("dist") != "load":
        return None
    from pytest_sae_acceptance.scheduling import SAEScopeScheduling

    return SAEScopeScheduling(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist controller: gather each worker's summary rows."""
    node.config.stash[STATE_KEY].absorb_worker(getattr(node, "workeroutput", {}))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    summary = config.stash[STATE_KEY].summary()
    if summary:
        terminalreporter.section("SAE acceptance")
        terminalreporter.write_line(summary)

