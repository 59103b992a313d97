"""Plots, the one helper: panels of series (lines, points, interval bands, error bars) and histograms, as PNG.

Figures are drawn by matplotlib's Agg canvas (no pyplot, no window, no global
backend switch) and written atomically. matplotlib is imported inside the
functions that draw: importing this module costs nothing, and the gate runs
without it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_acceptance.io import write_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure as MplFigure

DPI = 120


@dataclass(frozen=True)
class Series:
    """Points drawn in order. `style` is matplotlib's format (`"o-"` markers joined, `"o"` markers
    alone, `"-"` a line alone). A series without points only adds its legend entry; one with
    an empty `name` adds none. `band` is an interval (low, high) at each x; `labels` annotate points."""

    x: Sequence[float]
    y: Sequence[float]
    name: str = ""  # NaN in `band` leaves a gap
    colour: Any = None
    style: str = "o-"
    band: tuple[Sequence[float], Sequence[float]] | None = None
    labels: Sequence[str] | None = None
    hollow: bool = False  # markers as rings (to circle points of another series)
    marker_size: float | None = None
    line_width: float | None = None
    alpha: float = 1.0
    yerr: tuple[Sequence[float], Sequence[float]] | None = None  # interval (low, high) as error bars


@dataclass(frozen=True)
class Bars:
    """A histogram of `values` in a panel (`bins`: a count or the edges)."""

    values: Sequence[float]
    bins: int | Sequence[float] = 40
    name: str = ""
    colour: Any = "tab:blue"


@dataclass(frozen=True)
class Scatter:
    """Points coloured by `values` on a colour scale, with a colour bar named `name`."""

    x: Sequence[float]
    y: Sequence[float]
    values: Sequence[float]
    name: str = ""
    labels: Sequence[str] | None = None


@dataclass(frozen=True)
class Panel:
    """One set of axes. `log_x`/`log_y`: the axis' log base. `xticks`: ticks labelled with their
    values. `shade`: a labelled horizontal band (low, high, name) with a dotted line at its top.
    `guides`: dotted grey horizontal lines. `right_axis`: (name, factor) for a second y scale,
    the first times `factor`."""

    series: Sequence[Series | Bars | Scatter]
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    log_x: float | None = None
    log_y: float | None = None
    xticks: Sequence[float] | None = None
    ylim: tuple[float, float] | None = None
    shade: tuple[float, float, str] | None = None
    guides: Sequence[float] = ()
    right_axis: tuple[str, float] | None = None
    legend: str | None = "best"
    grid_alpha: float = 0.3
    marks: Sequence[tuple[float, str]] = ()  # labelled vertical lines (x, name)
    xlim: tuple[float, float] | None = None
    xticklabels: Sequence[str] | None = None  # names for `xticks`


@dataclass(frozen=True)
class Figure:
    """Panels drawn side by side, and the image's size in inches."""

    panels: Sequence[Panel]
    width: float = 6.4
    height: float = 4.6
    share_y: bool = False
    legend_size: str = "small"


def colours(names: Sequence[str]) -> dict[str, Any]:
    """One tab10 colour per name, in order."""
    from matplotlib import colormaps  # optional dependency: plots only

    return {name: colormaps["tab10"](i % 10) for i, name in enumerate(names)}


def plot(figure: Figure, path: str | Path) -> Path:
    """Draw `figure`'s panels side by side and write the PNG to `path`."""
    return write_atomic(path, png(figure))


def png(figure: Figure) -> bytes:
    """`figure`'s panels side by side, as PNG bytes (for a report that embeds its images)."""
    fig = _canvas(figure.width, figure.height)
    axes = fig.subplots(1, len(figure.panels), sharey=figure.share_y, squeeze=False)[0]
    for ax, panel in zip(axes, figure.panels, strict=True):
        _draw(ax, panel, figure.legend_size)
    return _png_bytes(fig)


