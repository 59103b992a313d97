"""pytest-xdist: the items of SAEs that share a model and hook go to one worker together.

Scheduled like `--dist load`, except that a thresholds file's SAE group is one
unit of work: its SAEs share the model's passes, so splitting it over workers
would evaluate the model once per worker. xdist's own `loadgroup` cannot carry
this on pytest 9.2 and later (it tags items by rewriting their node ids on the
workers, which pytest no longer allows), so the controller reads each item's
group off its node id and the thresholds file, which loads without torch.
`_split_scope` is the scope hook of xdist's `LoadScopeScheduling`, the class
its own `loadgroup` and `loadfile` modes are built on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from sae_acceptance.config import load_thresholds
from sae_acceptance.errors import SAEAcceptanceError
from sae_acceptance.shard import group_key


class SAEGroupScheduling(LoadScopeScheduling):
    def __init__(self, config: pytest.Config, log=None):
        super().__init__(config, log)
        self._groups: dict[str, dict[str, str] | None] = {}

    def _split_scope(self, nodeid: str) -> str:
        file, _, rest = nodeid.partition("::")
        groups = self._file_groups(file)
        if groups is None:
            return nodeid  # not a thresholds file: each test a unit of its own, as under `load`
        return groups.get(rest.split("::", 1)[0], nodeid)

    def _file_groups(self, file: str) -> dict[str, str] | None:
        """SAE name -> its group's scope, for a thresholds file (None for any other file)."""
        if file not in self._groups:
            self._groups[file] = None
            path = Path(self.config.rootpath, file)
            if path.suffix == ".toml" and path.is_file():
                try:
                    loaded = load_thresholds(path)
                except SAEAcceptanceError:
                    return None  # its collection error is reported by the workers
                self._groups[file] = {e.display_name: f"{file}::{group_key(loaded, e)}" for e in loaded.config.sae}
        return self._groups[file]
