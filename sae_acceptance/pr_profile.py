"""The `pr-profile` command's work: run a model over tokens, PR and the canyon flag per layer.

The maths is `geometry`'s; here the model runs, and the profile becomes JSON, a
table and a plot.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from sae_acceptance.config import CanyonSettings
from sae_acceptance.covariance import CovarianceAccumulator
from sae_acceptance.errors import SourceError
from sae_acceptance.geometry import LayerGeometry
from sae_acceptance.hooks import HookPoint
from sae_acceptance.plots import Figure, Panel, Series, plot
from sae_acceptance.render import format_table

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["HOOK_TYPE", "format_profile_table", "plot_pr_profile", "pr_profile", "profile_to_json"]

HOOK_TYPE = "resid_post"  # the residual stream after each block: where the canyon was seen


def pr_profile(
    model: HookedTransformer,
    tokens: torch.Tensor,
    counted: torch.Tensor | None = None,
    *,
    batch_size: int,
    hook_type: str = HOOK_TYPE,
    canyon: CanyonSettings | None = None,
    layers: list[int] | None = None,
    progress: bool = True,
) -> list[LayerGeometry]:
    """PR of `blocks.L.hook_{hook_type}` per layer, over the counted positions of `tokens`.

    model: a HookedTransformer. tokens: [n_seq, ctx] token ids. counted: [n_seq, ctx]
    bool, False at positions left out (special tokens); None: all count. canyon: the
    canyon rule (thresholds.toml's defaults unless given).
    One `run_with_cache` pass per batch, stopped after the deepest requested layer.
    Memory: one d² float64 covariance per layer on the model's device, plus the
    batch's cached activations.
    """
    canyon = CanyonSettings() if canyon is None else canyon
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    if not layers or not all(0 <= layer < n_layers for layer in layers):
        raise SourceError(f"layers must be in 0..{n_layers - 1}, got {layers}")
    names = {layer: HookPoint.at(layer, f"hook_{hook_type}").name for layer in layers}
    for name in names.values():
        if name not in model.hook_dict:
            raise SourceError(f"hook type {hook_type!r}: the model has no {name}{_hook_type_hint(model, hook_type)}")
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2:
        raise SourceError(f"tokens must be [n_seq, ctx], got shape {tuple(tokens.shape)}")
    counted = torch.ones_like(tokens, dtype=torch.bool) if counted is None else torch.as_tensor(counted)
    if counted.shape != tokens.shape:
        raise SourceError(f"counted mask {tuple(counted.shape)} does not match tokens {tuple(tokens.shape)}")
    if not bool(counted.any()):
        raise SourceError("no counted token: every position is excluded")

    device = model.cfg.device
    accumulators: dict[int, CovarianceAccumulator] = {}
    batches = range(0, tokens.shape[0], batch_size)
    with torch.inference_mode():
        for begin in tqdm(batches, desc=f"pr-profile {hook_type}", unit="batch", disable=not progress):
            mask = counted[begin : begin + batch_size]
            if not bool(mask.any()):
                continue
            tok = tokens[begin : begin + batch_size].to(device)
            _, cache = model.run_with_cache(tok, names_filter=list(names.values()), stop_at_layer=layers[-1] + 1)
            for layer, name in names.items():
                act = cache[name].flatten(2)  # [batch, pos, width]; heads flattened if any
                acc = accumulators.get(layer)
                if acc is None:
                    acc = accumulators[layer] = CovarianceAccumulator(act.shape[-1], act.device)
                acc.update(act, mask.to(act.device))
            del cache
    return [
        LayerGeometry.measure(name, layer, accumulators[layer].covariance(), canyon) for layer, name in names.items()
    ]


def _hook_type_hint(model: HookedTransformer, hook_type: str) -> str:
    """The closest block-level hook types (`resid_post`, `mlp_out`, ...) the model has."""
    kinds = {HookPoint.parse(h) for h in model.hook_dict}
    valid = sorted(h.kind.removeprefix("hook_") for h in kinds if h.layer == 0 and "." not in h.kind)
    close = difflib.get_close_matches(hook_type, valid, n=3)
    return f"; did you mean {', '.join(close)}?" if close else f"; block-level hook types: {', '.join(valid)}"


def profile_to_json(
    model_name: str,
    profile: list[LayerGeometry],
    canyon: CanyonSettings | None = None,
    hook_type: str | None = None,
) -> dict[str, Any]:
    """The `pr-profile` JSON; rule and hook type default to those the profile was measured with."""
    if not profile:
        raise ValueError("empty profile")
    canyon = profile[0].rule if canyon is None else canyon
    hook_type = HookPoint.parse(profile[0].hook).short_kind if hook_type is None else hook_type
    return {
        "model": model_name,
        "hook_type": hook_type,
        "rule": canyon.model_dump(),
        "layers": [{key: value for key, value in g.to_dict().items() if key != "d_model"} for g in profile],
    }


def format_profile_table(profile: list[LayerGeometry]) -> str:
    """Plain-text table for the CLI."""
    rows = [
        ["-" if g.layer is None else str(g.layer), f"{g.pr:.3f}", f"{g.pr_deflated:.3f}", f"{g.pr_ratio:.4f}",
         "yes" if g.canyon else "no"]
        for g in profile
    ]  # fmt: skip
    return format_table(["layer", "pr", "pr_deflated", "pr_ratio", "canyon"], rows)


def plot_pr_profile(
    profile: list[LayerGeometry],
    path: str | Path,
    canyon: CanyonSettings | None = None,
    title: str | None = None,
) -> Path:
    """PR (log scale) against depth, raw and deflated, with the canyon band shaded; saves a PNG."""
    if not profile:
        raise ValueError("empty profile")
    rule = profile[0].rule if canyon is None else canyon
    xs = [i if g.layer is None else g.layer for i, g in enumerate(profile)]
    d = profile[0].d_model
    raw = [g.pr for g in profile]
    deflated = [g.pr_deflated for g in profile]
    band = rule.threshold * d
    floor = min(0.7, 0.7 * band)  # PR ≥ 1 always; keep the band visible when threshold·d < 1
    which = "PR" if rule.use == "raw" else "deflated PR"
    chosen = raw if rule.use == "raw" else deflated
    flagged = [(x, y) for x, y, g in zip(xs, chosen, profile, strict=True) if g.canyon]
    series = [
        Series(xs, raw, "raw PR", "tab:blue", "o-"),
        Series(xs, deflated, "deflated PR (top direction removed)", "tab:green", "s--"),
    ]
    if flagged:
        fx, fy = zip(*flagged, strict=True)
        series.append(Series(fx, fy, "flagged layer", "tab:red", "o", hollow=True, marker_size=12.6))
    panel = Panel(
        series,
        title=title or "participation ratio by depth",
        xlabel="layer",
        ylabel="participation ratio",
        log_y=10,
        xticks=xs,
        ylim=(floor, d * 1.5),
        shade=(floor, band, f"canyon: {which} < {rule.threshold:g}·d_model ({band:.3g})"),
        right_axis=("PR / d_model", 1 / d),
    )
    return plot(Figure([panel], width=7.5, height=4.2, legend_size="small"), path)
