"""The collection tree of a thresholds file: file -> one collector per `[[sae]]` -> items.

`thresholds.toml::<sae>::<metric>` is one gated metric, `::r2` the reported R²
(a warning where the PR canyon flags the layer), `::regression_<metric>` a
paired comparison against the baseline. Items read their outcome from the
library (`SAEResult.outcome`, `compare_sae`); nothing is decided here.
"""

from __future__ import annotations

import warnings

import pytest

from pytest_sae_acceptance.selection import SESSION_KEY, baseline_path, group_key
from sae_acceptance.config import LoadedThresholds, SAEEntry, load_thresholds
from sae_acceptance.errors import ConfigError, R2ProxyWarning, SAEAcceptanceError
from sae_acceptance.verdict import Status


def sae_session(config: pytest.Config):
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
        self.add_marker(pytest.mark.xdist_group(group_key(loaded, entry)))

    def collect(self):
        for metric in [*self.loaded.config.gate_for(self.entry), "r2"]:
            yield MetricItem.from_parent(self, name=metric, metric=metric)
        if baseline_path(self.config, self.loaded) is not None:
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
        try:
            result = sae_session(self.config).result(self.sae.loaded, self.sae.entry.display_name)
        except SAEAcceptanceError as err:
            raise SAECheckFailed(str(err)) from None
        if result.error is not None:
            raise SAECheckFailed(result.error)
        return result

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, SAECheckFailed | SAEAcceptanceError | R2ProxyWarning):
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
            return
        self.user_properties += [("passed", result.verdicts[self.metric].passed)]
        decided = result.outcome(self.metric)
        if decided.status is Status.CAUGHT:
            pytest.xfail(decided.message)
        if not decided.as_expected:
            raise SAECheckFailed(decided.message)


class RegressionItem(_SAEItem):
    """A metric against the committed baseline, by a paired bootstrap on the same sequences."""

    def runtest(self) -> None:
        result = self.result()
        check = sae_session(self.config).regression(self.sae.loaded, self.sae.entry, result, self.metric)
        self.user_properties += [(f"{self.metric}_change", check.change)]
        if check.ci is not None:
            self.user_properties += [(f"{self.metric}_change_ci_low", check.ci[0]), (f"{self.metric}_change_ci_high", check.ci[1])]
        if check.skipped:
            pytest.skip(check.message)
        if not check.passed:
            raise SAECheckFailed(check.message)
