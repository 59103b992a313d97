"""The library's front door: a validated thresholds file -> an `EvalReport`.

Config names the inputs; sources load them (each model and token set once);
the engine runs each hookpoint once for all its SAEs; metrics, intervals and
verdicts follow. Problems with one SAE (a bad file, a width that does not fit
the hook, NaN weights) become that SAE's error, so the rest still run.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from sae_acceptance.config import (
    Bound,
    CanyonSettings,
    CLTEntry,
    EvalSettings,
    LoadedThresholds,
    SAEEntry,
    SpliceEntry,
    same_hook,
)
from sae_acceptance.diagnostics import Diagnostics
from sae_acceptance.engine import HookRun, check_finite, run_model
from sae_acceptance.errors import HookOverrideWarning, SAEAcceptanceError, SourceError
from sae_acceptance.geometry import LayerGeometry
from sae_acceptance.hooks import hook_layer
from sae_acceptance.io import finite_or_none, workspace_path
from sae_acceptance.metrics import (
    DUPLICATE_COSINE,
    METRICS,
    SPLICE_METRICS,
    alive_fraction,
    dead_fraction,
    dense_fraction,
    freq_over,
    interval_metrics,
    is_loss_metric,
    normalized_freq_over,
    rate_bits,
)
from sae_acceptance.results import CLTResult, EntryResult, EvalReport, Latents, SAEResult, Source, SpliceResult
from sae_acceptance.sources.backends import Backend
from sae_acceptance.sources.backends.families import backend_for, same_point
from sae_acceptance.sources.clt import CLT
from sae_acceptance.sources.formats.circuit_tracer import load_clt
from sae_acceptance.sources.model import (
    ModelCache,
    processing_kwargs,
    resolve_device,
    resolve_dtype,
)
from sae_acceptance.sources.sae import SAE
from sae_acceptance.sources.sae_io import load_sae
from sae_acceptance.sources.tokens import counted_mask, fingerprint, load_tokens
from sae_acceptance.stats import BootstrapSettings, SequenceSums, bootstrap_intervals, check_bootstrap_fits
from sae_acceptance.verdict import MetricValue, canyon_warning, judge, loss_context
from sae_acceptance.weights import latent_weights

# A model is loaded once per name, processing and backend: (name, sorted processing kwargs, backend).
ModelKey = tuple[str, tuple[tuple[str, Any], ...], str]


EntryT = TypeVar("EntryT", SAEEntry, CLTEntry)
ResultT = TypeVar("ResultT", SAEResult, CLTResult)
SourceT = TypeVar("SourceT", SAE, CLT)


@dataclass
class _Request(Generic[EntryT, ResultT, SourceT]):
    """One entry on its way through an evaluation: its config entry, its result so far, and
    what was read for it (an SAE or a CLT; None where reading failed, with `result.error` set)."""

    entry: EntryT
    result: ResultT
    source: SourceT | None = None

    @property
    def loaded(self) -> SourceT:
        """What was read, for a request its preparation found no problem with (only those reach a model)."""
        assert self.source is not None, f"{self.result.name}: not loaded"
        return self.source


_SAERequest = _Request[SAEEntry, SAEResult, SAE]
_CLTRequest = _Request[CLTEntry, CLTResult, CLT]


def evaluate(
    loaded: LoadedThresholds,
    names: list[str] | None = None,
    progress: bool = True,
    models: ModelCache | None = None,
    device: str | None = None,
    splices: list[str] | None = None,
) -> EvalReport:
    """Evaluate the named SAEs and splices of a thresholds file (all when `names` is None;
    `splices` None: those whose members are all named). A splice's members are evaluated
    with it, named or not. A `[[clt]]` is evaluated when `names` is None or holds its key
    (`clt:<name>`).

    `device` overrides `[eval] device` (the pytest plugin gives each xdist worker its GPU).
    """
    config = loaded.config
    settings = config.eval
    models = models or ModelCache()
    device = str(resolve_device(device or settings.device))
    bootstrap = settings.bootstrap
    check_bootstrap_fits(settings.n_sequences, bootstrap.resamples, str(loaded.path))
    wanted = None if names is None else set(names)
    splice_entries = [
        s
        for s in config.splice
        if (s.name in splices if splices is not None else wanted is None or set(s.saes) <= wanted)
    ]
    if wanted is not None:
        wanted |= {member for s in splice_entries for member in s.saes}
    requests = [
        _prepare(loaded, entry, i) for i, entry in enumerate(config.sae) if wanted is None or entry.key in wanted
    ]
    by_name = {req.result.name: req for req in requests}
    joint = {
        s.name: SpliceResult(
            s.name, expect_fail=list(s.expect_fail), source=_source(loaded, "splice", i), saes=list(s.saes)
        )
        for i, s in enumerate(config.splice)
        if s in splice_entries
    }

    clt_requests = [
        _prepare_clt(loaded, entry, i) for i, entry in enumerate(config.clt) if wanted is None or entry.key in wanted
    ]
    clt_groups: dict[ModelKey, list[_CLTRequest]] = defaultdict(list)
    for creq in clt_requests:
        if creq.result.error is None and creq.source is not None:
            assert creq.result.model is not None  # _prepare_clt: no error means a model
            kind = backend_for(settings.backend, creq.source.hook_in(0), creq.source.hook_out(0))
            clt_groups[(creq.result.model, tuple(sorted(processing_kwargs().items())), kind)].append(creq)

    groups: dict[ModelKey, list[_SAERequest]] = defaultdict(list)
    for req in requests:
        if req.result.error is None and req.source is not None:
            kwargs = processing_kwargs(req.source.metadata.get("model_from_pretrained_kwargs"))
            kind = backend_for(settings.backend, req.result.hook, req.source.hook_name_out)
            assert req.result.model is not None  # _prepare: no error means a model and a hook
            groups[(req.result.model, tuple(sorted(kwargs.items())), kind)].append(req)

    eval_info: dict[str, Any] = {}
    timing: dict[str, Any] = {"eval_s": 0.0, "n_tokens": 0}
    start = time.perf_counter()
    for model_name, kwarg_items, kind in dict.fromkeys([*groups, *clt_groups]):
        key = (model_name, kwarg_items, kind)
        group: list[_SAERequest] = groups.get(key, [])
        clt_group: list[_CLTRequest] = clt_groups.get(key, [])
        try:
            backend = models.backend(model_name, dict(kwarg_items), device, settings.dtype, kind, settings.devices)
            tokens, counted, excluded = _eval_tokens(loaded, backend)
        except SAEAcceptanceError as err:
            for unloaded in [req.result for req in group] + [creq.result for creq in clt_group]:
                unloaded.error = str(err)
            continue
        eval_info.setdefault("tokens", _token_info(tokens, counted, excluded, settings.exclude_special_tokens))
        by_hook: dict[str, list[_SAERequest]] = defaultdict(list)
        for req in group:
            if _check_fits(backend, req):
                _warn_if_overridden(req)
                assert req.result.hook is not None  # _prepare: no error means a model and a hook
                by_hook[req.result.hook].append(req)
        sae_dtype = _sae_dtype(settings)
        clts = {
            creq.result.name: creq.loaded.to(device=backend.device, dtype=sae_dtype)
            for creq in clt_group
            if _clt_fits(backend, creq)
        }
        if not by_hook and not clts:
            continue
        saes = {
            hook: {req.result.name: req.loaded.to(device=backend.hook_device(hook), dtype=sae_dtype) for req in reqs}
            for hook, reqs in by_hook.items()
        }
        spliced = _splices_of(loaded, splice_entries, joint, by_name, group, saes)
        model_run = run_model(
            backend, saes, tokens, counted, settings.batch_size, progress, spliced, diagnostics_of(settings), clts
        )
        timing["eval_s"] += model_run.eval_s
        timing["n_tokens"] += model_run.n_positions
        shown = model_name if kind == settings.backend else f"{model_name} ({kind})"
        eval_info.setdefault("models", {})[shown] = {
            "backend": model_run.backend,
            "patched_passes": "tail from the hook" if model_run.tail_only else "full forward",
            "placement": backend.placement,
        }
        tokens_fingerprint = fingerprint(tokens)
        for hook, hook_requests in by_hook.items():
            run = model_run.hooks[hook]
            geometry = _geometry(run, hook, backend.hook_layer(hook), config.canyon)
            for req in hook_requests:
                req.result.layer = backend.hook_layer(hook)
                req.result.tokens_fingerprint, req.result.excluded_ids = tokens_fingerprint, excluded
                _measure_sae(req, loaded, run, geometry, bootstrap, saes[hook][req.result.name], backend.tokenizer)
        for name, sums in model_run.splices.items():
            splice = joint[name]
            splice.tokens_fingerprint, splice.excluded_ids = tokens_fingerprint, excluded
            bounds = config.gate_for(config.by_key[splice.key])
            _measure(splice, splice.label, bounds, sums, bootstrap, SPLICE_METRICS)
        for creq in clt_group:
            clt_run = model_run.clts.get(creq.result.name)
            if clt_run is None:
                continue
            clt_result = creq.result
            clt_result.tokens_fingerprint, clt_result.excluded_ids = tokens_fingerprint, excluded
            clt_result.layers = clt_run.layers
            bounds = config.gate_for(creq.entry)
            _measure(clt_result, clt_result.label, bounds, clt_run.sums, bootstrap, SPLICE_METRICS)
    for splice in joint.values():
        if splice.error is None and not splice.metrics:
            failed = [n for n in splice.saes if by_name[n].result.error is not None]
            splice.error = f"splice {splice.name}: " + (
                f"member {failed[0]} could not be evaluated: {by_name[failed[0]].result.error}"
                if failed
                else "its members were not evaluated in one model run"
            )
    timing["wall_s"] = time.perf_counter() - start
    timing["tokens_per_s"] = timing["n_tokens"] / timing["eval_s"] if timing["eval_s"] else None
    return EvalReport(
        settings={
            **settings.model_dump(),
            "device": device,
            "bootstrap": dataclasses.asdict(bootstrap),
            "canyon": config.canyon.model_dump(),
            **eval_info,
        },
        timing=timing,
        saes={req.result.name: req.result for req in requests},
        splices=joint,
        clts={creq.result.name: creq.result for creq in clt_requests},
    )


def _sae_dtype(settings: EvalSettings) -> torch.dtype | None:
    """`[eval] sae_dtype` as a torch dtype; None keeps what each SAE or CLT was read in."""
    return None if settings.sae_dtype is None else resolve_dtype(settings.sae_dtype)


def _prepare_clt(loaded: LoadedThresholds, entry: CLTEntry, index: int) -> _CLTRequest:
    """Load the CLT and decide its model; a problem becomes the result's error."""
    path = loaded.resolve(entry.path)
    result = CLTResult(entry.name, expect_fail=list(entry.expect_fail), source=_source(loaded, "clt", index), path=path)
    try:
        clt = load_clt(path, dtype=_sae_dtype(loaded.config.eval))
    except SAEAcceptanceError as err:
        result.error = str(err)
        return _CLTRequest(entry, result)
    model = entry.model or loaded.config.eval.model or clt.model_name
    result.model = None if model is None else loaded.resolve_model(model)
    result.clt_kind = clt.kind
    result.hooks = [clt.hook_out(layer) for layer in range(clt.n_layers)]
    result.hook = f"blocks.0-{clt.n_layers - 1}: {clt.input_hook} -> {clt.output_hook}"
    problems = []
    if result.model is None:
        problems.append("no model: set `model` in [[clt]] or [eval], or model_name in config.yaml")
    bad = clt.nonfinite_tensors()
    if bad:
        problems.append(f"CLT weights hold NaN or infinity in tensor(s) {', '.join(bad[:3])}")
    if problems:
        result.error = f"{path}: {'; '.join(problems)}"
    return _CLTRequest(entry, result, clt)


