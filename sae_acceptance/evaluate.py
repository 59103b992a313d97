"""The library's front door: a validated thresholds file -> an `EvalReport`.

Config names the inputs; sources load them (each model and token set once);
the engine runs each hookpoint once for all its SAEs; metrics, intervals and
verdicts follow. Problems with one SAE (a bad file, a width that does not fit
the hook, NaN weights) become that SAE's error, so the rest still run.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from sae_acceptance.config import LoadedThresholds, SAEEntry
from sae_acceptance.engine import HookRun, check_finite, run_hook
from sae_acceptance.errors import SAEAcceptanceError, SourceError
from sae_acceptance.geometry import CanyonRule, LayerGeometry
from sae_acceptance.hooks import hook_layer
from sae_acceptance.metrics import METRICS, alive_fraction, rate_bits
from sae_acceptance.results import EvalReport, SAEResult
from sae_acceptance.sources.model import (
    ModelCache,
    hook_width,
    processing_kwargs,
    resolve_device,
    resolve_dtype,
    special_token_ids,
)
from sae_acceptance.sources.sae import SAE, load_sae
from sae_acceptance.sources.tokens import counted_mask, fingerprint, load_tokens
from sae_acceptance.stats import BootstrapSettings, bootstrap_intervals
from sae_acceptance.verdict import MetricValue, canyon_warning, judge, loss_context


@dataclass
class _Request:
    entry: SAEEntry
    result: SAEResult
    sae: SAE | None = None


def evaluate(
    loaded: LoadedThresholds,
    names: list[str] | None = None,
    progress: bool = True,
    models: ModelCache | None = None,
    device: str | None = None,
) -> EvalReport:
    """Evaluate the named SAEs of a thresholds file (all when `names` is None).

    `device` overrides `[eval] device` (the pytest plugin gives each xdist worker its GPU).
    """
    config = loaded.config
    settings = config.eval
    models = models or ModelCache()
    device = str(resolve_device(device or settings.device))
    bootstrap = BootstrapSettings(settings.bootstrap_resamples, settings.confidence, settings.seed)
    requests = [_prepare(loaded, entry) for entry in config.sae if names is None or entry.display_name in names]

    groups: dict[tuple, list[_Request]] = defaultdict(list)
    for req in requests:
        if req.result.error is None:
            kwargs = processing_kwargs(req.sae.metadata.get("model_from_pretrained_kwargs"))
            groups[(req.result.model, json.dumps(kwargs, sort_keys=True))].append(req)

    eval_info: dict[str, Any] = {}
    timing = {"eval_s": 0.0, "n_tokens": 0}
    start = time.perf_counter()
    for (model_name, kwargs_json), group in groups.items():
        try:
            model = models.get(model_name, json.loads(kwargs_json), device, settings.dtype)
            tokens, counted, excluded = _eval_tokens(loaded, model)
        except SAEAcceptanceError as err:
            for req in group:
                req.result.error = str(err)
            continue
        eval_info.setdefault("tokens", _token_info(tokens, counted, excluded, settings.exclude_special_tokens))
        by_hook: dict[str, list[_Request]] = defaultdict(list)
        for req in group:
            if _check_fits(model, req):
                by_hook[req.result.hook].append(req)
        for hook, hook_requests in by_hook.items():
            dtype = resolve_dtype(settings.dtype)
            saes = {req.result.name: req.sae.to(device=device, dtype=dtype) for req in hook_requests}
            run = run_hook(model, hook, saes, tokens, counted, settings.batch_size, progress)
            timing["eval_s"] += run.eval_s
            timing["n_tokens"] += run.n_tokens
            geometry = _geometry(run, hook, config.canyon)
            for req in hook_requests:
                req.result.excluded_ids = excluded
                _measure(req, loaded, run, geometry, bootstrap, fingerprint(tokens))
    timing["wall_s"] = time.perf_counter() - start
    timing["tokens_per_s"] = timing["n_tokens"] / timing["eval_s"] if timing["eval_s"] else None
    return EvalReport(
        settings={
            **settings.model_dump(),
            "device": device,
            "bootstrap": {"resamples": bootstrap.resamples, "confidence": bootstrap.confidence, "seed": bootstrap.seed},
            "canyon": config.canyon.model_dump(),
            **eval_info,
        },
        timing=timing,
        saes={req.result.name: req.result for req in requests},
    )


def _prepare(loaded: LoadedThresholds, entry: SAEEntry) -> _Request:
    """Load the SAE and decide its model and hook; every problem found becomes the result's error."""
    path = loaded.resolve(entry.path)
    result = SAEResult(name=entry.display_name, path=path, expect_fail=list(entry.expect_fail))
    try:
        sae = load_sae(path)
    except SAEAcceptanceError as err:
        result.error = str(err)
        return _Request(entry, result)
    model = entry.model or loaded.config.eval.model or sae.model_name
    result.model = None if model is None else loaded.resolve_model(model)
    result.hook = entry.hook or sae.hook_name
    if entry.hook_out is not None:
        sae.hook_name_out = entry.hook_out
    result.layer = hook_layer(result.hook) if result.hook else None
    result.architecture, result.d_in, result.d_sae, result.k = sae.architecture, sae.d_in, sae.d_sae, sae.k
    problems = []
    if result.model is None:
        problems.append("no model: set `model` in [[sae]] or [eval], or metadata.model_name in cfg.json")
    if result.hook is None:
        problems.append("no hook: set `hook` in [[sae]], or metadata.hook_name in cfg.json")
    bad = sae.nonfinite_tensors()
    if bad:
        problems.append(f"SAE weights hold NaN or infinity in tensor(s) {', '.join(bad)}")
    if problems:
        result.error = f"{path}: {'; '.join(problems)}"
    return _Request(entry, result, sae)


