"""sae-acceptance: gate SAE releases on what the model does with the reconstruction.

Behaviour (patched cross-entropy, KL) is the acceptance test; reconstruction
bounds that do not divide by variance (cosine, relative error) come second; R²
is reported, and raised as `R2ProxyWarning` where the PR canyon flags the layer.
"""

__version__ = "0.1.0"

from sae_acceptance.config import load_thresholds  # noqa: E402
from sae_acceptance.errors import (
    BaselineError,
    ConfigError,
    R2ProxyWarning,
    SAEAcceptanceError,
    SAEFormatError,
    SourceError,
)
from sae_acceptance.evaluate import EvalReport, SAEResult, evaluate
from sae_acceptance.sources.model import load_model
from sae_acceptance.sources.sae import SAE, load_sae, save_sae
from sae_acceptance.sources.tokens import load_tokens

__all__ = [
    "SAE",
    "BaselineError",
    "ConfigError",
    "EvalReport",
    "R2ProxyWarning",
    "SAEAcceptanceError",
    "SAEFormatError",
    "SAEResult",
    "SourceError",
    "evaluate",
    "load_model",
    "load_sae",
    "load_thresholds",
    "load_tokens",
    "save_sae",
]