def histogram(
    values: Sequence[float],
    path: str | Path,
    bins: int = 40,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "count",
    log_y: bool = False,
    width: float = 6.4,
    height: float = 4.0,
) -> Path:
    """A histogram of `values`, written as a PNG."""
    fig = _canvas(width, height)
    ax = fig.subplots()
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _canvas(width: float, height: float) -> MplFigure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional dependency: plots only
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: MplFigure, path: str | Path) -> Path:
    return write_atomic(path, _png_bytes(fig))


def _png_bytes(fig: MplFigure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _draw(ax: Axes, panel: Panel, legend_size: str) -> None:
    if panel.shade is not None:
        low, high, name = panel.shade
        ax.axhspan(low, high, color="tab:red", alpha=0.12, lw=0, label=name)
        ax.axhline(high, color="tab:red", lw=0.8, ls=":")
    for y in panel.guides:
        ax.axhline(y, color="grey", linestyle=":", linewidth=1)
    for x, name in panel.marks:
        ax.axvline(x, color="black", linestyle="--", linewidth=1, label=name or None)
    for s in panel.series:
        if isinstance(s, Bars):
            ax.hist(list(s.values), bins=s.bins, color=s.colour, alpha=0.8, label=s.name or None)
        elif isinstance(s, Scatter):
            points = ax.scatter(list(s.x), list(s.y), c=list(s.values), cmap="viridis", s=40, edgecolors="black")
            ax.figure.colorbar(points, ax=ax, label=s.name)
            for x, y, text in zip(s.x, s.y, s.labels or (), strict=False):
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        else:
            _draw_series(ax, s)
    if panel.log_x is not None:
        ax.set_xscale("log", base=panel.log_x)
    if panel.log_y is not None:
        ax.set_yscale("log", base=panel.log_y)
    if panel.xticks is not None:
        ax.set_xticks(list(panel.xticks), list(panel.xticklabels or [f"{t:g}" for t in panel.xticks]))
        ax.minorticks_off()
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    if panel.xlim is not None:
        ax.set_xlim(*panel.xlim)
    if panel.right_axis is not None:
        name, factor = panel.right_axis
        scale = (lambda y: y * factor, lambda r: r / factor)  # matplotlib passes arrays
        ax.secondary_yaxis("right", functions=scale).set_ylabel(name)
    ax.grid(True, alpha=panel.grid_alpha)
    ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
    named = any(s.name for s in panel.series if not isinstance(s, Scatter))
    if panel.legend is not None and (named or any(name for _, name in panel.marks)):
        ax.legend(loc=panel.legend, fontsize=legend_size)  # type: ignore[call-overload]  # the stub lists loc's names as a Literal


def _draw_series(ax: Axes, s: Series) -> None:
    kwargs: dict[str, Any] = {"color": s.colour, "alpha": s.alpha, "label": s.name or None}
    if s.marker_size is not None:
        kwargs["markersize"] = s.marker_size
    if s.line_width is not None:
        kwargs["linewidth"] = s.line_width
    if s.hollow:
        kwargs.update(markerfacecolor="none", markeredgewidth=2)
    (line,) = ax.plot(list(s.x), list(s.y), s.style, **kwargs)
    if s.hollow:
        line.set_zorder(3)
    if s.yerr is not None:
        low, high = s.yerr
        below = [y - lo for y, lo in zip(s.y, low, strict=True)]
        above = [hi - y for y, hi in zip(s.y, high, strict=True)]
        ax.errorbar(
            list(s.x), list(s.y), yerr=[below, above], fmt="none", ecolor=line.get_color(), capsize=3, alpha=s.alpha
        )
    if s.band is not None:
        low, high = s.band
        ax.fill_between(list(s.x), list(low), list(high), color=line.get_color(), alpha=0.15, linewidth=0)
    for x, y, text in zip(s.x, s.y, s.labels or (), strict=False):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
