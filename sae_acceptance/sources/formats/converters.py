"""``sae-lens://release/sae_id`` through the loader function SAELens's directory names for the release.

Each SAELens loader downloads the files it needs with `hf_hub_download` (so
huggingface_hub's cache, token and offline mode apply) and returns a config
dict and a state dict in SAELens's names; `saelens.from_config` maps those onto
the project's `SAE`. No SAELens model class is built. While a loader runs,
`torch.load` reads tensors only, and safetensors headers come from the cache
instead of an HTTP range request, so a warm cache works offline.

A loader is called with the dtype asked for (float32 unless asked otherwise, as
`SAE.from_pretrained`), so it reads, folds and rounds in that dtype only: the
tensors are SAELens's own for that dtype, bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sae_acceptance.errors import SAEFormatError
from sae_acceptance.sources.formats import saelens
from sae_acceptance.sources.formats.layouts import read_directory
from sae_acceptance.sources.formats.tensors import tensors_only_load
from sae_acceptance.sources.hub import fetch_folder, saelens_entry
from sae_acceptance.sources.sae import SAE

CLT = (
    "SAELens loads one layer of a cross-layer transcoder by summing its decoders over every layer it "
    "writes to, which is not the output at any one hook, so a patched loss would not measure the CLT"
)
REFUSED = {
    "temporal": "a temporal SAE's latents depend on earlier tokens through attention layers, not a per-token encoder",
    "mntss_clt_layer_transcoder": CLT,
}


def refusal(conversion_func: str, folder: str) -> str | None:
    """Why the project does not load this directory entry, or None when it does."""
    if conversion_func in REFUSED:
        return REFUSED[conversion_func]
    if conversion_func == "gemma_3" and "clt" in folder:
        return CLT
    return None


def load_release(spec: str, dtype: torch.dtype | None = None) -> SAE:
    """The SAE that SAELens's directory entry `spec` names, through SAELens's own converter, in
    `dtype` (None: float32, `SAE.from_pretrained`'s default)."""
    dtype = dtype or torch.float32
    lookup, release, sae_id = saelens_entry(spec)
    func = lookup.conversion_func or "sae_lens"
    folder = lookup.saes_map[sae_id]
    why = refusal(func, folder)
    if why is not None:
        raise SAEFormatError(f"{spec}: SAELens conversion function {func!r} is refused: {why}")
    if func == "sparsify":  # our reader: SAELens's maps sparsify onto a SAELens TopK, losing transcode/skip/groupmax
        return _read_fetched(spec, fetch_folder(spec, lookup.repo_id, None, folder)).to(dtype=dtype)
    # lazy on purpose: sae-lens is optional (saelens_entry has checked it is installed)
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from sae_lens.loading.pretrained_saes_directory import get_config_overrides

    loader = loaders.NAMED_PRETRAINED_SAE_LOADERS.get(func)
    if loader is None:
        raise SAEFormatError(f"{spec}: SAELens conversion function {func!r} is not in this SAELens's registry")
    try:
        with _guarded(loaders), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg, state, _ = loader(
                repo_id=lookup.repo_id,
                folder_name=folder,
                device="cpu",
                force_download=False,
                cfg_overrides={**get_config_overrides(release, sae_id), "dtype": str(dtype).removeprefix("torch.")},
            )
    except SAEFormatError as err:
        raise SAEFormatError(f"{spec}: {err}") from None
    except Exception as err:  # its download, a missing key, a config it cannot parse
        first = (str(err).strip().splitlines() or [""])[0]
        raise SAEFormatError(f"{spec}: SAELens's {func!r} loader failed ({type(err).__name__}: {first})") from err
    factors = lookup.norm_scaling_factor or {}
    where = f"{spec} ({func})"
    return saelens.from_config(cfg, state, where=where, norm_scaling_factor=factors.get(sae_id), dtype=dtype)


def _read_fetched(spec: str, path: Path) -> SAE:
    try:
        return read_directory(path)
    except SAEFormatError as err:
        raise SAEFormatError(f"{spec}: {err}") from None


@contextmanager
def _guarded(loaders: Any) -> Iterator[None]:
    """Tensors-only `torch.load` and cache-served safetensors headers while a SAELens loader runs."""
    saved = torch.load, loaders.get_safetensors_tensor_shapes
    torch.load, loaders.get_safetensors_tensor_shapes = tensors_only_load, _tensor_shapes  # type: ignore[assignment]  # a narrower load, while the loader runs
    try:
        yield
    finally:
        torch.load, loaders.get_safetensors_tensor_shapes = saved


def _tensor_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
    """Shapes in a hub safetensors file, read from the cached file (its loader downloads it next anyway)."""
    from huggingface_hub import hf_hub_download  # lazy on purpose: only SAELens releases need it
    from safetensors import safe_open

    with safe_open(hf_hub_download(repo_id, filename), framework="pt") as f:
        return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
