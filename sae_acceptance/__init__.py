"""sae-acceptance: gate SAE releases on what the model does with the reconstruction.

Behaviour (patched cross-entropy, KL) is the acceptance test; reconstruction
bounds that do not divide by variance (cosine, relative error) come second; R²
is reported, and raised as `R2ProxyWarning` where the PR canyon flags the layer.

Public names load on first use, so `import sae_acceptance.config` (or the pytest
plugin in an unrelated test suite) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "BaselineError": "sae_acceptance.errors",
    "ConfigError": "sae_acceptance.errors",
    "R2ProxyWarning": "sae_acceptance.errors",
    "HookOverrideWarning": "sae_acceptance.errors",
    "SAEAcceptanceError": "sae_acceptance.errors",
    "SAEFormatError": "sae_acceptance.errors",
    "SourceError": "sae_acceptance.errors",
    "load_thresholds": "sae_acceptance.config",
    "EvalReport": "sae_acceptance.results",
    "SAEResult": "sae_acceptance.results",
    "evaluate": "sae_acceptance.evaluate",
    "run_gate": "sae_acceptance.gate",
    "load_backend": "sae_acceptance.sources.model",
    "load_model": "sae_acceptance.sources.model",
    "SAE": "sae_acceptance.sources.sae",
    "load_sae": "sae_acceptance.sources.sae_io",
    "save_sae": "sae_acceptance.sources.sae_io",
    "load_tokens": "sae_acceptance.sources.tokens",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'sae_acceptance' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