def _clt_fits(model: Backend, creq: _CLTRequest) -> bool:
    """The CLT's layers exist on the model and every hook it reads and writes has its d_model."""
    clt, result = creq.loaded, creq.result
    if clt.n_layers > model.n_layers:
        result.error = f"{result.path}: the CLT has {clt.n_layers} layers, the model {model.n_layers}"
        return False
    for layer in range(clt.n_layers):
        for hook in (clt.hook_in(layer), clt.hook_out(layer)):
            try:
                width = model.hook_width(hook)
            except SAEAcceptanceError as err:
                result.error = f"{result.path}: {err}"
                return False
            if width != clt.d_model:
                result.error = f"{result.path}: CLT d_model = {clt.d_model} but hook {hook} has width {width}"
                return False
    return True


def _splices_of(
    loaded: LoadedThresholds,
    entries: list[SpliceEntry],
    joint: dict[str, SpliceResult],
    by_name: dict[str, _SAERequest],
    group: list[_SAERequest],
    saes: dict[str, dict[str, SAE]],
) -> dict[str, dict[str, SAE]]:
    """The splices this model run can patch ({name: {hook: SAE}}): every member measured here,
    one per hook. A member at a hook already taken (read from its cfg.json) is a config error."""
    here = {req.result.name for req in group}
    runnable = {}
    for i, entry in enumerate(loaded.config.splice):
        if entry not in entries or not set(entry.saes) <= here:
            continue
        members = [by_name[n].result for n in entry.saes]
        result = joint[entry.name]
        result.model, result.hooks = members[0].model, [str(m.hook) for m in members]
        result.hook = " + ".join(result.hooks)
        clash = same_hook([(m.name, hook) for m, hook in zip(members, result.hooks, strict=True)])
        if clash:
            where = loaded.place(str(loaded.path), "splice", i, "saes")
            result.error = f"{where}: splice.{i}.saes: {clash}"
        elif all(m.error is None for m in members):
            runnable[entry.name] = {hook: saes[hook][m.name] for m, hook in zip(members, result.hooks, strict=True)}
    return runnable


