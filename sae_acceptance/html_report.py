"""The HTML report: one self-contained file a person reads without the terminal.

No network, no JavaScript: CSS inline, figures drawn by `plots` and embedded as
base64 PNGs. It reads an `EvalReport` (in memory, or `EvalReport.from_dict` of a
merged JSON report, with the SAEs' latents from their densities files): its
verdicts, regression checks and latent firing counts, shown in the words of
`verdict.Status` and `verdict.EntryStatus`.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from sae_acceptance.config import CanyonSettings
from sae_acceptance.hooks import HookPoint
from sae_acceptance.io import write_atomic
from sae_acceptance.plots import Bars, Figure, Panel, Scatter, Series, colours, png
from sae_acceptance.results import CLTResult, EntryResult, EvalReport, Latents, SAEResult, SpliceResult
from sae_acceptance.verdict import EntryStatus, MetricValue, Status, loss_context

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #1b1f24; padding: 0 1em; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.passed { background: #dafbe1; } .caught { background: #fff3c4; } .failed, .missed, .broken, .error { background: #ffd7d5; }
.badge { display: inline-block; padding: 0.1em 0.6em; border-radius: 1em; font-weight: 600; font-size: 0.85em; }
.meta { color: #57606a; font-size: 0.9em; } .warn { background: #fff8c5; padding: 0.4em 0.8em; border-left: 4px solid #d4a72c; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; } .figures img { max-width: 520px; }
.figures.small { gap: 0.4em; } .figures.small img { max-width: 200px; }
code { background: #f6f8fa; padding: 0 0.3em; }
"""


def write_html(path: str | Path, report: EvalReport) -> Path:
    """Write the report to `path` (atomically); see `render_html`."""
    return write_atomic(path, render_html(report))


def render_html(report: EvalReport) -> str:
    """The whole page."""
    passed = all(r.status.css not in ("failed", "error") for r in report.entries)
    settings = report.settings
    title = "SAE acceptance report"
    body = [
        f"<h1>{title}</h1>",
        f'<p><span class="badge {"passed" if passed else "failed"}">{"PASSED" if passed else "FAILED"}</span> '
        f"{_e(_summary_line(report))}</p>",
        f'<p class="meta">{_e(_eval_line(settings))}</p>',
        "<h2>Summary</h2>",
        _summary_table(report),
    ]
    overview = _overview_figure(report)
    if overview:
        body += ["<h3>Loss recovered against L0</h3>", _img(overview, "loss recovered against L0, every SAE")]
    proxy = _proxy_figure(report)
    if proxy:
        body += [
            "<h3>R² against behaviour</h3>",
            "<p>Each SAE's R² against its patched-loss score, coloured by how much more its error costs "
            "than a random error of the same size (<code>error_kl_ratio</code>): a high R² with a low "
            "<code>ce_rec</code> is the proxy gap.</p>",
            _img(proxy, "R² against ce_rec, coloured by error_kl_ratio, every SAE"),
        ]
    for result in report.saes.values():
        body.append(_sae_section(result, report))
    for splice in [*report.splices.values(), *report.clts.values()]:
        body.append(_splice_section(splice))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _e(text: Any) -> str:
    return html.escape(str(text))


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _badge(status: Status | EntryStatus, text: str | None = None) -> str:
    return f'<span class="badge {status.css}">{_e(status.word if text is None else text)}</span>'


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "not finite"
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def _interval(metric: MetricValue) -> str:
    return "-" if metric.ci is None else f"[{_fmt(metric.ci[0])}, {_fmt(metric.ci[1])}]"


def _bound_text(bound: dict) -> str:
    parts = []
    if bound.get("min") is not None:
        parts.append(f"≥ {bound['min']:g}")
    if bound.get("max") is not None:
        parts.append(f"≤ {bound['max']:g}")
    return f"{' and '.join(parts)} on {bound.get('on', 'point')}"


