"""What this run selects, known without loading anything: SAE groups, baselines, workers.

Light on purpose: the collection tree and the plugin's hooks import it in every
pytest run where the package is installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_acceptance.config import LoadedThresholds, SAEEntry

SESSION_KEY = pytest.StashKey["SAESession"]()
SELECTED_KEY = pytest.StashKey[dict[Path, list[str]]]()


def selected_names(config: pytest.Config) -> dict[Path, list[str]]:
    """SAE names with at least one selected item, per thresholds file (set after collection)."""
    return config.stash.get(SELECTED_KEY, {})


def group_key(loaded: LoadedThresholds, entry: SAEEntry) -> str:
    """SAEs evaluated together on one xdist worker: those of one file, model and hook."""
    model = Path(entry.model or loaded.config.eval.model or "").name
    return f"{loaded.path.stem}:{model}:{entry.hook or entry.display_name}"


def baseline_target(config: pytest.Config, loaded: LoadedThresholds) -> Path:
    """Where --sae-update-baseline writes: the option, the file's `baseline`, or a default."""
    option = config.getoption("--sae-baseline")
    if option:
        return Path(option).expanduser().resolve()
    return loaded.path.parent / (loaded.config.baseline or f"{loaded.path.stem}.baseline.json")


def baseline_path(config: pytest.Config, loaded: LoadedThresholds) -> Path | None:
    """The baseline to compare against (none while it is being written)."""
    if config.getoption("--sae-update-baseline"):
        return None
    if config.getoption("--sae-baseline") or loaded.config.baseline:
        return baseline_target(config, loaded)
    return None


def is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")
