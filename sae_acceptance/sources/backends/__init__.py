"""Model backends: what the engine needs from a model, for each library that can run one.

`as_backend` wraps a model object the project already holds (a TransformerLens 3
`HookedTransformer`, a TransformerLens 4 `TransformerBridge`, a Hugging Face causal
LM); `sources.model.load_backend` loads one by name.
"""

from __future__ import annotations

import contextlib
from typing import Any

from sae_acceptance.sources.backends.base import Backend, Pass, Patch, Site

__all__ = ["Backend", "Pass", "Patch", "Site", "as_backend"]


def as_backend(model: Any) -> Backend:
    """The backend for `model` (a backend itself is returned as is; one wrapper per model object)."""
    if isinstance(model, Backend):
        return model
    cached = getattr(model, "_sae_acceptance_backend", None)
    if cached is not None:
        return cached
    backend = _wrap(model)
    with contextlib.suppress(AttributeError):
        model._sae_acceptance_backend = backend
    return backend


def _wrap(model: Any) -> Backend:
    """The backend for a loaded model; its module is imported here because TransformerLens 3
    and 4 cannot both be installed (each module imports its own version's classes)."""
    kind = type(model).__name__
    if kind == "TransformerBridge":
        from sae_acceptance.sources.backends.bridge import BridgeBackend

        return BridgeBackend.wrap(model)
    if hasattr(model, "hook_dict") and hasattr(model, "cfg"):
        from sae_acceptance.sources.backends.transformer_lens import TransformerLensBackend

        return TransformerLensBackend.wrap(model)
    if hasattr(model, "config") and hasattr(model, "get_output_embeddings"):
        from sae_acceptance.sources.backends.hf import HFBackend

        return HFBackend.wrap(model)
    raise TypeError(f"no backend for a {kind}: expected a HookedTransformer, TransformerBridge or causal LM")