def _eval_tokens(loaded: LoadedThresholds, model) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    settings = loaded.config.eval
    if settings.context_size > model.cfg.n_ctx:
        raise SourceError(
            f"{loaded.path}:{loaded.line_of('eval', 'context_size')}: eval.context_size = "
            f"{settings.context_size} is beyond the model's n_ctx = {model.cfg.n_ctx}"
        )
    tokens = load_tokens(
        loaded.resolve(settings.data),
        settings.n_sequences,
        settings.context_size,
        settings.skip,
        tokenizer=getattr(model, "tokenizer", None),
        column=settings.column,
        split=settings.split,
    )
    if int(tokens.max()) >= model.cfg.d_vocab or int(tokens.min()) < 0:
        raise SourceError(
            f"eval.data {settings.data!r}: token ids span [{int(tokens.min())}, {int(tokens.max())}], "
            f"outside the model's vocabulary of {model.cfg.d_vocab}"
        )
    rule = settings.exclude_special_tokens
    excluded = special_token_ids(model) if rule is True else list(rule) if rule else []
    counted = counted_mask(tokens, excluded)
    if not bool(counted.any()):
        raise SourceError(
            f"{loaded.path}:{loaded.line_of('eval', 'exclude_special_tokens')}: eval.exclude_special_tokens "
            f"excludes every token of the eval set (ids {excluded})"
        )
    return tokens, counted, excluded


def _token_info(tokens: torch.Tensor, counted: torch.Tensor, excluded: list[int], rule) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint(tokens),
        "n_tokens": int(tokens.numel()),
        "n_counted": int(counted.sum()),
        "excluded_ids": excluded,
        "rule": "special tokens (BOS/EOS/PAD)" if rule is True else "listed ids" if rule else "none",
    }


def _check_fits(model, req: _Request) -> bool:
    if hook_layer(req.result.hook) is None:
        req.result.error = (
            f"{req.result.path}: hook {req.result.hook!r} is outside the blocks; only hooks inside them "
            "(blocks.L.…) can be patched"
        )
        return False
    try:
        width = hook_width(model, req.result.hook)
    except SourceError as err:
        req.result.error = f"{req.result.path}: {err}"
        return False
    if width != req.sae.d_in:
        req.result.error = (
            f"{req.result.path}: SAE d_in = {req.sae.d_in} but hook {req.result.hook} has width {width}"
        )
        return False
    return True


def _geometry(run: HookRun, hook: str, canyon) -> LayerGeometry:
    rule = CanyonRule(canyon.threshold, canyon.use)
    return LayerGeometry.measure(hook, hook_layer(hook), run.covariance.covariance(), rule)


def _measure(
    req: _Request,
    loaded: LoadedThresholds,
    run: HookRun,
    geometry: LayerGeometry,
    bootstrap: BootstrapSettings,
    tokens_fingerprint: str,
) -> None:
    result = req.result
    sums = run.sums[result.name]
    result.sums, result.geometry, result.tokens_fingerprint = sums, geometry, tokens_fingerprint
    bad = check_finite(sums)
    if bad:
        result.error = f"{result.path}: the eval produced NaN or infinity in {', '.join(bad)}"
    points = {name: float(v) for name, v in sums.metrics().items()}
    intervals = bootstrap_intervals(sums, bootstrap)
    result.metrics = {name: MetricValue(points[name], intervals[name]) for name in points}
    n_counted = float(sums.scalars["n_tokens"].sum())
    result.metrics["alive_frac"] = MetricValue(alive_fraction(sums.fired))
    result.metrics["rate_bits"] = MetricValue(rate_bits(sums.fired, n_counted))
    result.metrics = {name: result.metrics[name] for name in METRICS if name in result.metrics}
    context = loss_context(result.metrics)
    result.verdicts = {
        name: judge(name, result.metrics[name], bound, context if name.startswith(("ce_", "delta_ce", "kl_")) else "")
        for name, bound in loaded.config.gate_for(req.entry).items()
    }
    if geometry.canyon:
        result.r2_warning = canyon_warning(
            result.name, result.metrics["r2"].value, geometry.hook, geometry.pr, geometry.pr_ratio,
            loaded.config.canyon.threshold,
        )
    if not math.isfinite(result.metrics["r2"].value) and result.error is None:
        result.error = f"{result.path}: r2 is not finite (the eval set has no variance?)"
