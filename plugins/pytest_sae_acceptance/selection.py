"""What this run selects and what each process hands on, known without loading any model.

Light on purpose: the collection tree and the plugin's hooks import it in every
pytest run where the package is installed (no torch here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sae_acceptance.baseline import Baseline, RefreshFlags, check_refreshable, load_baseline
from sae_acceptance.config import LoadedThresholds
from sae_acceptance.results import EvalReport

if TYPE_CHECKING:
    from pytest_sae_acceptance.session import SAESession  # noqa: F401  # SESSION_KEY names it

PYTEST_FLAGS = RefreshFlags(
    refresh="--sae-update-baseline", force="--sae-update-baseline=force", strict="--sae-baseline-strict"
)

SESSION_KEY = pytest.StashKey["SAESession"]()
SELECTED_KEY = pytest.StashKey[dict[Path, list[str]]]()
SPLICES_KEY = pytest.StashKey[dict[Path, list[str]]]()
BASELINES_KEY = pytest.StashKey[dict[Path, Baseline]]()
# The files `--sae-shard` cut, each with this shard's SAEs of it.
SHARDED_KEY = pytest.StashKey[dict[Path, tuple[LoadedThresholds, list[str]]]]()


def selected_names(config: pytest.Config) -> dict[Path, list[str]]:
    """SAE names with at least one selected item, per thresholds file (set after collection)."""
    return config.stash.get(SELECTED_KEY, {})


def selected_splices(config: pytest.Config) -> dict[Path, list[str]]:
    """`[[splice]]` names with at least one selected item, per thresholds file."""
    return config.stash.get(SPLICES_KEY, {})


def baseline_target(config: pytest.Config, loaded: LoadedThresholds) -> Path:
    """Where --sae-update-baseline writes: the option, the file's `baseline`, or a default."""
    return loaded.baseline_file(config.getoption("--sae-baseline"))


def baseline_path(config: pytest.Config, loaded: LoadedThresholds) -> Path | None:
    """The baseline to compare against (none while it is being written)."""
    if config.getoption("--sae-update-baseline"):
        return None
    return loaded.compared_baseline(config.getoption("--sae-baseline"))


def read_baseline(config: pytest.Config, loaded: LoadedThresholds) -> Baseline | None:
    """At collection, before anything is evaluated: the baseline this file is compared against,
    read and checked once per run; or, with --sae-update-baseline, the one to be refreshed
    checked readable (unless forced). Raises `BaselineError`."""
    if config.getoption("--sae-update-baseline") == "refresh":
        check_refreshable(baseline_target(config, loaded))
    path = baseline_path(config, loaded)
    if path is None:
        return None
    read = config.stash.setdefault(BASELINES_KEY, {})
    if path not in read:
        read[path] = load_baseline(path)
    return read[path]


def is_xdist_worker(config: pytest.Config) -> bool:
    """Whether this process is an xdist worker (not the controller, not a plain run)."""
    return hasattr(config, "workerinput")


@dataclass
class Part:
    """What one pytest process hands to the controller: its reports by thresholds file (with their
    sums, for baselines and densities), the thresholds files it cut into shards (whose outputs
    are written even when empty) and the SAEs it selected (a shard's record). A plain run passes
    it on as objects; an xdist worker sends `to_wire()`."""

    reports: dict[Path, EvalReport] = field(default_factory=dict)
    sharded: list[Path] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    empty_shard: bool = False

    def to_wire(self) -> dict[str, Any]:
        """Plain data for execnet (xdist's channel)."""
        return {
            "reports": {str(path): report.to_dict(sums=True) for path, report in self.reports.items()},
            "sharded": [str(path) for path in self.sharded],
            "selected": self.selected,
            "empty_shard": self.empty_shard,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Part:
        """Back from `to_wire`."""
        reports = {Path(path): EvalReport.from_dict(report) for path, report in data["reports"].items()}
        return cls(reports, [Path(p) for p in data["sharded"]], list(data["selected"]), bool(data["empty_shard"]))


def process_part(config: pytest.Config, reports: dict[Path, EvalReport]) -> Part:
    """This process's part of the run: `reports` (those it evaluated) and what it selected."""
    sharded = config.stash.get(SHARDED_KEY, {})
    selected = [name for names in selected_names(config).values() for name in names]
    empty = bool(sharded) and not any(names for _, names in sharded.values())
    return Part(reports, list(sharded), selected, empty_shard=empty)
