"""Deterministic cuts of a thresholds file's SAEs: xdist runs for workers, shards for machines.

The words (docs/architecture.md's glossary): SAEs of one model and hook share
the model's passes (one original pass per batch, then a tail per SAE), so they
form a *group* that is never split; groups a `[[splice]]` patches in together
join into one *unit*. Units are cut into contiguous *runs* in file order (so a
model's hooks stay together as far as the balance allows), where the cut
minimises the costliest run and, of such cuts, the total work. A *shard* is one
machine's run, an *xdist run* one worker's. Every run that holds part of a model
repeats that model's original pass, so a cut uses fewer runs than it is given
when more would repeat too much of it (`XDIST_SPLIT_BUDGET` for xdist runs,
`SHARD_SPLIT_BUDGET` for shards): the rest are empty, and an empty shard passes
with nothing to do. Known without loading anything: an SAE's hook comes from its
entry or, read lightly, its directory's `cfg.json`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_acceptance import __version__ as PROJECT_VERSION
from sae_acceptance.config import LoadedThresholds, SAEEntry
from sae_acceptance.errors import ConfigError, SAEAcceptanceError
from sae_acceptance.io import read_json
from sae_acceptance.sources.spec import is_remote

# Cost in tail passes: one for the group's zero-ablation, one per SAE; and per model a run
# evaluates, its original pass (a full forward: 1.5 to 2.4 tails with their SAEs, as
# measured in benchmarks/README.md).
ABLATION_TAILS = 1
ORIGINAL_PASS = 2
# A cut uses fewer runs than it may rather than let the original passes it repeats add
# more than this share to the file's work. Shards are held tighter than xdist workers: each
# shard is a machine that also pays its own start-up (install, model load) for the split.
XDIST_SPLIT_BUDGET = 0.10
SHARD_SPLIT_BUDGET = 0.05


@dataclass(frozen=True)
class Shard:
    """Share `index` (1-based) of `count`."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`"I/N"` with 1 <= I <= N; anything else is one line naming what was expected."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            index = count = 0
        if not 1 <= index <= count:
            raise ConfigError(f"shard {text!r}: expected I/N with 1 <= I <= N (e.g. 2/3)")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def empty_note(self) -> str:
        """What an empty shard says: it passes, having nothing to do."""
        return (
            f"shard {self}: no SAEs in this shard (fewer units than shards, or splitting a model "
            f"further would repeat its passes beyond the {SHARD_SPLIT_BUDGET:.0%} budget); nothing to do"
        )


# Where a run id comes from when none is given: GitHub Actions' run (the same across its
# re-run attempts, whose shards belong together), then a Slurm job array's job.
RUN_ID_VARIABLES = ("GITHUB_RUN_ID", "SLURM_ARRAY_JOB_ID")


def run_id(given: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The run a shard belongs to: `given` (`--run-id`), else the CI system's run id, else none."""
    return given or next((environ[name] for name in RUN_ID_VARIABLES if environ.get(name)), None)


def run_fingerprint(files: Iterable[LoadedThresholds], count: int, inputs: Iterable[Path] = ()) -> str:
    """What a shard ran on, so `merge` joins only shards of one gate: the thresholds files'
    content and eval settings, the shard count, this project's version, and the bytes of other
    `inputs` (the baseline compared against)."""
    digest = hashlib.sha256(f"{PROJECT_VERSION}\n{count}\n".encode())
    for loaded in sorted(files, key=lambda f: str(f.path)):
        digest.update((loaded.text or loaded.config.model_dump_json()).encode())
        digest.update(loaded.config.eval.model_dump_json().encode())
    for path in inputs:
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()[:16]


def recorded(loaded: LoadedThresholds, entry: SAEEntry) -> dict[str, str]:
    """The model and hook an SAE's local `cfg.json` records (SAELens `metadata.*`, flat
    `hook_name`/`model_name`, older `hook_point`); empty for hub SAEs and other layouts."""
    if is_remote(entry.path):
        return {}
    try:
        cfg = read_json(Path(loaded.resolve(entry.path)) / "cfg.json", "an SAE config")
    except SAEAcceptanceError:  # the SAE's reader names what is wrong with it
        return {}
    if not isinstance(cfg, dict):
        return {}
    meta = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}
    found = {}
    for key, names in (("hook", ("hook_name", "hook_point")), ("model", ("model_name",))):
        value = next((v for name in names for v in (meta.get(name), cfg.get(name)) if isinstance(v, str) and v), None)
        if value:
            found[key] = value
    return found


@dataclass(frozen=True)
class Group:
    """SAEs evaluated together: those of one model and hook (`hook` is the SAE's name where its hook
    is unknown until it loads, a group of its own)."""

    model: str
    hook: str


def group_of(loaded: LoadedThresholds, entry: SAEEntry) -> Group:
    """An SAE's group: the entry's model and hook, else those its cfg.json records."""
    seen = recorded(loaded, entry) if entry.hook is None or not (entry.model or loaded.config.eval.model) else {}
    model = Path(entry.model or loaded.config.eval.model or seen.get("model") or "").name
    return Group(model, entry.hook or seen.get("hook") or entry.display_name)


def groups(loaded: LoadedThresholds) -> dict[Group, list[str]]:
    """SAE names by group, in file order."""
    out: dict[Group, list[str]] = {}
    for entry in loaded.config.sae:
        out.setdefault(group_of(loaded, entry), []).append(entry.display_name)
    return out