def diagnostics_of(settings: EvalSettings) -> Diagnostics:
    """The engine's diagnostic switches from `[eval] diagnostics` and `worst_n`."""
    parts = settings.parts()
    return Diagnostics(
        random="random" in parts,
        gradient="gradient" in parts,
        worst_n=settings.worst_n if "worst" in parts else 0,
        propagation="propagation" in parts,
        saebench="saebench" in parts,
        seed=settings.seed,
    )


def _source(loaded: LoadedThresholds, table: str, index: int) -> Source | None:
    """Where the `index`-th `[[table]]` of the file is declared (none for settings given on a command line)."""
    return Source(workspace_path(loaded.path), loaded.line_of(table, index)) if loaded.text else None


def _prepare(loaded: LoadedThresholds, entry: SAEEntry, index: int) -> _SAERequest:
    """Load the SAE and decide its model and hook; every problem found becomes the result's error."""
    path = loaded.resolve(entry.path)
    result = SAEResult(
        name=entry.key, path=path, expect_fail=list(entry.expect_fail), source=_source(loaded, "sae", index)
    )
    try:
        sae = load_sae(path, dtype=_sae_dtype(loaded.config.eval))
    except SAEAcceptanceError as err:
        result.error = str(err)
        return _SAERequest(entry, result)
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
    return _SAERequest(entry, result, sae)


