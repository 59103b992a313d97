"""circuit-tracer's transcoders on disk -> one `CLT`: its cross-layer transcoders and its sets of
per-layer transcoders (docs/formats.md, "Cross-layer transcoders").

- cross-layer (`model_kind: cross_layer_transcoder`): per layer i, `W_enc_{i}.safetensors` with
  `W_enc_{i}` [d_latent, d_model], `b_enc_{i}`, `b_dec_{i}` and, for JumpReLU, `threshold_{i}`;
  `W_dec_{i}.safetensors` with `W_dec_{i}` [d_latent, n_layers − i, d_model]. SAELens's
  `mntss_clt_layer_transcoder` releases are these repositories.
- per-layer set (`model_kind: transcoder_set`): `layer_{i}.safetensors` with `W_enc`
  [d_latent, d_model], `W_dec` [d_latent, d_model], `b_enc`, `b_dec`, optionally
  `activation_function.threshold` and `W_skip` [d_model, d_model] (output += x W_skipᵀ); or the
  files listed in the config's `transcoders`.

`config.yaml` (optional for local directories) names `feature_input_hook` and
`feature_output_hook` (TransformerLens hook names inside a block) and `model_name`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from sae_acceptance.errors import SAEFormatError
from sae_acceptance.io import read_text
from sae_acceptance.sources.clt import CLT
from sae_acceptance.sources.formats.tensors import read_safetensors, require
from sae_acceptance.sources.hub import download_folder, saelens_release
from sae_acceptance.sources.hub_calls import quiet_hub, say_hub_wait
from sae_acceptance.sources.spec import HF_PREFIX, SAELENS_PREFIX, parse_hf, parse_saelens_release

CONFIG = "config.yaml"
CLT_CONVERTER = "mntss_clt_layer_transcoder"
DEFAULT_HOOKS = ("hook_resid_mid", "hook_mlp_out")  # circuit-tracer's load_clt defaults
_HOOK = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def load_clt(spec: str | Path, dtype: torch.dtype | None = None) -> CLT:
    """The CLT at `spec`: a local directory (or its config.yaml), `hf://owner/repo[@rev][/folder]`,
    or `sae-lens://<release>` of a `mntss_clt_layer_transcoder` release (the whole CLT, not a layer).
    Tensors keep their file's dtype unless `dtype` is given."""
    text = str(spec)
    if text.startswith(SAELENS_PREFIX):
        text = _saelens_release(text)
    if text.startswith(HF_PREFIX):
        say_hub_wait(text)
        with quiet_hub():
            path = download_folder(text, *parse_hf(text), ("*.safetensors", CONFIG))
    else:
        path = Path(text)
        if path.is_file() and path.name.endswith((".yaml", ".yml")):
            return _read(path.parent, _config(path), text, dtype)
    if not path.is_dir():
        raise SAEFormatError(f"{text}: no such transcoder directory")
    config = _config(path / CONFIG) if (path / CONFIG).exists() else {}
    return _read(path, config, text, dtype)


def _read(path: Path, config: dict[str, Any], where: str, dtype: torch.dtype | None) -> CLT:
    hooks = tuple(_hook(config, key, default, where) for key, default in zip(_HOOK_KEYS, DEFAULT_HOOKS, strict=True))
    kind = config.get("model_kind")
    if kind is None:
        kind = "cross_layer_transcoder" if (path / "W_enc_0.safetensors").exists() else "transcoder_set"
    if kind == "cross_layer_transcoder":
        clt = _read_clt(path, where)
    elif kind == "transcoder_set":
        clt = _read_set(path, config, where)
    else:
        raise SAEFormatError(
            f"{where}: model_kind {kind!r}: expected 'cross_layer_transcoder' or 'transcoder_set' (circuit-tracer's)"
        )
    model_name = config.get("model_name")
    clt.input_hook, clt.output_hook = hooks
    clt.model_name = model_name if isinstance(model_name, str) else None
    clt.path, clt.kind = str(where), kind
    clt.metadata = {k: v for k, v in config.items() if isinstance(v, str | int | float | bool)}
    _check_shapes(clt, where)
    return clt if dtype is None else clt.to(dtype=dtype)


_HOOK_KEYS = ("feature_input_hook", "feature_output_hook")


def _hook(config: dict[str, Any], key: str, default: str, where: str) -> str:
    value = config.get(key, default)
    if not isinstance(value, str) or not _HOOK.match(value) or value.startswith("blocks."):
        raise SAEFormatError(f"{where}: {key} {value!r}: expected a hook inside a block, like {default!r}")
    return value