def group_cost(n_saes: int) -> int:
    """A group's tail passes per batch: the zero-ablation and one per SAE."""
    return ABLATION_TAILS + n_saes


def units(loaded: LoadedThresholds, by_group: dict[Group, list[str]]) -> list[list[Group]]:
    """Groups (`by_group`, from `groups`) joined by the splices that span them: what one machine
    or worker must evaluate together. In file order."""
    of_name = {name: key for key, names in by_group.items() for name in names}
    parent = {key: key for key in by_group}

    def root(key: Group) -> Group:
        while parent[key] != key:
            key = parent[key]
        return key

    for splice in loaded.config.splice:
        members = [of_name[name] for name in splice.saes if name in of_name]
        for other in members[1:]:
            parent[root(other)] = root(members[0])
    joined: dict[Group, list[Group]] = {}
    for key in by_group:
        joined.setdefault(root(key), []).append(key)
    return list(joined.values())


def shard_members(loaded: LoadedThresholds, shard: Shard) -> list[str]:
    """The SAE names `shard` evaluates, in file order: the same answer on every machine. Shard 1
    also evaluates every `[[clt]]` (its key, `clt:<name>`): a CLT is one unit of its own."""
    clts = [clt.key for clt in loaded.config.clt] if shard.index == 1 else []
    if not loaded.config.sae:
        return clts
    by_group, joined, runs = _cut(loaded, shard.count, budget=SHARD_SPLIT_BUDGET)
    mine = {key for i in runs[shard.index - 1] for key in joined[i]}
    return [name for key, names in by_group.items() if key in mine for name in names] + clts


def xdist_runs(loaded: LoadedThresholds, workers: int) -> dict[str, int]:
    """Every SAE name, splice key (`splice:<name>`) and CLT key (`clt:<name>`, all in the first
    run) -> the xdist run (of at most `workers`) that evaluates it: the scope whose SAEs and
    splices a worker evaluates together, one pass per model."""
    clts = dict.fromkeys((clt.key for clt in loaded.config.clt), 0)
    if not loaded.config.sae:
        return clts
    by_group, joined, runs = _cut(loaded, workers, budget=XDIST_SPLIT_BUDGET)
    run_of = {name: r for r, run in enumerate(runs) for i in run for key in joined[i] for name in by_group[key]}
    run_of.update({splice.key: run_of[splice.saes[0]] for splice in loaded.config.splice})
    return run_of | clts


def _cut(
    loaded: LoadedThresholds, count: int, budget: float | None
) -> tuple[dict[Group, list[str]], list[list[Group]], list[list[int]]]:
    """The file's groups, its units, and their cut into `count` runs (indices into the units)."""
    by_group = groups(loaded)
    joined = units(loaded, by_group)
    costs = [sum(group_cost(len(by_group[key])) for key in unit) for unit in joined]
    models = [{key.model for key in unit} for unit in joined]
    return by_group, joined, partition(costs, models, count, budget)


def partition(costs: list[int], models: list[set[str]], count: int, budget: float | None = None) -> list[list[int]]:
    """Cut units (their tail `costs` and the `models` each runs) into `count` contiguous runs
    of indices, minimising the costliest run; a run also pays one original pass per model in it.
    Of the cuts that reach that least largest cost, the one with the least work (no model split
    further than the balance needs; runs left empty where more would not help), the latest on
    ties so that empty runs come last. Exact, by dynamic programming.

    With a `budget`, the most non-empty runs whose cut costs at most `1 + budget` times the
    work of one run, the rest empty: repeated original passes are work no exact eval needs.
    """
    n = len(costs)
    cost = np.zeros((n + 1, n + 1))  # [k, i]: units k..i-1 as one run; 0 when empty
    for k in range(n):
        tails, seen = 0, set[str]()
        for i in range(k + 1, n + 1):
            tails, seen = tails + costs[i - 1], seen | models[i - 1]
            cost[k, i] = tails + ORIGINAL_PASS * len(seen)

    def cut_into(used: int) -> tuple[float, list[list[int]]]:
        """The work and the runs of the best cut into `used` runs, padded to `count`."""
        largest, _ = _best_cut(cost, used, np.maximum, np.inf)
        work, runs = _best_cut(cost, used, np.add, largest)
        return work, runs + [[] for _ in range(count - used)]

    for used in range(count, 1, -1):
        work, runs = cut_into(used)
        if budget is None or work <= (1 + budget) * cost[0, n]:
            return runs
    return cut_into(1)[1]


def _best_cut(cost: np.ndarray, runs: int, combine: np.ufunc, limit: float) -> tuple[float, list[list[int]]]:
    """The cut into `runs` contiguous runs, none costing more than `limit`, whose run costs
    `combine` (maximum: the largest run; add: the work) to the least; the latest of equals."""
    n = cost.shape[0] - 1
    allowed = np.triu(cost <= limit)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cuts = []
    for _ in range(runs):
        scores = np.where(allowed, combine(best[:, None], cost), np.inf)
        start = n - np.argmin(scores[::-1], axis=0)  # the latest k of the least score
        best = scores[start, np.arange(n + 1)]
        cuts.append(start)
    out, end = [], n
    for start in reversed(cuts):
        out.append(list(range(int(start[end]), end)))
        end = int(start[end])
    return float(best[n]), out[::-1]
