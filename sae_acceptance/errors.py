"""Error and warning types: one clear message each, naming the file, line or field.

No pytest here: the library raises these without it, and the plugin turns them
into test outcomes.
"""

from __future__ import annotations


class SAEAcceptanceError(Exception):
    """Base of every error this library raises on bad input."""


class ConfigError(SAEAcceptanceError):
    """thresholds.toml (or a CLI argument) is malformed."""


class SAEFormatError(SAEAcceptanceError):
    """An SAE directory cannot be read as any supported format."""


class SourceError(SAEAcceptanceError):
    """A model, hook or token source does not fit what was asked."""


class BaselineError(SAEAcceptanceError):
    """A regression baseline is corrupt, foreign or measured on something else."""


class R2ProxyWarning(UserWarning):
    """R² at a layer the PR canyon flags: variance-normalised, likely inflated.

    Escalate with `-W error::sae_acceptance.R2ProxyWarning` (pytest or python).
    """