def _summary_line(report: EvalReport) -> str:
    entries = report.entries
    items = [(r, m) for r in entries if r.error is None for m in r.verdicts]
    counts: dict[str, int] = {}
    for r, m in items:
        word = r.outcome(m).status.word
        counts[word] = counts.get(word, 0) + 1
    errors = sum(r.error is not None for r in entries)
    parts = [f"{n} {word}" for word, n in counts.items()]
    if errors:
        parts.append(f"{errors} not evaluated (error)")
    regressions = [c for r in entries for c in r.regressions.values() if not c.skipped]
    if regressions:
        parts.append(f"{sum(not c.passed for c in regressions)} of {len(regressions)} regression checks regressed")
    counted = f"{_plural(len(report.saes), 'SAE')}, {_plural(len(report.splices), 'splice')}"
    if report.clts:
        counted += f", {_plural(len(report.clts), 'CLT')}"
    return f"{counted}; checks: " + ", ".join(parts or ["none"])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _eval_line(settings: dict[str, Any]) -> str:
    tokens = settings.get("tokens", {})
    boot = settings.get("bootstrap", {})
    parts = [f"data {settings.get('data')}", f"{settings.get('n_sequences')} × {settings.get('context_size')} tokens"]
    if tokens:
        parts.append(f"{tokens.get('n_counted')} counted (excluded: {tokens.get('rule')})")
    if boot:
        parts.append(f"{boot['confidence'] * 100:g}% intervals from {boot['resamples']} sequence-bootstrap resamples")
    parts.append(f"device {settings.get('device')}, {settings.get('dtype')}")
    return "; ".join(parts)


def _summary_table(report: EvalReport) -> str:
    """Every entry and every verdict, as `verdict.outcome` decided it."""
    rows = ["<table><tr><th>entry</th><th>hook</th><th>verdict</th><th>checks</th></tr>"]
    for result in report.entries:
        if result.error is not None:
            cells = f'<td class="error">{_e(result.error)}</td>'
        else:
            checks = []
            for metric in result.verdicts:
                status: Status | EntryStatus = result.outcome(metric).status
                checks.append(_badge(status, f"{metric} {_fmt(result.metrics[metric].value)}: {status.word}"))
            for check in result.regressions.values():
                if not check.skipped:
                    checks.append(_badge(check.status, f"regression {check.metric}: {check.status.word}"))
            if result.baseline_error:
                checks.append(_badge(EntryStatus.ERROR, f"baseline: {result.baseline_error}"))
            cells = f"<td>{' '.join(checks) or 'no bounds'}</td>"
        status = result.status
        rows.append(
            f'<tr><td><a href="#{_anchor(result)}">{_e(result.label)}</a></td><td>{_e(result.hook or "-")}</td>'
            f'<td class="{status.css}">{_e(status.word)}</td>{cells}</tr>'
        )
    rows.append("</table>")
    return "\n".join(rows)


def _anchor(result: EntryResult) -> str:
    return f"{result.kind}-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in result.name)


def _overview_figure(report: EvalReport) -> bytes | None:
    """ce_rec and ce_loss_score against L0 over every SAE, with intervals and their bounds."""
    measured = [r for r in report.saes.values() if r.error is None and "l0" in r.metrics]
    if not measured:
        return None
    hooks = sorted({r.hook for r in measured if r.hook is not None})  # an SAE always has one
    colour = colours(hooks)
    panels = []
    for metric in ("ce_rec", "ce_loss_score"):
        series = []
        for hook in hooks:
            at = [r for r in measured if r.hook == hook and metric in r.metrics]
            if not at:
                continue
            values = [r.metrics[metric] for r in at]
            ci = [v.ci or (v.value, v.value) for v in values]
            series.append(
                Series(
                    [r.metrics["l0"].value for r in at],
                    [v.value for v in values],
                    hook,
                    colour[hook],
                    "o",
                    labels=[r.name for r in at],
                    yerr=([c[0] for c in ci], [c[1] for c in ci]),
                )
            )
        bounds = sorted({b for r in measured if metric in r.verdicts for b in _limits(r.verdicts[metric].bound)})
        panels.append(
            Panel(
                series,
                title=f"{metric} (bounds dotted)",
                xlabel="L0 (latents per token)",
                ylabel=metric,
                log_x=2,
                guides=bounds,
            )
        )
    return png(Figure(panels, width=11, height=4.2))


