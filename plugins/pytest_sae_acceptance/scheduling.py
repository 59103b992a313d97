"""pytest-xdist scheduling: every item of one SAE on one worker, everything else as `--dist load`.

An SAE is evaluated once per worker that runs any of its items, so spreading its
metric items over workers (what the default `--dist load` does) evaluates it
several times. The controller sees node ids only; those of thresholds files
(`thresholds.toml::<sae>::<metric>`) are grouped by SAE, any other test is a
scope of its own.
"""

from __future__ import annotations

import fnmatch
from pathlib import PurePath

from xdist.scheduler import LoadScopeScheduling


class SAEScopeScheduling(LoadScopeScheduling):
    def __init__(self, config, log=None):
        super().__init__(config, log)
        self.pattern = config.getini("sae_thresholds_pattern")

    def _split_scope(self, nodeid: str) -> str:
        file = nodeid.split("::", 1)[0]
        if fnmatch.fnmatch(PurePath(file).name, self.pattern):
            return nodeid.rsplit("::", 1)[0]
        return nodeid