def _config(file: Path) -> dict[str, Any]:
    """config.yaml as a mapping (safe YAML: no objects constructed)."""
    import yaml  # lazy: only transcoder configs need it (a dependency of transformers)

    text = read_text(file, "a circuit-tracer config.yaml", error=SAEFormatError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SAEFormatError(f"{file}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SAEFormatError(f"{file}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _numbered(path: Path, pattern: str, where: str) -> int:
    """How many files `pattern` (with `{i}`) are in `path`, numbered 0 .. n − 1 without a gap."""
    found = {int(m.group(1)) for f in path.iterdir() if (m := re.fullmatch(pattern.format(i=r"(\d+)"), f.name))}
    if not found:
        raise SAEFormatError(f"{where}: no {pattern.format(i=0)} (expected circuit-tracer's transcoder files)")
    missing = sorted(set(range(max(found) + 1)) - found)
    if missing:
        raise SAEFormatError(f"{where}: {pattern.format(i=missing[0])} is missing (layers 0..{max(found)} expected)")
    return max(found) + 1


def _read_clt(path: Path, where: str) -> CLT:
    n = _numbered(path, r"W_enc_{i}\.safetensors", where)
    W_enc, b_enc, b_dec, W_dec, thresholds = [], [], [], [], []
    for i in range(n):
        enc_file, dec_file = path / f"W_enc_{i}.safetensors", path / f"W_dec_{i}.safetensors"
        if not dec_file.exists():
            raise SAEFormatError(f"{where}: {dec_file.name} is missing (every encoder file has its decoder file)")
        enc = read_safetensors(enc_file)
        require(enc, (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"), enc_file)
        dec = read_safetensors(dec_file)
        require(dec, (f"W_dec_{i}",), dec_file)
        W_enc.append(enc[f"W_enc_{i}"].T.contiguous())
        b_enc.append(enc[f"b_enc_{i}"])
        b_dec.append(enc[f"b_dec_{i}"])
        W_dec.append(dec[f"W_dec_{i}"])
        thresholds.append(enc.get(f"threshold_{i}"))
    return CLT(W_enc, b_enc, W_dec, b_dec, _thresholds(thresholds, where))


def _read_set(path: Path, config: dict[str, Any], where: str) -> CLT:
    listed = config.get("transcoders")
    if listed is None:
        files = [path / f"layer_{i}.safetensors" for i in range(_numbered(path, r"layer_{i}\.safetensors", where))]
    elif isinstance(listed, list) and all(isinstance(f, str) for f in listed) and listed:
        remote = [f for f in listed if "://" in f]
        if remote:
            raise SAEFormatError(f"{where}: transcoders lists {remote[0]!r}: only files beside config.yaml are read")
        files = [path / f for f in listed]
    else:
        raise SAEFormatError(f"{where}: transcoders: expected a list of file names")
    W_enc, b_enc, b_dec, W_dec, thresholds, skips = [], [], [], [], [], []
    for file in files:
        if file.suffix != ".safetensors":
            raise SAEFormatError(f"{file}: only safetensors transcoder files are read")
        t = read_safetensors(file)
        require(t, ("W_enc", "W_dec", "b_enc", "b_dec"), file)
        W_enc.append(t["W_enc"].T.contiguous())
        b_enc.append(t["b_enc"])
        b_dec.append(t["b_dec"])
        W_dec.append(t["W_dec"].unsqueeze(1))  # writes to its own layer only
        thresholds.append(t.get("activation_function.threshold"))
        skips.append(None if t.get("W_skip") is None else t["W_skip"].T.contiguous())
    if any(s is None for s in skips) and not all(s is None for s in skips):
        raise SAEFormatError(f"{where}: some layers have W_skip and some do not")
    clt = CLT(W_enc, b_enc, W_dec, b_dec, _thresholds(thresholds, where))
    clt.W_skip = None if skips[0] is None else [s for s in skips if s is not None]
    return clt


def _thresholds(found: list[torch.Tensor | None], where: str) -> list[torch.Tensor] | None:
    if all(t is None for t in found):
        return None
    if any(t is None for t in found):
        raise SAEFormatError(f"{where}: some layers have a JumpReLU threshold and some do not")
    return [t.reshape(-1) for t in found if t is not None]


def _check_shapes(clt: CLT, where: str) -> None:
    """Every layer agrees on d_model; each decoder writes within the CLT's layers."""
    d_model, n = clt.d_model, clt.n_layers
    for i in range(n):
        d_latent = clt.d_latent(i)
        shapes = {
            "W_enc": (tuple(clt.W_enc[i].shape), (d_model, d_latent)),
            "b_dec": (tuple(clt.b_dec[i].shape), (d_model,)),
        }
        if clt.threshold is not None:
            shapes["threshold"] = (tuple(clt.threshold[i].shape), (d_latent,))
        if clt.W_skip is not None:
            shapes["W_skip"] = (tuple(clt.W_skip[i].shape), (d_model, d_model))
        dec = tuple(clt.W_dec[i].shape)
        if len(dec) != 3 or dec[0] != d_latent or dec[2] != d_model or not 1 <= dec[1] <= n - i:
            raise SAEFormatError(
                f"{where}: layer {i}: W_dec has shape {list(dec)}, expected [{d_latent}, 1..{n - i}, {d_model}]"
            )
        for name, (got, expected) in shapes.items():
            if got != expected:
                raise SAEFormatError(f"{where}: layer {i}: {name} has shape {list(got)}, expected {list(expected)}")


def _saelens_release(spec: str) -> str:
    """`sae-lens://<release>` of a CLT release -> `hf://<its repository>` (SAELens's directory)."""
    release = parse_saelens_release(spec)
    entry = saelens_release(spec, release)
    if entry.conversion_func != CLT_CONVERTER:
        raise SAEFormatError(
            f"{spec}: release {release!r} is read by {entry.conversion_func!r}, not a cross-layer transcoder "
            f"({CLT_CONVERTER}); give it as an [[sae]]"
        )
    return f"{HF_PREFIX}{entry.repo_id}"
