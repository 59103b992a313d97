"""What an evaluation produced: one `SAEResult` per SAE, gathered in an `EvalReport`.

Plain data with its JSON form (the report's keys); every decision they expose
comes from `verdict.outcome`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sae_acceptance.geometry import LayerGeometry
from sae_acceptance.io import to_json
from sae_acceptance.stats import SequenceSums
from sae_acceptance.verdict import MetricValue, Outcome, Verdict, outcome


@dataclass
class SAEResult:
    """Everything measured and decided about one SAE."""

    name: str
    path: str
    model: str | None = None
    hook: str | None = None
    layer: int | None = None
    architecture: str | None = None
    d_in: int | None = None
    d_sae: int | None = None
    k: int | None = None
    metrics: dict[str, MetricValue] = field(default_factory=dict)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    geometry: LayerGeometry | None = None
    r2_warning: str | None = None
    error: str | None = None
    tokens_fingerprint: str | None = None
    excluded_ids: list[int] | None = None
    expect_fail: list[str] = field(default_factory=list)
    sums: SequenceSums | None = None

    def outcome(self, metric: str) -> Outcome:
        """The gated `metric`'s outcome: the one place a negative control is read."""
        return outcome(self.verdicts[metric], metric in self.expect_fail)

    def as_expected(self, metric: str) -> bool:
        return self.outcome(metric).as_expected

    @property
    def passed(self) -> bool:
        return self.error is None and all(self.as_expected(m) for m in self.verdicts)

    @property
    def verdict_word(self) -> str:
        """The SAE's one-word verdict in tables and reports."""
        if self.error is not None:
            return "ERROR"
        if not self.verdicts:
            return "no bounds"  # measured only: nothing was checked
        if not self.passed:
            return "FAIL"
        return "CAUGHT (control)" if self.expect_fail else "PASS"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "hook": self.hook,
            "layer": self.layer,
            "path": self.path,
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "tokens_fingerprint": self.tokens_fingerprint,
            "excluded_ids": self.excluded_ids,
            "error": self.error,
            "expect_fail": self.expect_fail,
            "metrics": {name: m.to_dict() for name, m in self.metrics.items()},
            "verdicts": {name: v.to_dict() for name, v in self.verdicts.items()},
            "geometry": None if self.geometry is None else self.geometry.to_dict(),
            "r2_warning": self.r2_warning,
        }


@dataclass
class SpliceResult:
    """A `[[splice]]` group: its SAEs patched in together, the joint loss measured and gated.

    `hook` joins the members' hooks (what a baseline entry records as the place measured).
    """

    name: str
    saes: list[str]
    hooks: list[str] = field(default_factory=list)
    model: str | None = None
    metrics: dict[str, MetricValue] = field(default_factory=dict)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    error: str | None = None
    tokens_fingerprint: str | None = None
    excluded_ids: list[int] | None = None
    expect_fail: list[str] = field(default_factory=list)
    sums: SequenceSums | None = None

    outcome = SAEResult.outcome
    as_expected = SAEResult.as_expected
    passed = SAEResult.passed
    verdict_word = SAEResult.verdict_word

    @property
    def hook(self) -> str:
        return " + ".join(self.hooks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "saes": self.saes,
            "hooks": self.hooks,
            "model": self.model,
            "tokens_fingerprint": self.tokens_fingerprint,
            "excluded_ids": self.excluded_ids,
            "error": self.error,
            "expect_fail": self.expect_fail,
            "metrics": {name: m.to_dict() for name, m in self.metrics.items()},
            "verdicts": {name: v.to_dict() for name, v in self.verdicts.items()},
        }


@dataclass
class EvalReport:
    settings: dict[str, Any]
    timing: dict[str, Any]
    saes: dict[str, SAEResult]
    splices: dict[str, SpliceResult] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> EvalReport:
        """The report of a share with nothing to evaluate (an empty shard)."""
        return cls(settings={}, timing={}, saes={})

    @property
    def entries(self) -> list[SAEResult | SpliceResult]:
        """Every SAE's result, then every splice's."""
        return [*self.saes.values(), *self.splices.values()]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "eval": self.settings,
            "timing": self.timing,
            "saes": {name: r.to_dict() for name, r in self.saes.items()},
            "splices": {name: r.to_dict() for name, r in self.splices.items()},
        }

    def to_json(self) -> str:
        return to_json(self.to_dict())
