"""SAE formats on disk -> one `SAE` object (encode, decode, d_in, d_sae, hook).

Reads SAELens directories (v6 and pre-6.0 `cfg.json` layouts) and EleutherAI
sparsify directories, local or fetched from the hub (`hub.py`), always with
safetensors, never by unpickling. Writes the
SAELens v6 layout, so that SAELens and this loader both read what we train.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sae_acceptance.errors import SAEFormatError
from sae_acceptance.sources.hub import is_remote, locate_sae

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAE_FILES = ("cfg.json", SAELENS_WEIGHTS, SPARSIFY_WEIGHTS)  # what an SAE directory needs, at most
ARCHITECTURES = ("standard", "topk", "jumprelu")
SAELENS_VERSION_WRITTEN = "6.54.12"


@dataclass
class SparseCode:
    """Latents of a batch of tokens.

    For TopK SAEs only the k kept slots are stored (`values`, `indices`, each
    [n, k]); for the others `values` is the dense [n, d_sae] latent vector and
    `indices` is None. Decoding a TopK code is then a gather, not a matmul over
    d_sae.
    """

    values: torch.Tensor
    indices: torch.Tensor | None

    def l0(self) -> torch.Tensor:
        """Nonzero latents per token, [n]."""
        return (self.values != 0).sum(-1)

    def fired(self, d_sae: int) -> torch.Tensor:
        """How many tokens each latent fired on, [d_sae] int64."""
        active = (self.values != 0).to(torch.int64)
        if self.indices is None:
            return active.sum(0)
        counts = torch.zeros(d_sae, dtype=torch.int64, device=self.values.device)
        return counts.scatter_add_(0, self.indices.reshape(-1), active.reshape(-1))

    def dense(self, d_sae: int) -> torch.Tensor:
        if self.indices is None:
            return self.values
        out = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        return out.scatter_(-1, self.indices, self.values)


@dataclass
class SAE:
    """A single-layer SAE with a linear decoder: the only object the engine sees."""

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    architecture: str = "topk"
    k: int | None = None
    threshold: torch.Tensor | None = None  # [d_sae], jumprelu only
    apply_b_dec_to_input: bool = True
    hook_name: str | None = None
    model_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEFormatError(
                f"{self._where()}: architecture {self.architecture!r} is not supported "
                f"(expected one of {', '.join(ARCHITECTURES)})"
            )
        if self.architecture == "jumprelu" and self.threshold is None:
            raise SAEFormatError(f"{self._where()}: jumprelu SAE has no 'threshold' tensor")
        if self.W_enc.ndim != 2:
            raise SAEFormatError(f"{self._where()}: tensor W_enc has shape {tuple(self.W_enc.shape)}, expected [d_in, d_sae]")
        shapes = {
            "W_enc": (self.W_enc.shape, (self.d_in, self.d_sae)),
            "b_enc": (self.b_enc.shape, (self.d_sae,)),
            "W_dec": (self.W_dec.shape, (self.d_sae, self.d_in)),
            "b_dec": (self.b_dec.shape, (self.d_in,)),
        }
        if self.threshold is not None:
            shapes["threshold"] = (self.threshold.shape, (self.d_sae,))
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise SAEFormatError(
                    f"{self._where()}: tensor {name} has shape {tuple(got)}, expected {want}"
                )
        if self.architecture == "topk" and (self.k is None or not 0 < self.k <= self.d_sae):
            raise SAEFormatError(f"{self._where()}: topk SAE needs 0 < k <= d_sae, got k={self.k}")

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "SAE"

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            named["threshold"] = self.threshold
        return named

    def nonfinite_tensors(self) -> list[str]:
        """Names of the weight tensors holding NaN or infinity."""
        return [name for name, t in self.tensors().items() if not torch.isfinite(t).all()]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAE:
        moved = {name: t.to(device=device, dtype=dtype) for name, t in self.tensors().items()}
        moved.setdefault("threshold", None)
        return SAE(
            **moved,
            architecture=self.architecture,
            k=self.k,
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            hook_name=self.hook_name,
            model_name=self.model_name,
            metadata=self.metadata,
            path=self.path,
        )

    def encode(self, x: torch.Tensor) -> SparseCode:
        """x [n, d_in] -> latents. TopK keeps the k largest pre-activations, then ReLU."""
        sae_in = x - self.b_dec if self.apply_b_dec_to_input else x
        pre = sae_in @ self.W_enc + self.b_enc
        if self.architecture == "topk":
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            return SparseCode(F.relu(values), indices)
        if self.architecture == "jumprelu":
            return SparseCode(F.relu(pre) * (pre > self.threshold), None)
        return SparseCode(F.relu(pre), None)

    def decode(self, code: SparseCode) -> torch.Tensor:
        """Latents -> reconstruction [n, d_in]; TopK codes decode by a weighted gather."""
        if code.indices is None:
            return code.values @ self.W_dec + self.b_dec
        gathered = F.embedding_bag(
            code.indices, self.W_dec, per_sample_weights=code.values, mode="sum"
        )
        return gathered + self.b_dec

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
        code = self.encode(x)
        return self.decode(code), code


# --------------------------------------------------------------------------- loading


def load_sae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> SAE:
    """Load an SAE directory: SAELens (`cfg.json` + `sae_weights.safetensors`) or sparsify.

    `path` may also name a hub folder (``hf://owner/repo/folder``,
    ``sae-lens://release/sae_id``: see `sources/hub.py`), fetched into the cache first.
    """
    if not is_remote(path):
        return _load_directory(Path(path), device, dtype)
    local = locate_sae(path)  # its errors name the spec already
    try:
        return _load_directory(local, device, dtype)
    except SAEFormatError as err:
        raise SAEFormatError(f"{path}: {err}") from None


def _load_directory(path: Path, device: str | torch.device, dtype: torch.dtype | None) -> SAE:
    if not path.exists():
        raise SAEFormatError(f"{path}: no such SAE directory")
    if path.is_file():
        raise SAEFormatError(
            f"{path}: expected a directory holding cfg.json and {SAELENS_WEIGHTS} (or {SPARSIFY_WEIGHTS})"
        )
    cfg_path = path / "cfg.json"
    if not cfg_path.exists():
        raise SAEFormatError(f"{path}: no cfg.json in the SAE directory")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SAEFormatError(f"{cfg_path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise SAEFormatError(f"{cfg_path}: not UTF-8 text") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    if (path / SAELENS_WEIGHTS).exists():
        sae = _from_saelens(path, cfg)
    elif (path / SPARSIFY_WEIGHTS).exists():
        sae = _from_sparsify(path, cfg)
    else:
        raise SAEFormatError(f"{path}: no {SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify)")
    return sae.to(device=device, dtype=dtype)


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error types
        raise SAEFormatError(f"{file}: not a readable safetensors file ({err})") from None


def _require(tensors: dict[str, torch.Tensor], names: tuple[str, ...], file: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEFormatError(
            f"{file}: missing tensor(s) {', '.join(missing)} (has {', '.join(sorted(tensors))})"
        )


def _from_saelens(path: Path, cfg: dict[str, Any]) -> SAE:
    """Both cfg layouts: v6 (`architecture`, `metadata`) and pre-6.0 (flat, `activation_fn`)."""
    file = path / SAELENS_WEIGHTS
    tensors = _read_tensors(file)
    _require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), file)
    legacy = "sae_lens_version" not in (cfg.get("metadata") or {})
    meta = dict(cfg) if legacy and "metadata" not in cfg else dict(cfg.get("metadata") or {})
    if legacy:
        arch, k = _legacy_architecture(cfg, path)
        hook = cfg.get("hook_name") or cfg.get("hook_point") or meta.get("hook_name")
    else:
        arch = cfg.get("architecture", "standard")
        k = cfg.get("k")
        hook = meta.get("hook_name")
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in (None, False, "none"):
        raise SAEFormatError(
            f"{path / 'cfg.json'}: normalize_activations={normalize!r} is not supported "
            "(fold the scaling into the weights, or save with 'none')"
        )
    if cfg.get("hook_head_index", meta.get("hook_head_index", cfg.get("hook_point_head_index"))) is not None:
        raise SAEFormatError(f"{path / 'cfg.json'}: per-head SAEs (hook_head_index) are not supported")
    dtype = getattr(torch, str(cfg.get("dtype", "float32")).removeprefix("torch."), None)
    return SAE(
        W_enc=tensors["W_enc"],
        b_enc=tensors["b_enc"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        architecture=arch,
        k=_as_k(k, path),
        threshold=tensors.get("threshold"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", arch != "jumprelu")),
        hook_name=hook,
        model_name=meta.get("model_name") or cfg.get("model_name"),
        metadata=meta,
        path=path,
    ).to(dtype=dtype if isinstance(dtype, torch.dtype) else None)


def _as_k(k: Any, path: Path) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int | float) or int(k) != k:
        raise SAEFormatError(f"{path / 'cfg.json'}: k must be a whole number, got {k!r}")
    return int(k)


def _legacy_architecture(cfg: dict[str, Any], path: Path) -> tuple[str, int | None]:
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    arch = cfg.get("architecture")
    if act == "topk" or arch == "topk":
        k = (cfg.get("activation_fn_kwargs") or {}).get("k", cfg.get("k"))
        if k is None:
            raise SAEFormatError(f"{path / 'cfg.json'}: topk activation without activation_fn_kwargs.k")
        return "topk", k
    if arch in ("jumprelu", "standard"):
        return arch, None
    if act == "relu" and arch in (None, "standard"):
        return "standard", None
    raise SAEFormatError(
        f"{path / 'cfg.json'}: cannot tell the architecture (architecture={arch!r}, activation_fn={act!r})"
    )


def _from_sparsify(path: Path, cfg: dict[str, Any]) -> SAE:
    """EleutherAI sparsify: ReLU then top-k of (x - b_dec) W_enc^T + b; same outputs as TopK here."""
    file = path / SPARSIFY_WEIGHTS
    tensors = _read_tensors(file)
    _require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), file)
    if "k" not in cfg:
        raise SAEFormatError(f"{path / 'cfg.json'}: sparsify config without 'k'")
    return SAE(
        W_enc=tensors["encoder.weight"].T.contiguous(),
        b_enc=tensors["encoder.bias"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        architecture="topk",
        k=_as_k(cfg["k"], path),
        apply_b_dec_to_input=True,
        hook_name=None,
        model_name=None,
        metadata=dict(cfg),
        path=path,
    )


# --------------------------------------------------------------------------- saving


def save_sae(sae: SAE, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` as a SAELens v6 directory (cfg.json + sae_weights.safetensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {**sae.metadata, **(metadata or {})}
    meta.setdefault("sae_lens_version", SAELENS_VERSION_WRITTEN)
    meta.setdefault("sae_lens_training_version", SAELENS_VERSION_WRITTEN)
    meta["hook_name"] = sae.hook_name or meta.get("hook_name")
    meta["model_name"] = sae.model_name or meta.get("model_name")
    meta.setdefault("hook_head_index", None)
    meta.setdefault("prepend_bos", False)
    meta.setdefault("model_from_pretrained_kwargs", {"center_writing_weights": False})
    cfg: dict[str, Any] = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.tensors().items()}
    save_file(tensors, str(path / SAELENS_WEIGHTS))
    (path / "cfg.json").write_text(json.dumps(cfg, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
