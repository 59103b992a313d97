"""Sweep profiles -> trained SAEs (content-addressed cache) -> the gate -> the analysis tables.

Every SAE of a k grid at one hookpoint trains from one pass over the data. A
trained grid is cached under a key that covers every training input (model, hook,
k grid, data and the tokens' fingerprint, trainer settings, trainer version),
behind a file lock, so pytest-xdist workers share it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_acceptance import __version__ as PROJECT_VERSION
from sae_acceptance.config import eval_default, thresholds_from_mapping
from sae_acceptance.evaluate import evaluate
from sae_acceptance.gate import Outputs, exit_status, verdict_line, write_outputs
from sae_acceptance.hooks import HookPoint
from sae_acceptance.io import OutputError, locked, write_json
from sae_acceptance.report import format_report
from sae_acceptance.results import EvalReport, ShardRecord
from sae_acceptance.shard import Shard, group_cost, partition, run_id
from sae_acceptance.sources.identity import model_identity
from sae_acceptance.sources.model import ModelCache
from sae_acceptance.sources.tokens import fingerprint as tokens_fingerprint
from sae_acceptance.sources.tokens import load_tokens

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
from sae_acceptance.train import builtin_profiles
from sae_acceptance.train.analysis import write_analysis
from sae_acceptance.train.grid import train_at_hook
from sae_acceptance.train.sweep_profile import Profile, load_profile
from sae_acceptance.train.topk import TRAINER_VERSION

__all__ = ["BUILTIN_PROFILES", "cache_key", "default_cache", "load_profile", "run_sweep", "sweep"]

BUILTIN_PROFILES = builtin_profiles()
POINT_METRICS = ("r2", "ce_rec", "cosine", "rel_error", "mse_mean", "alive_frac", "rate_bits")
# Another worker may be training the grid this one waits for: wait as long as that takes.
TRAINING_LOCK_TIMEOUT_S = math.inf


def sweep_sae_name(model: str, depth: str, k: int) -> str:
    """The name of a sweep's SAE of `model` at `depth` with TopK `k`."""
    return f"{model}-{depth}-k{k}"


def default_cache() -> Path:
    """Where trained sweep SAEs are kept between runs."""
    return Path.home() / ".cache" / "sae-acceptance" / "sweeps"


