"""pytest-xdist: the items of SAEs that share a model and hook, and of their splices, go to one worker.

Scheduled like `--dist load`, except that a thresholds file's SAE unit is one
unit of work: the SAEs of one model and hook share the model's passes, so
splitting them over workers would evaluate the model once per worker, and a
`[[splice]]` joins its members' groups (and its own items) into one unit, so
that its members are evaluated once, with it. xdist's own `loadgroup` cannot carry
this on pytest 9.2 and later (it tags items by rewriting their node ids on the
workers, which pytest no longer allows), so the controller reads each item's
unit off its node id and the thresholds file, which loads without torch.
`_split_scope` is the scope hook of xdist's `LoadScopeScheduling`, the class
its own `loadgroup` and `loadfile` modes are built on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from sae_acceptance.config import load_thresholds
from sae_acceptance.errors import SAEAcceptanceError
from sae_acceptance.shard import unit_of


class SAEGroupScheduling(LoadScopeScheduling):
    def __init__(self, config: pytest.Config, log=None):
        super().__init__(config, log)
        self._units: dict[str, dict[str, str] | None] = {}

    def _split_scope(self, nodeid: str) -> str:
        file, _, rest = nodeid.partition("::")
        units = self._file_units(file)
        if units is None:
            return nodeid  # not a thresholds file: each test a unit of its own, as under `load`
        return units.get(rest.split("::", 1)[0], nodeid)

    def _file_units(self, file: str) -> dict[str, str] | None:
        """SAE name or splice key -> its unit's scope, for a thresholds file (None for any other file)."""
        if file not in self._units:
            self._units[file] = None
            path = Path(self.config.rootpath, file)
            if path.suffix == ".toml" and path.is_file():
                try:
                    loaded = load_thresholds(path)
                except SAEAcceptanceError:
                    return None  # its collection error is reported by the workers
                self._units[file] = {name: f"{file}::{unit}" for name, unit in unit_of(loaded).items()}
        return self._units[file]