def _limits(bound: dict) -> list[float]:
    return [bound[side] for side in ("min", "max") if bound.get(side) is not None]


def _sae_section(result: SAEResult, report: EvalReport) -> str:
    parts = [f'<h2 id="{_anchor(result)}">{_e(result.name)} {_badge(result.status)}</h2>']
    meta = [
        f"model {result.model}",
        f"hook {result.hook}",
        f"layer {result.layer}",
        f"{result.architecture}",
        f"d_in {result.d_in}",
        f"d_sae {result.d_sae}",
    ]
    if result.k:
        meta.append(f"k {result.k}")
    if result.expect_fail:
        meta.append(f"negative control on {', '.join(result.expect_fail)}")
    parts.append(f'<p class="meta">{_e(" · ".join(meta))}<br>{_e(result.path)}</p>')
    if result.error is not None:
        parts.append(f'<p class="error">{_e(result.error)}</p>')
        return "\n".join(parts)
    parts.append(_loss_paragraph(result.metrics))
    parts.append(_verdict_table(result))
    if result.r2_warning:
        parts.append(f'<p class="warn">R² warning: {_e(result.r2_warning)}</p>')
    parts.append(_latent_paragraph(result, report))
    parts.append(_gated_figures(result))
    figures = []
    if result.latents is not None:
        figures.append(
            _img(
                _density_figure(result.latents, _dense_threshold(report)),
                f"{result.name}: feature density histogram",
            )
        )
    profile = _profile_figure(result, report)
    if profile:
        figures.append(_img(profile, f"{result.name}: PR profile"))
    parts.append(f'<div class="figures">{"".join(figures)}</div>')
    parts.append(_why_section(result))
    parts.append(_regression_table(result))
    return "\n".join(parts)


def _value(result: EntryResult, metric: str) -> str:
    measured = result.metrics.get(metric)
    return "-" if measured is None else _fmt(measured.value) + (f" {_interval(measured)}" if measured.ci else "")


def _why_section(result: SAEResult) -> str:
    """Why the SAE costs what it costs: its error against a random error of the same size, its
    alignment with the loss gradient, its growth through later blocks, the contexts hurt most."""
    m = result.metrics
    parts = []
    if "error_kl_ratio" in m:
        parts.append(
            f"<p><b>Error against a random direction</b>: KL {_e(_value(result, 'kl_div'))} with the SAE's error, "
            f"{_e(_value(result, 'kl_random'))} with a random error of the same size at each token: "
            f"<code>error_kl_ratio</code> {_e(_value(result, 'error_kl_ratio'))} (1: the error is no worse than "
            "noise of its size; above 1: it lands where the model is sensitive).</p>"
        )
    if "grad_alignment" in m:
        parts.append(
            f"<p><b>Against the loss gradient</b>: <code>grad_alignment</code> {_e(_value(result, 'grad_alignment'))} "
            "(1 for an error blind to the gradient); the loss change its first-order term predicts, "
            f"<code>delta_ce_linear</code> {_e(_value(result, 'delta_ce_linear'))}, against the measured "
            f"<code>delta_ce</code> {_e(_value(result, 'delta_ce'))} nats.</p>"
        )
    figure = _propagation_figure(result)
    if figure:
        parts.append(_img(figure, f"{result.name}: the error through later blocks"))
    if result.worst_contexts:
        rows = [
            "<table><tr><th>#</th><th>sequence</th><th>position</th><th>context</th><th>next</th>"
            "<th>CE before</th><th>CE after</th><th>increase</th></tr>"
        ]
        for i, w in enumerate(result.worst_contexts, 1):
            context = w.get("text") or " ".join(map(str, w["window"]))
            target = w.get("target_text") or str(w["target"])
            rows.append(
                f'<tr><td>{i}</td><td class="num">{w["sequence"]}</td><td class="num">{w["position"]}</td>'
                f"<td><code>{_e(context)}</code></td><td><code>{_e(target)}</code></td>"
                f'<td class="num">{_fmt(w["ce_orig"])}</td><td class="num">{_fmt(w["ce_recon"])}</td>'
                f'<td class="num">{_fmt(w["increase"])}</td></tr>'
            )
        rows.append("</table>")
        parts += ["<h4>The contexts the reconstruction hurts most</h4>", "\n".join(rows)]
    return "<h3>Why</h3>\n" + "\n".join(parts) if parts else ""