def _eval_tokens(loaded: LoadedThresholds, model: Backend) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    settings = loaded.config.eval
    if settings.context_size > model.n_ctx:
        raise SourceError(
            f"{loaded.path}:{loaded.line_of('eval', 'context_size')}: eval.context_size = "
            f"{settings.context_size} is beyond the model's n_ctx = {model.n_ctx}"
        )
    tokens = load_tokens(
        loaded.resolve(settings.data),
        settings.n_sequences,
        settings.context_size,
        settings.skip,
        tokenizer=model.tokenizer,
        column=settings.column,
        split=settings.split,
    )
    if int(tokens.max()) >= model.d_vocab or int(tokens.min()) < 0:
        raise SourceError(
            f"eval.data {settings.data!r}: token ids span [{int(tokens.min())}, {int(tokens.max())}], "
            f"outside the model's vocabulary of {model.d_vocab}"
        )
    rule = settings.exclude_special_tokens
    excluded = model.special_token_ids() if rule is True else list(rule) if rule else []
    counted = counted_mask(tokens, excluded)
    if not bool(counted.any()):
        raise SourceError(
            f"{loaded.path}:{loaded.line_of('eval', 'exclude_special_tokens')}: eval.exclude_special_tokens "
            f"excludes every token of the eval set ({_ids(excluded)})"
        )
    return tokens, counted, excluded


