"""What this run selects, known without loading anything: SAE units, baselines, workers.

Light on purpose: the collection tree and the plugin's hooks import it in every
pytest run where the package is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sae_acceptance.config import LoadedThresholds
from sae_acceptance.shard import xdist_runs

__all__ = [
    "baseline_path",
    "baseline_target",
    "empty_part",
    "is_xdist_worker",
    "selected_names",
    "selected_splices",
    "xdist_runs",
]

SESSION_KEY = pytest.StashKey["SAESession"]()
SELECTED_KEY = pytest.StashKey[dict[Path, list[str]]]()
SPLICES_KEY = pytest.StashKey[dict[Path, list[str]]]()
# The files `--sae-shard` cut, each with this shard's share of its SAEs.
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


def is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def empty_part(config: pytest.Config) -> dict[str, Any]:
    """A process's part of the run when no SAE item ran (a shard whose share is empty): no
    results, but the shard's files still get written, its baseline part with no entries, so
    `merge` sees every shard."""
    sharded = config.stash.get(SHARDED_KEY, {}).values()
    targets = {str(baseline_target(config, loaded)) for loaded, _ in sharded}
    return {
        "reports": [],
        "gate": [],
        "splices": [],
        "regression": [],
        "regression_checks": [],
        "latents": {},
        "baselines": {t: {} for t in targets} if config.getoption("--sae-update-baseline") else {},
        "selected": [],
        "empty_share": not any(names for _, names in sharded),
    }
