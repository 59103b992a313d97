"""pytest-xdist: a thresholds file's SAEs go to the workers in runs, each run to one worker.

Scheduled like `--dist load`, except that a run of a thresholds file's SAEs
(`shard.xdist_runs`) is one unit of work: the SAEs of one model and hook share
the model's passes, so they are never split; a `[[splice]]` stays with its
members; and a model is spread over several workers only where the original
passes each worker then repeats cost little beside the work spread. xdist's
own `loadgroup` cannot carry this on pytest 9.2 and later (it tags items by
rewriting their node ids on the workers, which pytest no longer allows), so the
controller reads each item's run off its node id and the thresholds file, which
loads without torch. `_split_scope` is the scope hook of xdist's
`LoadScopeScheduling`, the class its own `loadgroup` and `loadfile` modes are
built on; it hands the largest runs out first.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from xdist.scheduler import LoadScopeScheduling

from sae_acceptance.config import load_thresholds
from sae_acceptance.errors import SAEAcceptanceError
from sae_acceptance.shard import xdist_runs

if TYPE_CHECKING:
    from xdist.remote import Producer


class SAEGroupScheduling(LoadScopeScheduling):
    """xdist's scope scheduling, with a thresholds file's runs of SAEs as the scopes."""

    def __init__(self, config: pytest.Config, log: Producer | None = None) -> None:
        super().__init__(config, log)
        self._runs: dict[str, dict[str, str] | None] = {}

    def _split_scope(self, nodeid: str) -> str:
        file, _, rest = nodeid.partition("::")
        runs = self._file_runs(file)
        if runs is None:
            return nodeid  # not a thresholds file: each test a unit of its own, as under `load`
        return runs.get(rest.split("::", 1)[0], nodeid)

    def _file_runs(self, file: str) -> dict[str, str] | None:
        """SAE name or splice key -> its run's scope, for a thresholds file (None for any other file)."""
        if file not in self._runs:
            self._runs[file] = None
            path = Path(self.config.rootpath, file)
            if path.suffix == ".toml" and path.is_file():
                try:
                    loaded = load_thresholds(path)
                except SAEAcceptanceError:
                    return None  # its collection error is reported by the workers
                runs = xdist_runs(loaded, self.numnodes)
                self._runs[file] = {name: f"{file}::run{run}" for name, run in runs.items()}
        return self._runs[file]