def _ids(ids: list[int], shown: int = 8) -> str:
    """Token ids for a one-line message: the first few and how many."""
    head = ", ".join(map(str, ids[:shown]))
    return f"ids {head}" if len(ids) <= shown else f"{len(ids)} ids: {head}, …"


def _token_info(
    tokens: torch.Tensor, counted: torch.Tensor, excluded: list[int], rule: bool | list[int]
) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint(tokens),
        "n_tokens": int(tokens.numel()),
        "n_counted": int(counted.sum()),
        "excluded_ids": excluded,
        "rule": "special tokens (BOS/EOS/PAD)" if rule is True else "listed ids" if rule else "none",
    }


def _warn_if_overridden(req: _SAERequest) -> None:
    """A `hook` that differs from the one the SAE records: legal, and almost always a mistake
    (the same point in the other naming is neither)."""
    given, own = req.entry.hook, req.loaded.hook_name
    if given and own and not same_point(given, own):
        warnings.warn(
            HookOverrideWarning(
                f"{req.result.name}: evaluated at {given}, but {req.result.path} was trained at {own} "
                "(its cfg.json); drop `hook` to use the SAE's own"
            ),
            stacklevel=3,
        )


def _check_fits(model: Backend, req: _SAERequest) -> bool:
    """The SAE's hooks exist on the model, inside its blocks, with the widths the SAE reads and writes."""
    sae, hook = req.loaded, req.result.hook
    assert hook is not None  # _prepare: no error means a model and a hook
    hook_out = getattr(sae, "hook_name_out", None)
    head = getattr(sae, "hook_head_index", None)
    try:
        width = model.hook_width(hook)
        out_width = model.hook_width(hook_out) if hook_out else None
    except SourceError as err:
        req.result.error = f"{req.result.path}: {err}"
        return False
    problem = None
    if head is not None and (head + 1) * sae.d_in > width:
        problem = f"head {head} of width {sae.d_in} does not fit hook {hook} of width {width}"
    elif head is None and width != sae.d_in:
        problem = f"SAE d_in = {sae.d_in} but hook {hook} has width {width}"
    elif out_width is not None and out_width != sae.W_dec.shape[-1]:
        problem = f"SAE output width {sae.W_dec.shape[-1]} but hook_out {hook_out} has width {out_width}"
    if problem:
        req.result.error = f"{req.result.path}: {problem}"
        return False
    return True


def _geometry(run: HookRun, hook: str, layer: int | None, canyon: CanyonSettings) -> LayerGeometry:
    return LayerGeometry.measure(hook, layer, run.covariance.covariance(), canyon)


