"""Error and warning types: one clear message each, naming the file, line or field.

No pytest here: the library raises these without it, and the plugin turns them
into test outcomes.
"""

from __future__ import annotations

# One rule for every way the tool ends, CLI and pytest alike: all as expected, a gate or
# regression check failed, bad input or an error of the tool itself.
EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


class SAEAcceptanceError(Exception):
    """Base of every error this library raises on bad input."""


class ConfigError(SAEAcceptanceError):
    """thresholds.toml (or a CLI argument) is malformed."""


class SAEFormatError(SAEAcceptanceError):
    """An SAE directory cannot be read as any supported format."""


class SourceError(SAEAcceptanceError):
    """A model, hook or token source does not fit what was asked."""


class ReportError(SAEAcceptanceError):
    """A report that cannot be read or merged: not a shard's, missing, repeated, cut short, or
    from another run."""


class BaselineError(SAEAcceptanceError):
    """A regression baseline is corrupt, foreign or measured on something else.

    `remedy` says what fixes it, for the caller to name in its own flags
    (`baseline.remedy`): "refresh" the baseline, or "force" a refresh that replaces it.
    """

    def __init__(self, message: str, remedy: str | None = None) -> None:
        super().__init__(message)
        self.remedy = remedy


class R2ProxyWarning(UserWarning):
    """R² at a layer the PR canyon flags: variance-normalised, likely inflated.

    Escalate with `-W error::sae_acceptance.R2ProxyWarning` (pytest or python).
    """


class HookOverrideWarning(UserWarning):
    """A `hook` in thresholds.toml (or `eval --hook`) that differs from the hook the SAE's
    cfg.json records: an SAE is only meaningful on the activations it was trained on.

    Escalate with `-W error::sae_acceptance.HookOverrideWarning`.
    """