def _propagation_figure(result: SAEResult) -> bytes | None:
    """The error's relative size at every block output after the hook, over depth."""
    points = [(p["layer"], p["ratio"]) for p in result.propagation if p["ratio"] is not None]
    if not points:
        return None
    layers, ratios = zip(*points, strict=True)
    panel = Panel(
        [Series(layers, ratios, "‖r_patched − r_orig‖² / ‖r_orig‖²", "tab:purple", "o-")],
        title="the reconstruction error through later blocks",
        xlabel="block output",
        ylabel="relative squared error",
        xticks=layers,
        ylim=(0.0, 1.25 * max(ratios)),
        xlim=(min(layers) - 0.5, max(layers) + 0.5),
        legend="upper left",
    )
    return png(Figure([panel], width=5.2, height=3.4))


def _proxy_figure(report: EvalReport) -> bytes | None:
    """R² against ce_rec over every SAE, coloured by error_kl_ratio."""
    measured = [
        r for r in report.saes.values() if r.error is None and {"r2", "ce_rec", "error_kl_ratio"} <= set(r.metrics)
    ]
    if not measured:
        return None
    panel = Panel(
        [
            Scatter(
                [r.metrics["r2"].value for r in measured],
                [r.metrics["ce_rec"].value for r in measured],
                [r.metrics["error_kl_ratio"].value for r in measured],
                "error_kl_ratio",
                labels=[r.name for r in measured],
            )
        ],
        title="R² against the patched-loss score",
        xlabel="r2 (variance explained)",
        ylabel="ce_rec (1: loss unchanged)",
    )
    return png(Figure([panel], width=6.4, height=4.4))


def _splice_section(splice: SpliceResult) -> str:
    """A splice's section, or a CLT's (its replacement model, with a table per layer)."""
    control = f"{_e('; negative control on ' + ', '.join(splice.expect_fail)) if splice.expect_fail else ''}"
    if isinstance(splice, CLTResult):
        meta = (
            f'<p class="meta">{_e(splice.clt_kind or "CLT")} {_e(splice.path)}: every MLP output it covers replaced '
            f"by the sum of the decoders writing to it ({_e(splice.hook or '-')}){control}</p>"
        )
    else:
        meta = (
            f'<p class="meta">{_e(" + ".join(splice.saes))} patched in together at {_e(splice.hook or "-")}'
            f"{control}</p>"
        )
    parts = [f'<h2 id="{_anchor(splice)}">{_e(splice.label)} {_badge(splice.status)}</h2>', meta]
    if splice.error is not None:
        parts.append(f'<p class="error">{_e(splice.error)}</p>')
        return "\n".join(parts)
    parts.append(_loss_paragraph(splice.metrics, "all members patched in: "))
    parts.append(_verdict_table(splice))
    rows = "".join(
        f'<tr><td>{_e(m)}</td><td class="num">{_e(_fmt(v.value))}</td><td class="num">{_e(_interval(v))}</td></tr>'
        for m, v in splice.metrics.items()
    )
    parts.append(f"<table><tr><th>joint metric</th><th>value</th><th>interval</th></tr>{rows}</table>")
    if isinstance(splice, CLTResult) and splice.layers:
        layer_rows = "".join(
            f"<tr><td>{row['layer']}</td><td>{_e(row['hook_in'])}</td><td>{_e(row['hook_out'])}</td>"
            + "".join(
                f'<td class="num">{_e("-" if row[k] is None else _fmt(row[k]))}</td>' for k in ("nmse", "cosine", "l0")
            )
            + "</tr>"
            for row in splice.layers
        )
        parts.append(
            "<p>Per layer, inside the replacement forward: the MLP output the model would compute from the "
            "patched input, against what the decoders write (normalised squared error, cosine), and the "
            "layer's active features per token.</p>"
            "<table><tr><th>layer</th><th>reads</th><th>writes</th><th>nmse</th><th>cosine</th><th>l0</th></tr>"
            f"{layer_rows}</table>"
        )
    parts.append(_gated_figures(splice))
    parts.append(_regression_table(splice))
    return "\n".join(parts)


