"""A sweep's analysis, rendered: analysis.json, Markdown tables and two plots.

The tables are computed in `tables`; here they are laid out (`render.format_table`)
and drawn (`plots`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sae_acceptance.io import write_atomic, write_json
from sae_acceptance.plots import Figure, Panel, Series, colours, plot
from sae_acceptance.render import format_table
from sae_acceptance.train.tables import (
    SweepPoint,
    analysis_report,
    as_points,
    depths_in,
    grid_by_k,
    models_by_size,
)

Points = Iterable[SweepPoint | Mapping[str, Any]]


def _fmt(value: Any, spec: str = ".3f", missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def _table_of(records: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table from (header, key, format spec) columns."""
    rows = [[_fmt(r[key], spec) for _, key, spec in columns] for r in records]
    return format_table([header for header, _, _ in columns], rows, markdown=True)


_POINT_COLUMNS = (
    ("model", "model", "s"), ("d_model", "d_model", "d"), ("depth", "depth", "s"),
    ("layer", "layer", "d"), ("k", "k", "d"), ("r2", "r2", ".3f"),
    ("ce_rec [95% CI]", "ce_rec_text", "s"), ("cosine", "cosine", ".3f"),
    ("rel_error", "rel_error", ".3f"), ("alive %", "alive_pct", ".1f"),
)  # fmt: skip
_SCALE_COLUMNS = (
    ("model", "model", "s"), ("depth", "depth", "s"), ("k", "k", "d"),
    ("mse_mean", "mse_mean", ".4f"), ("rel_error", "rel_error", ".3f"), ("r2", "r2", ".3f"),
    ("SSE/token", "sse_per_token", ".1f"), ("SST/token", "sst_per_token", ".1f"),
    ("ce_rec", "ce_rec", ".3f"), ("L_recon/L_orig", "loss_ratio", ".3f"),
)  # fmt: skip
_DELTA_COLUMNS = (("k", "k", "d"), ("Δr2", "delta_r2", "+.3f"), ("Δce_rec", "delta_ce_rec", "+.3f"))


