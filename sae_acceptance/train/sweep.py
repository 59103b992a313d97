"""Sweep profiles -> trained SAEs (content-addressed cache) -> the gate -> the log's tables.

A profile (TOML) names models, their layers by depth, a k grid, a data stream
and a training budget. Every SAE of a k grid at one hookpoint trains from one
pass over the data. A trained grid is cached under a key that covers every
training input (model, hook, k grid, data and its fingerprint, trainer config,
trainer version), behind a file lock, so pytest-xdist workers share it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sae_acceptance.config import Bound, describe, thresholds_from_mapping
from sae_acceptance.errors import ConfigError
from sae_acceptance.evaluate import EvalReport, evaluate
from sae_acceptance.report import format_report, write_atomic
from sae_acceptance.sources.model import ModelCache, model_identity
from sae_acceptance.sources.tokens import fingerprint, load_tokens
from sae_acceptance.train import Optimizer, builtin_profiles
from sae_acceptance.train.topk import TRAINER_VERSION, TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUILTIN_PROFILES = builtin_profiles()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    dataset: str
    column: str | None = None
    context_size: int = Field(gt=1)
    train_tokens: int = Field(gt=0)


class EvalSpec(_Strict):
    dataset: str | None = None  # default: the training stream, skipped ahead
    n_sequences: int = Field(200, gt=0)
    skip: int = Field(0, ge=0)
    batch_size: int = Field(8, gt=0)


class TrainSpec(_Strict):
    optimizer: Optimizer = TrainConfig.optimizer
    expansion_factor: int = 32
    batch_size: int = 4096
    lr: float | None = None
    warmup_steps: int = 100
    dead_tokens: int = 10_000_000
    seed: int = 0


class ModelSpec(_Strict):
    name: str
    layers: dict[str, int]
    label: str | None = None  # in SAE names, tables and plots; default: the name's last part

    @property
    def shown(self) -> str:
        return self.label or Path(self.name).name


class Profile(_Strict):
    name: str
    ks: list[int] = Field(min_length=1)
    data: DataSpec
    eval: EvalSpec = EvalSpec()
    train: TrainSpec = TrainSpec()
    model: list[ModelSpec] = Field(min_length=1)
    gate: dict[str, Bound] = Field(default_factory=dict)


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name, or a profile file."""
    if name_or_path in BUILTIN_PROFILES:
        text = resources.files("sae_acceptance.train").joinpath("profiles", f"{name_or_path}.toml").read_text()
        where = f"profile {name_or_path}"
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise ConfigError(f"{path}: no such profile (built in: {', '.join(BUILTIN_PROFILES)})")
        text, where = path.read_text(), str(path)
    try:
        return Profile.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}: not valid TOML ({err})") from None
    except ValidationError as err:
        raise ConfigError(describe(err, text, where)) from None


def sae_name(model: str, depth: str, k: int) -> str:
    return f"{model}-{depth}-k{k}"


def cache_key(model: str, hook: str, profile: Profile, data_fingerprint: str) -> str:
    """Hash of every training input: a change anywhere trains anew."""
    inputs = {
        "model": model_identity(model),
        "hook": hook,
        "ks": sorted(profile.ks),
        "data": profile.data.model_dump(),
        "data_fingerprint": data_fingerprint,
        "train": profile.train.model_dump(),
        "trainer_version": TRAINER_VERSION,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def train_or_load_grid(model, model_name: str, hook: str, profile: Profile, cache: Path, progress: bool = True) -> dict[int, Path]:
    """The k grid at `hook`, trained once and cached; returns the SAE directories by k."""
    from filelock import FileLock

    from sae_acceptance.train.hookpoint import train_at_hook

    data = profile.data
    n_train = data.train_tokens // data.context_size + 1
    tokens = load_tokens(data.dataset, n_train, data.context_size, 0, model.tokenizer, data.column)
    key = cache_key(model_name, hook, profile, fingerprint(tokens))
    folder = cache / key
    paths = {k: folder / f"k{k}" for k in profile.ks}
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if all((p / "cfg.json").exists() for p in paths.values()):
            return paths
        cfg = TrainConfig(k=max(profile.ks), **profile.train.model_dump())  # TrainSpec's fields are TrainConfig's
        metadata = {"context_size": data.context_size, "dataset_path": data.dataset, "cache_key": key}
        train_at_hook(model, model_name, tokens, hook, profile.ks, cfg, paths, data.train_tokens, metadata,
                      progress=progress)
        return paths


def run_sweep(profile: Profile, out: Path, cache: Path, device: str = "auto", progress: bool = True) -> tuple[EvalReport, list[dict[str, Any]]]:
    """Train (or load) every SAE of the profile, gate them, and return the report and sweep points."""
    models = ModelCache()
    entries, meta = [], {}
    for spec in profile.model:
        model = models.get(spec.name, {}, device, "float32")
        for depth, layer in spec.layers.items():
            hook = f"blocks.{layer}.hook_resid_post"
            grid = train_or_load_grid(model, spec.name, hook, profile, cache, progress)
            for k, path in grid.items():
                name = sae_name(spec.shown, depth, k)
                entries.append({"name": name, "path": str(path), "model": spec.name, "hook": hook})
                meta[name] = {"model": spec.shown, "d_model": model.cfg.d_model, "layer": layer,
                              "depth": depth, "k": k, "train_tokens": profile.data.train_tokens}
    ev = profile.eval
    mapping = {
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
    report = evaluate(thresholds_from_mapping(mapping, f"profile {profile.name}"), progress=progress, models=models)
    points = []
    for name, result in report.saes.items():
        metrics = result.metrics
        point = dict(meta[name])
        for metric in ("r2", "ce_rec", "cosine", "rel_error", "mse_mean", "alive_frac", "rate_bits"):
            point[metric] = metrics[metric].value if metric in metrics else None
        point["ce_rec_ci"] = list(metrics["ce_rec"].ci) if "ce_rec" in metrics else None
        points.append(point)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", report.to_json())
    write_atomic(out / "points.json", json.dumps(points, indent=2) + "\n")
    return report, points


def default_cache() -> Path:
    return Path.home() / ".cache" / "sae-acceptance" / "sweeps"


def run_sweep_command(args) -> int:
    from sae_acceptance.train.analysis import write_analysis

    profile = load_profile(args.profile)
    report, points = run_sweep(profile, args.out, args.cache or default_cache(), args.device, not args.no_progress)
    print(format_report(report))
    write_analysis(points, args.out)
    print(f"tables and plots written to {args.out}")
    return 0 if report.passed else 1