def _loss_paragraph(metrics: dict[str, MetricValue], prefix: str = "") -> str:
    context = loss_context(metrics)
    ablate = metrics.get("ce_ablate")
    extra = f"; zero-ablated {ablate.value:.2f} nats" if ablate is not None and math.isfinite(ablate.value) else ""
    kl = metrics.get("kl_div")
    extra += f"; KL to the original {kl.value:.3f} nats/token" if kl is not None and math.isfinite(kl.value) else ""
    return f"<p><b>Loss</b>: {_e(prefix + context + extra)}</p>" if context else ""


def _verdict_table(result: EntryResult) -> str:
    if not result.verdicts:
        return "<p>No bounds: measured only.</p>"
    rows = [
        "<table><tr><th>metric</th><th>value</th><th>interval</th><th>bound</th><th>outcome</th><th>message</th></tr>"
    ]
    for metric, verdict in result.verdicts.items():
        decided = result.outcome(metric)
        value = result.metrics[metric]
        rows.append(
            f'<tr class="{decided.status.css}"><td>{_e(metric)}</td><td class="num">{_e(_fmt(value.value))}</td>'
            f'<td class="num">{_e(_interval(value))}</td><td>{_e(_bound_text(verdict.bound))}</td>'
            f"<td>{_e(decided.status.word)}</td><td>{_e(decided.message)}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def _gated_figures(result: EntryResult) -> str:
    """Each gated metric in its own small figure: the point, its interval, and its bound(s)."""
    images = []
    for metric, verdict in result.verdicts.items():
        value = result.metrics[metric]
        if not math.isfinite(value.value):
            continue
        low, high = value.ci if value.ci is not None and all(map(math.isfinite, value.ci)) else (value.value,) * 2
        limits = _limits(verdict.bound)
        span = [low, high, *limits]
        pad = 0.15 * (max(span) - min(span) or abs(value.value) or 1.0)
        status = result.outcome(metric).status
        colour = {"passed": "tab:green", "caught": "tab:orange"}.get(status.css, "tab:red")
        panel = Panel(
            [Series([0], [value.value], "", colour, "o", yerr=([low], [high]), marker_size=8)],
            title=f"{metric}\n{_bound_text(verdict.bound)}",
            guides=limits,
            ylim=(min(span) - pad, max(span) + pad),
            xticks=[0],
            xticklabels=[status.word],
            xlim=(-1, 1),
            legend=None,
        )
        images.append(_img(png(Figure([panel], width=2.3, height=2.6)), f"{result.name}: {metric} against its bound"))
    return f'<div class="figures small">{"".join(images)}</div>'


def _dense_threshold(report: EvalReport) -> float:
    return float(report.settings["dense_threshold"])


def _latent_paragraph(result: SAEResult, report: EvalReport) -> str:
    m = result.metrics
    parts = [f"{name} {_fmt(m[name].value)}" for name in ("l0", "alive_frac", "dead_frac", "dense_frac") if name in m]
    return (
        f"<p><b>Latents</b>: {_e(', '.join(parts))} "
        f"(dense: firing on more than {_dense_threshold(report):g} of counted tokens)</p>"
    )


def _density_figure(latents: Latents, threshold: float) -> bytes:
    """Feature density histogram: log10 of each live latent's firing share; dead latents counted apart."""
    fired, density = latents.fired, latents.density
    live = np.log10(density[fired > 0])
    dead = int((fired == 0).sum())
    dense = int((density > threshold).sum())
    low = min(float(live.min()) if live.size else -6.0, math.log10(threshold)) - 0.25
    bins = np.linspace(low, 0.0, 41)
    panel = Panel(
        [Bars(live.tolist(), bins.tolist(), f"{live.size} live latents")],
        title=f"feature density ({dead} dead, {dense} dense of {fired.size})",
        xlabel="log10 density (share of counted tokens a latent fires on)",
        ylabel="latents",
        marks=[(math.log10(threshold), f"dense threshold {threshold:g}")],
        legend="upper left",
    )
    return png(Figure([panel], width=5.2, height=3.6))


def _profile_figure(result: SAEResult, report: EvalReport) -> bytes | None:
    """PR / d_model over the layers this report measured on the SAE's model, its layer marked, the
    canyon band shaded (no model is run: the report's own geometry)."""
    if result.geometry is None or result.hook is None or result.layer is None:
        return None
    canyon = report.settings.get("canyon") or CanyonSettings().model_dump()
    deflated = canyon.get("use") == "deflated"
    kind = HookPoint.parse(result.hook).kind
    by_layer: dict[int, float] = {}
    for other in report.saes.values():
        geo = other.geometry
        if (
            other.model == result.model
            and geo is not None
            and geo.layer is not None
            and HookPoint.parse(geo.hook).kind == kind
        ):
            by_layer[geo.layer] = (geo.pr_deflated if deflated else geo.pr) / geo.d_model
    if not by_layer:
        return None
    layers = sorted(by_layer)
    values = [by_layer[layer] for layer in layers]
    threshold = float(canyon["threshold"])
    floor = min([*values, threshold]) / 3
    which = "deflated PR" if deflated else "PR"
    panel = Panel(
        [Series(layers, values, f"{which} / d_model", "tab:blue", "o-")],
        title=f"PR profile, {kind}",
        xlabel="layer",
        ylabel=f"{which} / d_model",
        log_y=10,
        xticks=layers,
        ylim=(floor, max([*values, threshold]) * 3),
        shade=(floor, threshold, f"canyon: < {threshold:g}"),
        marks=[(result.layer, f"{result.name}: layer {result.layer}")],
        xlim=(min(layers) - 0.5, max(layers) + 0.5),
        legend="upper right",
    )
    return png(Figure([panel], width=5.2, height=3.6))


def _regression_table(result: EntryResult) -> str:
    checks = list(result.regressions.values())
    if result.baseline_error:
        return f'<h3>Against the baseline</h3><p class="error">{_e(result.baseline_error)}</p>'
    if not checks:
        return ""
    rows = [
        "<h3>Against the baseline</h3><table><tr><th>metric</th><th>change</th><th>paired interval</th>"
        "<th>outcome</th><th>message</th></tr>"
    ]
    for check in checks:
        word, css = check.status.word, check.status.css
        interval = "-" if check.ci is None else f"[{check.ci[0]:+.4f}, {check.ci[1]:+.4f}]"
        change = f"{check.change:+.4f}" if math.isfinite(check.change) else "-"
        rows.append(
            f'<tr class="{css}"><td>{_e(check.metric)}</td><td class="num">{_e(change)}</td>'
            f'<td class="num">{_e(interval)}</td><td>{_e(word)}</td><td>{_e(check.message)}</td></tr>'
        )
    rows.append("</table>")
    return "\n".join(rows)
