"""Sweep profiles: which models, layers, k grid, data and training budget a sweep covers.

A profile is a TOML file, or the name of one shipped in `profiles/`. Its `[train]`
table is the trainer's own `TrainSettings` (the k grid is the top-level `ks`).
Every mistake is one `ConfigError` naming the file, the line and the field.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pydantic import Field, PositiveInt, ValidationError, field_validator

from sae_acceptance.config import Bound, EvalSettings, StrictModel, describe, read_toml
from sae_acceptance.errors import ConfigError
from sae_acceptance.train import builtin_profiles
from sae_acceptance.train.settings import TrainSettings

DEFAULT_PROFILE = "tiny"  # what `--sae-sweep` runs when no profile is named: CPU-sized


class DataSpec(StrictModel):
    """A profile's training stream."""

    dataset: str
    """hub dataset name or local path of the token stream"""
    column: str | None = None
    """the column read: token ids or text (default: tokens, input_ids or text, the first present)"""
    context_size: int = Field(gt=1)
    """tokens per sequence"""
    train_tokens: int = Field(gt=0)
    """tokens each SAE trains on"""


class EvalSpec(StrictModel):
    """A profile's eval set; unset fields take thresholds.toml's defaults (`EvalSettings`)."""

    dataset: str | None = Field(None, description="default: the training stream, skipped ahead")
    n_sequences: int = Field(EvalSettings.model_fields["n_sequences"].default, gt=0)
    """sequences in the eval set"""
    skip: int = Field(EvalSettings.model_fields["skip"].default, ge=0)
    """sequences skipped first (held out from training)"""
    batch_size: int = Field(EvalSettings.model_fields["batch_size"].default, gt=0)
    """sequences per forward pass"""


class ModelSpec(StrictModel):
    """A model of the sweep and the layers its SAEs train at."""

    name: str
    """hub name or local dir of the model"""
    layers: dict[str, int]
    """depth name (early, mid, late, ...) -> layer; an SAE grid trains at each"""
    label: str | None = Field(None, description="in SAE names, tables and plots; default: the name's last part")

    @property
    def shown(self) -> str:
        """The model's name as SAE names, tables and plots show it."""
        return self.label or Path(self.name).name


class Profile(StrictModel):
    """A sweep profile: the SAEs to train (models x layers x k), their data, and how they are gated."""

    name: str
    """the profile's name, in the sweep's outputs"""
    ks: list[PositiveInt] = Field(min_length=1)
    """the TopK k grid trained at each layer"""
    data: DataSpec
    """the training stream"""
    eval: EvalSpec = EvalSpec()
    """the eval set"""
    train: TrainSettings = TrainSettings()
    """the trainer's settings"""
    model: list[ModelSpec] = Field(min_length=1)
    """the models and their layers"""
    gate: dict[str, Bound] = Field(default_factory=dict)
    """bounds on the trained SAEs' metrics"""

    @field_validator("train")
    @classmethod
    def _k_is_the_grid(cls, train: TrainSettings) -> TrainSettings:
        if "k" in train.model_fields_set:
            raise ValueError("k is not a [train] setting: a profile's k values are its top-level `ks`")
        return train

    def train_settings(self) -> TrainSettings:
        """The trainer's settings for this profile's grid (its largest k; the grid sets each SAE's)."""
        return self.train.model_copy(update={"k": max(self.ks)})


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name, or a profile file."""
    builtin = builtin_profiles()
    if name_or_path in builtin:
        path = Path(str(resources.files("sae_acceptance.train").joinpath("profiles").joinpath(f"{name_or_path}.toml")))
        where = f"profile {name_or_path}"
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise ConfigError(f"{path}: no such profile (built in: {', '.join(builtin)})")
        where = str(path)
    raw, text = read_toml(path)
    try:
        return Profile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe(err, text, where)) from None
