"""The collection tree of a thresholds file: file -> one collector per `[[sae]]` -> items.

`thresholds.toml::<sae>::<metric>` is one gated metric, `::r2` the reported R²
(a warning where the PR canyon flags the layer), `::regression_<metric>` a
paired comparison against the baseline; `thresholds.toml::splice:<name>::<metric>`
the same for a `[[splice]]` group. Items read their outcome from the
library (`EntryResult.outcome`, `gate.compare`); nothing is decided here. The
baseline is read when the file is collected, before anything is evaluated.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_sae_acceptance.selection import PYTEST_FLAGS, SESSION_KEY, baseline_path, read_baseline
from sae_acceptance.baseline import remedy
from sae_acceptance.config import CLTEntry, LoadedThresholds, SAEEntry, SpliceEntry, load_thresholds
from sae_acceptance.errors import BaselineError, ConfigError, R2ProxyWarning, SAEAcceptanceError
from sae_acceptance.results import EntryResult, SAEResult
from sae_acceptance.verdict import Status

if TYPE_CHECKING:
    from _pytest._code.code import TerminalRepr, TracebackStyle

    from pytest_sae_acceptance.session import SAESession


def sae_session(config: pytest.Config) -> SAESession:
    """The run's `SAESession`, made when the first SAE item (or fixture) needs it.

    Imported here, not at the top: it loads torch and the models' libraries, which a
    test run that never reaches an SAE item (the plugin installed beside an unrelated
    suite) should not pay for.
    """
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        from pytest_sae_acceptance.session import SAESession

        session = config.stash[SESSION_KEY] = SAESession(config)
    return session


class ThresholdsFile(pytest.File):
    """A thresholds file: one collector per `[[sae]]` and `[[splice]]`."""

    def collect(self) -> Iterator[_Collector]:
        try:
            loaded = load_thresholds(self.path)
        except ConfigError as err:
            raise self.CollectError(str(err)) from None
        try:
            read_baseline(self.config, loaded)
        except BaselineError as err:
            raise self.CollectError(remedy(err, PYTEST_FLAGS)) from None
        for i, entry in enumerate(loaded.config.sae):
            yield SAECollector.from_parent(
                self, name=entry.key, loaded=loaded, entry=entry, line=loaded.line_of("sae", i)
            )
        for i, splice in enumerate(loaded.config.splice):
            yield SpliceCollector.from_parent(
                self, name=splice.key, loaded=loaded, entry=splice, line=loaded.line_of("splice", i)
            )
        for i, clt in enumerate(loaded.config.clt):
            yield CLTCollector.from_parent(self, name=clt.key, loaded=loaded, entry=clt, line=loaded.line_of("clt", i))


class _Collector(pytest.Collector):
    """One `[[sae]]`, `[[splice]]` or `[[clt]]` entry: its metric items, then its regression items."""

    metric_item: type[pytest.Item]
    regression_item: type[pytest.Item]
    entry: SAEEntry | SpliceEntry | CLTEntry
    reported: tuple[str, ...] = ()  # ungated metrics that still get an item (an SAE's r2)

    def __init__(
        self, *, loaded: LoadedThresholds, entry: SAEEntry | SpliceEntry | CLTEntry, line: int, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.loaded, self.entry, self.line = loaded, entry, line
        self.add_marker("sae")

    def collect(self) -> Iterator[pytest.Item]:
        for metric in [*self.loaded.config.gate_for(self.entry), *self.reported]:
            yield self.metric_item.from_parent(self, name=metric, metric=metric)
        if baseline_path(self.config, self.loaded) is not None:
            for metric in self.loaded.config.regressed_for(self.entry):
                yield self.regression_item.from_parent(self, name=f"regression_{metric}", metric=metric)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, self.line - 1, self.name

    def evaluate_entry(self) -> EntryResult:
        """The entry's result, evaluated once per run (with what shares its passes)."""
        raise NotImplementedError


class SAECollector(_Collector):
    """An `[[sae]]`: its gated metrics, its `r2`, its regression checks."""

    entry: SAEEntry
    reported = ("r2",)

    def evaluate_entry(self) -> EntryResult:
        return sae_session(self.config).result(self.loaded, self.entry.key)


class SpliceCollector(_Collector):
    """A `[[splice]]`: its gated joint metrics and their regression checks."""

    entry: SpliceEntry

    def evaluate_entry(self) -> EntryResult:
        return sae_session(self.config).splice(self.loaded, self.entry.name)


class CLTCollector(_Collector):
    """A `[[clt]]`: its gated joint metrics and their regression checks. Its items are selected,
    sharded and grouped as an SAE's are, under its key `clt:<name>`."""

    def evaluate_entry(self) -> EntryResult:
        return sae_session(self.config).result(self.loaded, self.entry.key)