def _point_text(p: Mapping[str, Any]) -> dict[str, Any]:
    ci = p["ce_rec_ci"]
    return {
        **p,
        "ce_rec_text": _fmt(p["ce_rec"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""),
        "alive_pct": None if p["alive_frac"] is None else 100 * p["alive_frac"],
    }


def analysis_markdown(report: Mapping[str, Any]) -> str:
    """`analysis_report`'s tables as Markdown."""
    parts = [
        "# Sweep analysis",
        "ce_rec = 2 − L_recon/L_orig (1 = loss unchanged, 0 = loss doubled) is the behavioural "
        "score; r2 is shown beside it, never as a test.",
        "## Points",
        _table_of(map(_point_text, report["points"]), _POINT_COLUMNS),
    ]
    if report["deltas"]:
        parts.append("## Deltas at fixed k (larger minus smaller)")
    for block in report["deltas"]:
        parts.append(f"### {block['depth']}: {block['larger']} minus {block['smaller']}")
        parts.append(_table_of(block["rows"], _DELTA_COLUMNS))
    parts.append("## Correlation of r2 and ce_rec")
    parts.append(
        format_table(
            ["depth", "n", "pooled over k and scale", "within fixed k (scale only)"],
            [
                [
                    r["depth"],
                    str(r["n"]),
                    _fmt(r["corr_pooled"], "+.3f", "undefined"),
                    _fmt(r["corr_within_k"], "+.3f", "undefined"),
                ]
                for r in report["correlations"]
            ],
            markdown=True,
        )
    )
    notes = [f"- {r['undefined']}" for r in report["correlations"] if "undefined" in r]
    parts += ["\n".join(notes)] if notes else []
    models = report["models"]
    parts.append("## k*(t): smallest k with ce_rec ≥ t (linear interpolation in k)")
    parts.append(
        format_table(
            ["depth", "t", *[f"k*({m})" for m in models], "ratio (largest/smallest)"],
            [
                [
                    r["depth"],
                    f"{r['target']:.2f}",
                    *[_fmt(r["kstar"][m], ".1f", "undefined") if m in r["kstar"] else "—" for m in models],
                    _fmt(r["ratio"], ".2f"),
                ]
                for r in report["kstar"]
            ],
            markdown=True,
        )
    )
    if report["scale"]:
        parts.append("## Variance scale (SST/token backed out of r2)")
        parts.append(_table_of(report["scale"], _SCALE_COLUMNS))
    return "\n\n".join(parts) + "\n"


def plot_ce_rec_vs_k(points: Points, path: str | Path) -> Path:
    """ce_rec against k, one panel per depth, a line per model, bootstrap CI bands where measured."""
    measured = [p for p in as_points(points) if p.ce_rec is not None]
    if not measured:
        raise ValueError("no point has ce_rec: nothing to plot")
    depths, models = depths_in(measured), models_by_size(measured)
    colour = colours(models)
    nan = float("nan")
    panels = []
    for i, depth in enumerate(depths):
        series = []
        for model in models:
            grid = list(grid_by_k(measured, model, depth).values())
            if not grid:
                continue
            band = None
            if any(p.ce_rec_ci for p in grid):
                band = (
                    [p.ce_rec_ci[0] if p.ce_rec_ci else nan for p in grid],
                    [p.ce_rec_ci[1] if p.ce_rec_ci else nan for p in grid],
                )
            ce_rec = [p.ce_rec for p in grid if p.ce_rec is not None]  # all of them: `measured` has ce_rec
            series.append(Series([p.k for p in grid], ce_rec, model, colour[model], band=band))
        panels.append(Panel(
            series, title=f"{depth} depth", xlabel="k (active latents per token)",
            ylabel="ce_rec = 2 − L_recon / L_orig" if i == 0 else "", log_x=2,
            xticks=sorted({p.k for p in measured if p.depth == depth}), guides=(1.0,),
            legend="lower right" if i == 0 else None,
        ))  # fmt: skip
    return plot(Figure(panels, width=1.0 + 3.6 * len(depths), height=3.8, share_y=True), path)


_DEPTH_MARKERS = {"early": "^", "mid": "o", "late": "s"}


def plot_r2_vs_ce_rec(points: Points, path: str | Path) -> Path:
    """r2 against ce_rec, colour per model, marker per depth, each point labelled with its k."""
    measured = [p for p in as_points(points) if p.r2 is not None and p.ce_rec is not None]
    if not measured:
        raise ValueError("no point has both r2 and ce_rec: nothing to plot")
    depths, models = depths_in(measured), models_by_size(measured)
    colour = colours(models)
    extra = iter("DvPX*" * len(depths))
    marker = {d: _DEPTH_MARKERS.get(d) or next(extra) for d in depths}
    series = []
    for depth in depths:
        for model in models:
            grid = list(grid_by_k(measured, model, depth).values())  # in k order: the line shows the path
            if not grid:
                continue
            # every point of `measured` has both: the filters only narrow the types
            r2 = [p.r2 for p in grid if p.r2 is not None]
            ce_rec = [p.ce_rec for p in grid if p.ce_rec is not None]
            series.append(Series(r2, ce_rec, colour=colour[model], style="-", line_width=0.8, alpha=0.4))
            series.append(
                Series(r2, ce_rec, colour=colour[model], style=marker[depth], labels=[str(p.k) for p in grid])
            )
    series += [Series([], [], m, colour[m], style="o") for m in models]  # legend: models, then depths
    series += [Series([], [], d, "grey", style=marker[d]) for d in depths]
    panel = Panel(
        series,
        title="Reconstruction vs behaviour (point labels: k)",
        xlabel="r2 (variance explained)",
        ylabel="ce_rec (behaviour preserved)",
    )
    return plot(Figure([panel]), path)


def write_analysis(points: Points, out_dir: str | Path) -> dict[str, Path]:
    """analysis.json, analysis.md and the two plots, into `out_dir` (each written atomically)."""
    points = as_points(points)
    if not points:
        raise ValueError("no sweep points to analyse")
    out = Path(out_dir)
    report = analysis_report(points)
    return {
        "json": write_json(out / "analysis.json", report),
        "markdown": write_atomic(out / "analysis.md", analysis_markdown(report)),
        "ce_rec_vs_k": plot_ce_rec_vs_k(points, out / "ce_rec_vs_k.png"),
        "r2_vs_ce_rec": plot_r2_vs_ce_rec(points, out / "r2_vs_ce_rec.png"),
    }