def _measure(
    result: EntryResult,
    where: str,
    bounds: dict[str, Bound],
    sums: SequenceSums,
    bootstrap: BootstrapSettings,
    shown: Collection[str],
    extra: dict[str, MetricValue] | None = None,
) -> None:
    """Sums -> metrics with their intervals (those in `shown`, plus `extra`), and the verdicts of
    `bounds`: the same steps for an SAE and a splice (`where` names it in an error)."""
    result.sums = sums
    bad = check_finite(sums)
    if bad:
        result.error = f"{where}: the eval produced NaN or infinity in {', '.join(bad)}"
    points = sums.metrics()
    intervals = bootstrap_intervals(sums, bootstrap)
    measured = {name: MetricValue(float(points[name]), intervals[name]) for name in shown} | (extra or {})
    result.metrics = {name: measured[name] for name in METRICS if name in measured}
    context = loss_context(result.metrics)
    result.verdicts = {
        name: judge(name, result.metrics[name], bound, context if is_loss_metric(name) else "")
        for name, bound in bounds.items()
    }


def _measure_sae(
    req: _SAERequest,
    loaded: LoadedThresholds,
    run: HookRun,
    geometry: LayerGeometry,
    bootstrap: BootstrapSettings,
    sae: SAE,
    tokenizer: Any,
) -> None:
    """An SAE's metrics and verdicts, its latents, its layer's geometry, the R² warning, and what
    the diagnostics found (worst contexts, propagation, weight statistics)."""
    result = req.result
    sums = run.sums[result.name]
    n_counted = float(sums.scalars["n_tokens"].sum())
    settings = loaded.config.eval
    fired = sums.fired
    latent = {
        "alive_frac": alive_fraction(fired),
        "rate_bits": rate_bits(fired, n_counted),
        "dead_frac": dead_fraction(fired),
        "dense_frac": dense_fraction(fired, n_counted, settings.dense_threshold),
    }
    result.latents = Latents(fired, n_counted, run.fired_sequences.get(result.name))
    if "saebench" in settings.parts():
        for percent in (1, 10):
            latent[f"freq_over_{percent}_percent"] = freq_over(fired, n_counted, percent / 100)
            latent[f"normalized_freq_over_{percent}_percent"] = normalized_freq_over(fired, n_counted, percent / 100)
        result.latents.weights = latent_weights(sae)
        decoder = result.latents.weights["max_decoder_cosine"]
        latent["max_decoder_cosine"] = float(np.nanmean(decoder)) if decoder.size > 1 else math.nan
        latent["max_encoder_cosine"] = _mean(result.latents.weights["max_encoder_cosine"])
        latent["duplicate_frac"] = float((decoder > DUPLICATE_COSINE).mean()) if decoder.size > 1 else math.nan
    extra = {name: MetricValue(value) for name, value in latent.items()}
    bounds = loaded.config.gate_for(req.entry)
    _measure(result, result.path, bounds, sums, bootstrap, interval_metrics(set(sums.scalars)), extra)
    result.geometry = geometry
    result.worst_contexts = [_decoded(record, tokenizer) for record in run.worst.get(result.name, [])]
    propagation = run.propagation.get(result.name)
    if propagation is not None:
        ratios = propagation.ratios()
        result.propagation = [
            {"layer": layer, "ratio": finite_or_none(r)} for layer, r in zip(propagation.layers, ratios, strict=True)
        ]
    if geometry.canyon:
        result.r2_warning = canyon_warning(
            result.name,
            result.metrics["r2"].value,
            geometry.hook,
            geometry.pr,
            geometry.pr_ratio,
            loaded.config.canyon.threshold,
            result.metrics,
        )
    if not math.isfinite(result.metrics["r2"].value) and result.error is None:
        result.error = f"{result.path}: r2 is not finite (the eval set has no variance?)"


def _mean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if values.size > 1 else math.nan


def _decoded(record: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """A worst context with its window and target as text, where the model has a tokenizer."""
    if tokenizer is None:
        return record
    return {**record, "text": tokenizer.decode(record["window"]), "target_text": tokenizer.decode([record["target"]])}