INPUT_ERROR_PROPERTY = "sae_error"


class SAECheckFailed(Exception):
    """A failed acceptance check: its message is the whole report."""


class _CheckItem(pytest.Item):
    """One check of an entry; the entry is the parent collector."""

    parent: _Collector

    def __init__(self, *, metric: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metric = metric

    def result(self) -> EntryResult:
        try:
            result = self.parent.evaluate_entry()
        except SAEAcceptanceError as err:
            raise self.input_error(str(err)) from None
        except Warning as err:  # escalated by -W error: a failed check, in its own words
            raise SAECheckFailed(str(err)) from None
        if result.error is not None:
            raise self.input_error(result.error)
        return result

    def input_error(self, message: str) -> SAECheckFailed:
        """A check that could not run (bad input, not a failed gate): recorded as the item's
        `sae_error` property, which makes the run's exit status 2."""
        self.user_properties.append((INPUT_ERROR_PROPERTY, message))
        return SAECheckFailed(message)

    def repr_failure(
        self, excinfo: pytest.ExceptionInfo[BaseException], style: TracebackStyle | None = None
    ) -> str | TerminalRepr:
        if isinstance(excinfo.value, SAECheckFailed | SAEAcceptanceError | R2ProxyWarning):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, self.parent.line - 1, f"{self.parent.name}::{self.name}"


class _MetricCheck(_CheckItem):
    """One gated metric (or an SAE's `r2`: reported, and a warning in the canyon)."""

    def runtest(self) -> None:
        result = self.result()
        metric = result.metrics[self.metric]
        self.user_properties += [(self.metric, metric.value)]
        if metric.ci is not None:
            self.user_properties += [(f"{self.metric}_ci_low", metric.ci[0]), (f"{self.metric}_ci_high", metric.ci[1])]
        if isinstance(result, SAEResult) and self.metric == "r2":
            if result.geometry is not None:
                self.user_properties += [("pr", result.geometry.pr), ("pr_ratio", result.geometry.pr_ratio)]
            if result.r2_warning:
                warnings.warn(R2ProxyWarning(result.r2_warning), stacklevel=1)
            return
        self.user_properties += [("passed", result.verdicts[self.metric].passed)]
        _conclude(result.outcome(self.metric).status, result.outcome(self.metric).message)


class _RegressionCheck(_CheckItem):
    """A metric against the committed baseline, by a paired bootstrap on the same sequences."""

    def runtest(self) -> None:
        result = self.result()
        try:
            check = sae_session(self.config).regression(self.parent.loaded, result, self.metric)
        except SAEAcceptanceError as err:  # the entry was measured on something else than its baseline entry
            raise self.input_error(str(err)) from None
        self.user_properties += [(f"{self.metric}_change", check.change)]
        if check.ci is not None:
            self.user_properties += [
                (f"{self.metric}_change_ci_low", check.ci[0]),
                (f"{self.metric}_change_ci_high", check.ci[1]),
            ]
        _conclude(check.status, check.message)


def _conclude(status: Status, message: str) -> None:
    """End an item as the status's pytest outcome says (`verdict.Status`)."""
    if status.pytest_outcome == "xfailed":
        pytest.xfail(message)
    if status.pytest_outcome == "skipped":
        pytest.skip(message)
    if status.pytest_outcome == "failed":
        raise SAECheckFailed(message)


class _SAEItem(_CheckItem):
    """An item of one `[[sae]]` (what selection, sharding and xdist groups count)."""

    parent: SAECollector

    @property
    def sae(self) -> SAECollector:
        return self.parent


class MetricItem(_SAEItem, _MetricCheck):
    """`thresholds.toml::<sae>::<metric>`: one gated metric of an SAE (or its `r2`)."""

    pass


class RegressionItem(_SAEItem, _RegressionCheck):
    """`thresholds.toml::<sae>::regression_<metric>`: an SAE's metric against the baseline."""

    pass


class _SpliceItem(_CheckItem):
    """An item of one `[[splice]]`: `thresholds.toml::splice:<name>::<metric>`."""

    parent: SpliceCollector

    @property
    def splice(self) -> SpliceCollector:
        return self.parent


class SpliceMetricItem(_SpliceItem, _MetricCheck):
    """`thresholds.toml::splice:<name>::<metric>`: one gated joint metric of a splice."""

    pass


class SpliceRegressionItem(_SpliceItem, _RegressionCheck):
    """`thresholds.toml::splice:<name>::regression_<metric>`: a splice's metric against the baseline."""

    pass


SAECollector.metric_item, SAECollector.regression_item = MetricItem, RegressionItem
CLTCollector.metric_item, CLTCollector.regression_item = MetricItem, RegressionItem
SpliceCollector.metric_item, SpliceCollector.regression_item = SpliceMetricItem, SpliceRegressionItem