def cache_key(model: str, hook: str, profile: Profile, tokens_hash: str) -> str:
    """Hash of every training input: a change anywhere trains anew."""
    inputs = {
        "model": model_identity(model),
        "hook": hook,
        "ks": sorted(profile.ks),
        "data": profile.data.model_dump(),
        "tokens_fingerprint": tokens_hash,
        "train": profile.train.model_dump(exclude={"k"}),
        "trainer_version": TRAINER_VERSION,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def train_or_load_grid(
    model: HookedTransformer,
    model_name: str,
    hook: str,
    profile: Profile,
    cache: Path,
    progress: bool = True,
    wait: bool = True,
) -> dict[int, Path] | None:
    """The k grid at `hook`, trained once and cached; returns the SAE directories by k.

    With `wait=False`, None when another process holds the grid's lock (it is training it)."""
    data = profile.data
    n_train = data.train_tokens // data.context_size + 1
    tokens = load_tokens(data.dataset, n_train, data.context_size, 0, model.tokenizer, data.column)
    key = cache_key(model_name, hook, profile, tokens_fingerprint(tokens))
    folder = cache / key
    paths = {k: folder / f"k{k}" for k in profile.ks}
    if not wait and not all((p / "cfg.json").exists() for p in paths.values()):
        try:
            with locked(folder, 0):
                pass
        except OutputError:
            return None
    with locked(folder, TRAINING_LOCK_TIMEOUT_S):
        if all((p / "cfg.json").exists() for p in paths.values()):
            return paths
        metadata = {"context_size": data.context_size, "dataset_path": data.dataset, "cache_key": key}
        train_at_hook(
            model,
            model_name,
            tokens,
            hook,
            profile.ks,
            profile.train_settings(),
            paths,
            data.train_tokens,
            metadata,
            progress=progress,
        )
        return paths


def grids(profile: Profile) -> list[tuple[Any, str, int]]:
    """The profile's (model spec, depth, layer) grids, in profile order."""
    return [(spec, depth, layer) for spec in profile.model for depth, layer in spec.layers.items()]


def grid_runs(profile: Profile, count: int) -> list[list[int]]:
    """The profile's grids cut into `count` contiguous runs balanced by cost (`shard.partition`)."""
    all_grids = grids(profile)
    return partition([group_cost(len(profile.ks))] * len(all_grids), [{spec.name} for spec, _, _ in all_grids], count)


def run_sweep(
    profile: Profile,
    out: Path,
    cache: Path,
    device: str | None = None,
    progress: bool = True,
    shard: Shard | None = None,
    worker: tuple[int, int] | None = None,
) -> tuple[EvalReport, list[dict[str, Any]]]:
    """Train (or load) every SAE of the profile, gate them; writes report.json and points.json.

    `shard`: only that shard of the grids (the report records it, for `merge`). `worker`
    (xdist worker i of n): start with run i of n and pass over grids another process is
    training, coming back to them at the end, so workers train different grids at once.
    """
    models = ModelCache()
    device = device or eval_default("device")
    dtype = eval_default("dtype")
    all_grids = grids(profile)
    chosen = list(range(len(all_grids)))
    if shard is not None:
        chosen = grid_runs(profile, shard.count)[shard.index - 1]
        if not chosen:
            print(shard.empty_note())
    order = chosen
    if worker is not None:
        first = next(iter(grid_runs(profile, worker[1])[worker[0]]), 0)
        order = [i for i in chosen if i >= first] + [i for i in chosen if i < first]
    trained: dict[int, dict[int, Path]] = {}
    for wait in (worker is None, True):
        for i in order:
            if i not in trained:
                spec, _, layer = all_grids[i]
                model = models.get(spec.name, {}, device, dtype)
                hook = HookPoint.at(layer).name
                found = train_or_load_grid(model, spec.name, hook, profile, cache, progress, wait=wait)
                if found is not None:
                    trained[i] = found
    entries, where = [], {}
    for i in chosen:
        spec, depth, layer = all_grids[i]
        d_model = models.get(spec.name, {}, device, dtype).cfg.d_model
        for k, path in trained[i].items():
            name = sweep_sae_name(spec.shown, depth, k)
            entries.append({"name": name, "path": str(path), "model": spec.name, "hook": HookPoint.at(layer).name})
            where[name] = {
                "model": spec.shown,
                "d_model": d_model,
                "layer": layer,
                "depth": depth,
                "k": k,
                "train_tokens": profile.data.train_tokens,
            }
    report = (
        evaluate(
            thresholds_from_mapping(_thresholds(profile, entries, device), f"profile {profile.name}"),
            progress=progress,
            models=models,
        )
        if entries
        else EvalReport.empty()
    )
    points = [where[name] | _scores(result.metrics) for name, result in report.saes.items()]
    if shard is not None:
        fingerprint = hashlib.sha256(f"{PROJECT_VERSION}\n{shard.count}\n{profile.model_dump_json()}".encode())
        report.shard = ShardRecord(shard.index, shard.count, list(where), run_id(None), fingerprint.hexdigest()[:16])
    write_outputs(report, Outputs(json=out / "report.json", actions=False))
    write_json(out / "points.json", points)
    return report, points


def _thresholds(profile: Profile, entries: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """The gate's settings for the profile's SAEs, as thresholds.toml would hold them."""
    ev = profile.eval
    return {
        "eval": {
            "data": ev.dataset or profile.data.dataset,
            "column": profile.data.column,
            "n_sequences": ev.n_sequences,
            "context_size": profile.data.context_size,
            "skip": ev.skip,
            "batch_size": ev.batch_size,
            "device": device,
        },
        "gate": {name: bound.model_dump(exclude_none=True) for name, bound in profile.gate.items()},
        "sae": entries,
    }


def _scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """A point's metric values; None where not measured or not finite (JSON has no NaN)."""
    shown = {name: metrics[name].to_dict() for name in POINT_METRICS if name in metrics}
    scores: dict[str, Any] = {name: shown[name]["value"] if name in shown else None for name in POINT_METRICS}
    scores["ce_rec_ci"] = shown["ce_rec"]["ci"] if "ce_rec" in shown else None
    return scores


def sweep(
    profile: str,
    out: Path,
    cache: Path | None = None,
    device: str | None = None,
    progress: bool = True,
    shard: Shard | None = None,
) -> int:
    """The `sweep` command: train, gate and tabulate a profile (a built-in name or a file).

    Prints the gate's report; returns the exit status (0 passed, 1 failed). A shard writes its
    report and points only: `sae-acceptance merge` writes the tables from every shard's.
    """
    report, points = run_sweep(load_profile(profile), out, cache or default_cache(), device, progress, shard)
    print(format_report(report))
    if shard is None:
        write_analysis(points, out)
        print(f"tables and plots written to {out}")
    else:
        print(f"shard {shard} written to {out}; merge the shards with `sae-acceptance merge --sweep-out DIR`")
    print(verdict_line(report))
    return exit_status(report)  # 2 where an SAE could not be evaluated, as everywhere
