"""sae-acceptance eval | merge | pr-profile | train | sweep | schema | build-reference.

The same loaders and engine as the pytest plugin. Exit status: 0 all as
expected, 1 a gate failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from sae_acceptance.baseline import (
    Baseline,
    RefreshFlags,
    add_refresh_options,
    baseline_entries,
    check_refreshable,
    load_baseline,
    remedy,
    sidecar_path,
)
from sae_acceptance.config import (
    CanyonSettings,
    EvalSettings,
    LoadedThresholds,
    describe,
    load_thresholds,
    thresholds_from_mapping,
    write_json_schema,
)
from sae_acceptance.errors import BaselineError, ConfigError, ReportError, SAEAcceptanceError
from sae_acceptance.gate import Outputs, exit_status, run_gate, write_outputs
from sae_acceptance.io import REPORT_LIMIT, ignored_fields_note, read_json, stdin_empty, write_json
from sae_acceptance.pr_profile import (
    HOOK_TYPE,
    format_profile_table,
    plot_pr_profile,
    pr_profile,
    profile_to_json,
)
from sae_acceptance.reference.build import build_reference
from sae_acceptance.report import format_report, merge_shards, read_densities
from sae_acceptance.results import EvalReport, ShardRecord, unknown_fields
from sae_acceptance.shard import RUN_ID_VARIABLES, Shard, run_fingerprint, run_id, shard_members
from sae_acceptance.sources.model import hook_width, load_model, special_token_ids
from sae_acceptance.sources.tokens import counted_mask, load_tokens
from sae_acceptance.train import builtin_profiles
from sae_acceptance.train.analysis import write_analysis
from sae_acceptance.train.grid import train_at_hook
from sae_acceptance.train.settings import TrainSettings
from sae_acceptance.train.sweep import sweep

EVAL_SET = ("data", "n_sequences", "context_size", "skip", "batch_size", "device", "dtype")
EVAL_RUN = ("sae_dtype", "backend", "bootstrap_resamples", "seed")
TRAIN_OPTIONS = ("expansion_factor", "d_sae", "batch_size", "lr", "optimizer", "warmup_steps", "dead_tokens", "seed")
CLI_FLAGS = RefreshFlags(refresh="--update-baseline", force="--update-baseline=force", strict="--baseline-strict")


def add_fields(
    parser: argparse.ArgumentParser, model: type[BaseModel], names: tuple[str, ...], defaults: bool = True
) -> None:
    """One `--flag` per settings field: type, choices, help and default come from the model,
    so the CLI never restates a default. With `defaults=False` an absent flag is None (the
    settings model fills it in later), and `--help` still shows the default it gets."""
    for name in names:
        field = model.model_fields[name]
        kind = field.annotation
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        options: dict[str, Any] = {"help": field.description}
        if typing.get_origin(kind) is typing.Literal:
            options["choices"] = typing.get_args(kind)
        elif kind in (int, float):
            options["type"] = kind
        shown = None if field.is_required() else field.get_default(call_default_factory=True)
        default = shown if defaults else None
        if shown is not None:
            options["help"] = f"{field.description} (default: {shown})"
        parser.add_argument(f"--{name.replace('_', '-')}", default=default, **options)


class UsageError(ConfigError):
    """A command line argparse refuses: one line, exit status 2, like every other bad input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_report_outputs(parser: argparse.ArgumentParser) -> None:
    """The report files that `eval` and `merge` both write (merge's are the whole run's)."""
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the JSON report here")
    parser.add_argument("--html", type=Path, metavar="OUT", help="write the self-contained HTML report here")
    parser.add_argument("--saebench-json", type=Path, metavar="DIR", help="write each SAE's SAEBench core result here")


def build_parser() -> argparse.ArgumentParser:
    """The `sae-acceptance` command line: one subcommand per task, each with its options."""
    parser = _Parser(prog="sae-acceptance", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate SAEs (a thresholds file, or SAEs named here)")
    ev.add_argument(
        "--config",
        type=Path,
        help="a thresholds.toml: run its gate without pytest (its settings, models and SAEs; "
        "the settings flags below go with --sae)",
    )
    ev.add_argument("--model", help="TransformerLens model name or local HF checkpoint directory")
    ev.add_argument("--hook", help="hookpoint, e.g. blocks.3.hook_resid_post (default: the SAE's own)")
    ev.add_argument(
        "--sae",
        action="append",
        default=[],
        metavar="PATH",
        help="SAE directory, hf://owner/repo/folder or sae-lens://release/sae_id (repeatable)",
    )
    add_fields(ev, EvalSettings, EVAL_SET + EVAL_RUN, defaults=False)  # thresholds.toml's defaults apply
    add_report_outputs(ev)
    ev.add_argument(
        "--baseline",
        type=Path,
        metavar="PATH",
        help="compare against this regression baseline (default: the thresholds file's `baseline =`)",
    )
    add_refresh_options(ev.add_argument, CLI_FLAGS, "update_baseline")
    ev.add_argument("--shard", metavar="I/N", help="evaluate shard I of N of the SAEs (units kept whole); see `merge`")
    ev.add_argument(
        "--run-id",
        metavar="ID",
        help=f"the run this shard belongs to, for `merge` (default: ${' or $'.join(RUN_ID_VARIABLES)})",
    )
    ev.add_argument(
        "--baseline-part",
        type=Path,
        metavar="OUT.json",
        help="write this run's baseline entries here (a baseline of its own; `merge --update-baseline` folds parts in)",
    )
    ev.add_argument("--no-progress", action="store_true")

    mg = sub.add_parser("merge", help="combine shards' JSON reports (and baseline parts) into one run's")
    mg.add_argument(
        "shards", nargs="+", metavar="SHARD", help="a shard's JSON report, or a `sweep --shard` output folder"
    )
    add_report_outputs(mg)
    mg.add_argument("--run-id", metavar="ID", help="refuse shards of any other run (their recorded run id)")
    mg.add_argument(
        "--baseline-part",
        type=Path,
        nargs="+",
        default=[],
        metavar="PART.json",
        help="the shards' `eval --baseline-part` files",
    )
    mg.add_argument("--update-baseline", type=Path, metavar="BASELINE.json", help="fold the parts into this baseline")
    mg.add_argument("--force", action="store_true", help="replace a baseline that cannot be read")
    sweep_out_help = "sweep shards: write report.json, points.json and the analysis tables here"
    mg.add_argument("--sweep-out", type=Path, metavar="DIR", help=sweep_out_help)

    pr = sub.add_parser("pr-profile", help="participation ratio per layer, and the canyon rule")
    pr.add_argument("--model", required=True)
    add_fields(pr, EvalSettings, EVAL_SET)
    pr.add_argument("--hook-type", default=HOOK_TYPE, help=f"block hooks to profile (default: {HOOK_TYPE})")
    add_fields(pr, CanyonSettings, ("threshold", "use"))
    pr.add_argument("--json", type=Path, metavar="OUT")
    pr.add_argument("--plot", type=Path, metavar="OUT.png")
    pr.add_argument("--no-progress", action="store_true")

    sw = sub.add_parser("sweep", help="train a sweep profile's SAEs, gate them, write the log's tables")
    sw.add_argument("--profile", required=True, help=f"{', '.join(builtin_profiles())}, or a profile .toml")
    sw.add_argument("--out", type=Path, required=True)
    sw.add_argument(
        "--cache", type=Path, default=None, help="trained-SAE cache (default: ~/.cache/sae-acceptance/sweeps)"
    )
    add_fields(sw, EvalSettings, ("device",))
    sw.add_argument(
        "--shard", metavar="I/N", help="train and gate shard I of N of the sweep profile's (model, hook) grids"
    )
    sw.add_argument("--no-progress", action="store_true")

    tr = sub.add_parser("train", help="train TopK SAEs (a k grid from one data pass) at one hookpoint")
    tr.add_argument("--model", required=True)
    tr.add_argument("--hook", required=True)
    tr.add_argument("--data", required=True, help="a .npy token file, a local dataset directory, or a hub dataset")
    tr.add_argument("--k", type=int, action="append", required=True, help="repeatable: one SAE per k")
    tr.add_argument("--train-tokens", type=int, required=True)
    add_fields(tr, EvalSettings, ("context_size",))
    add_fields(tr, TrainSettings, TRAIN_OPTIONS)
    add_fields(tr, EvalSettings, ("device",))
    tr.add_argument("--out", type=Path, required=True, help="writes OUT/k{k} in SAELens format")
    tr.add_argument("--no-progress", action="store_true")

    sc = sub.add_parser("schema", help="write the JSON Schema of thresholds.toml")
    sc.add_argument("--out", type=Path, default=Path("thresholds.schema.json"))

    ref = sub.add_parser("build-reference", help="rebuild the embedded reference model, tokens and SAEs")
    ref.add_argument("--out", type=Path, default=Path("reference"))
    ref.add_argument("--reuse-model", action="store_true", help="keep the checkpoint, retrain the SAEs")
    ref.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every way it can end is an exit status (0 as expected, 1 a gate or
    regression failed, 2 bad input or an error of the tool) and at most one line on stderr."""
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings(), stdin_empty():
            warnings.showwarning = _one_line_warning
            return COMMANDS[args.command](args)
    except SAEAcceptanceError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written after the interruption")
    except MemoryError:
        return _fail("out of memory (try a smaller --batch-size or n_sequences)")
    except OSError as err:  # a file the tool was told to write or read, refused by the system
        where = f"{err.filename}: " if err.filename else ""
        return _fail(f"{where}{err.strerror or err}")


def _fail(message: str) -> int:
    print(f"sae-acceptance: error: {message}", file=sys.stderr)
    return 2


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: typing.TextIO | None = None,
    line: str | None = None,
) -> None:
    print(f"sae-acceptance: warning: {message}", file=sys.stderr)


def _one_stream() -> bool:
    """Whether stdout and stderr end in one place (a terminal, `2>&1`): there the report's
    ERROR lines are already in view, and repeating them on stderr would print each twice."""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


def _cmd_eval(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in EVAL_SET + EVAL_RUN if getattr(args, name) is not None}
    if args.config is not None:
        clashing = [f"--{name.replace('_', '-')}" for name in given] + [
            flag for flag, value in (("--model", args.model), ("--hook", args.hook), ("--sae", args.sae)) if value
        ]
        if clashing:
            raise SAEAcceptanceError(
                f"eval --config takes the eval settings, models and SAEs from {args.config}; "
                f"drop {', '.join(clashing)} (or set them in the file)"
            )
        loaded = load_thresholds(args.config)
    else:
        if not args.sae or not args.data:
            raise SAEAcceptanceError("eval needs --config FILE, or --sae PATH (repeatable) and --data")
        loaded = thresholds_from_mapping(
            {
                "eval": {**given, **({"model": args.model} if args.model else {})},
                "sae": [{"path": str(p), **({"hook": args.hook} if args.hook else {})} for p in args.sae],
            },
            source="command line",
        )
    shard = None if args.shard is None else Shard.parse(args.shard)
    names = None if shard is None else shard_members(loaded, shard)
    if shard is not None and not names:
        print(shard.empty_note())
    baseline, target = _baselines(loaded, args)
    report = run_gate(loaded, baseline, CLI_FLAGS, args.baseline_strict, names=names, progress=not args.no_progress)
    if shard is not None:
        inputs = [] if baseline is None else [baseline.path, sidecar_path(baseline.path)]
        fingerprint = run_fingerprint([loaded], shard.count, inputs)
        report.shard = ShardRecord(shard.index, shard.count, list(names or []), run_id(args.run_id), fingerprint)
    print(format_report(report))
    if not _one_stream():  # also on stderr, where a CI log shows a tool's errors
        for result in report.entries:
            for message in (result.error, result.baseline_error):
                if message:
                    print(f"sae-acceptance: error: {message}", file=sys.stderr)
    entries = baseline_entries(report, loaded.config.eval) if args.baseline_part or target else {}
    outputs = Outputs(
        json=args.json,
        html=args.html,
        saebench=args.saebench_json,
        baseline_part=None if args.baseline_part is None else (args.baseline_part, entries),
        refresh={target: entries} if target is not None else {},
        force=args.update_baseline == "force",
    )
    for line in write_outputs(report, outputs):
        print(line)
    return exit_status(report)


def _baselines(loaded: LoadedThresholds, args: argparse.Namespace) -> tuple[Baseline | None, Path | None]:
    """The baseline to compare against, read and checked now, before anything is evaluated; or,
    with --update-baseline, the one to write (an unreadable one refused now, unless forced)."""
    try:
        if args.update_baseline:
            target = loaded.baseline_file(args.baseline)
            if args.update_baseline != "force":
                check_refreshable(target)
            return None, target
        compared = loaded.compared_baseline(args.baseline)
        return (None if compared is None else load_baseline(compared)), None
    except BaselineError as err:
        raise BaselineError(remedy(err, CLI_FLAGS)) from None


def _cmd_merge(args: argparse.Namespace) -> int:
    shards, points = [], []
    for given in args.shards:
        path = Path(given) / "report.json" if Path(given).is_dir() else Path(given)
        report = _read_report(path)
        shards.append((str(path), report))
        if args.sweep_out is not None:
            points += read_json(path.parent / "points.json", "a sweep shard's points")
    merged = merge_shards(shards, args.run_id)
    print(format_report(merged))
    refresh = {}
    if args.update_baseline is not None:
        entries = {}
        for part in args.baseline_part:
            entries.update(load_baseline(part).entries)
        missing = [r.key for r in merged.entries if r.error is None and r.key not in entries]
        if missing:
            raise SAEAcceptanceError(f"--baseline-part: no entry for {', '.join(missing)} (a shard's part not given?)")
        refresh = {args.update_baseline: entries}
    elif args.baseline_part:
        raise SAEAcceptanceError("merge --baseline-part needs --update-baseline BASELINE.json")
    outputs = Outputs(json=args.json, html=args.html, saebench=args.saebench_json, refresh=refresh, force=args.force)
    for line in write_outputs(merged, outputs):
        print(line)
    if args.sweep_out is not None:
        write_outputs(merged, Outputs(json=args.sweep_out / "report.json", actions=False))
        write_json(args.sweep_out / "points.json", points)
        write_analysis(points, args.sweep_out)
        print(f"report, points, tables and plots written to {args.sweep_out}")
    return exit_status(merged)


def _read_report(path: Path) -> EvalReport:
    """A shard's JSON report and its densities; fields of a newer version are ignored, with a note."""
    data = read_json(path, "a shard's JSON report", limit=REPORT_LIMIT)
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON report (an object), got {type(data).__name__}")
    try:
        report = EvalReport.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise ReportError(f"{path}: not a readable report ({type(err).__name__}: {err})") from None
    unknown = unknown_fields(data)
    if unknown:
        print(f"note: {ignored_fields_note(path, unknown)}")
    read_densities(path, report)
    return report


def _cmd_pr_profile(args: argparse.Namespace) -> int:
    if not args.data:
        raise SAEAcceptanceError("pr-profile needs --data")
    try:
        EvalSettings(**{name: getattr(args, name) for name in EVAL_SET})
    except ValidationError as err:
        raise ConfigError(describe(err, "", "pr-profile")) from None
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    tokens = load_tokens(args.data, args.n_sequences, args.context_size, args.skip, tokenizer=model.tokenizer)
    canyon = CanyonSettings(threshold=args.threshold, use=args.use)
    profile = pr_profile(
        model,
        tokens,
        counted_mask(tokens, special_token_ids(model)),
        hook_type=args.hook_type,
        batch_size=args.batch_size,
        canyon=canyon,
        progress=not args.no_progress,
    )
    print(format_profile_table(profile))
    if args.json is not None:
        write_json(args.json, profile_to_json(args.model, profile, canyon, args.hook_type))
        print(f"profile written to {args.json}")
    if args.plot is not None:
        plot_pr_profile(profile, args.plot, canyon, title=f"{args.model}: {args.hook_type}")
        print(f"plot written to {args.plot}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    shard = None if args.shard is None else Shard.parse(args.shard)
    return sweep(args.profile, args.out, args.cache, args.device, not args.no_progress, shard)


def _cmd_train(args: argparse.Namespace) -> int:
    settings = {name: getattr(args, name) for name in TRAIN_OPTIONS if getattr(args, name) is not None}
    try:
        for k in args.k:
            TrainSettings(k=k)
        cfg = TrainSettings(k=max(args.k), **settings)
    except ValidationError as err:
        raise ConfigError(describe(err, "", "train")) from None
    if args.train_tokens <= 0:
        raise ConfigError(f"train: --train-tokens must be above 0 (got {args.train_tokens})")
    model = load_model(args.model, device=args.device)
    width = hook_width(model, args.hook)  # an unknown hook: one line naming the closest ones
    too_big = [k for k in args.k if k > cfg.latents(width)]
    if too_big:
        raise ConfigError(
            f"train: --k {too_big[0]} is above d_sae = {cfg.latents(width)} latents at {args.hook} "
            f"(width {width}); raise --expansion-factor or --d-sae, or lower k"
        )
    n_sequences = args.train_tokens // args.context_size + 1
    tokens = load_tokens(args.data, n_sequences, args.context_size, tokenizer=model.tokenizer)
    paths = train_at_hook(
        model,
        str(args.model),
        tokens,
        args.hook,
        args.k,
        cfg,
        out={k: args.out / f"k{k}" for k in args.k},
        train_tokens=args.train_tokens,
        metadata={"context_size": args.context_size, "dataset_path": args.data},
        progress=not args.no_progress,
    )
    for k, path in paths.items():
        print(f"k={k}: {path}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    write_json_schema(args.out)
    print(f"schema written to {args.out}")
    return 0


def _cmd_build_reference(args: argparse.Namespace) -> int:
    out = build_reference(args.out, progress=not args.no_progress, reuse_model=args.reuse_model)
    manifest = read_json(out / "manifest.json", "the reference manifest")
    print(
        f"reference written to {out}: model (eval loss {manifest['eval_loss_nats']:.3f} nats) and SAEs "
        f"{', '.join(manifest['saes'])}; refresh the baseline (sae-acceptance eval --config thresholds.toml "
        "--update-baseline) and revisit the bounds"
    )
    return 0


COMMANDS = {
    "eval": _cmd_eval,
    "merge": _cmd_merge,
    "pr-profile": _cmd_pr_profile,
    "sweep": _cmd_sweep,
    "train": _cmd_train,
    "schema": _cmd_schema,
    "build-reference": _cmd_build_reference,
}


if __name__ == "__main__":
    sys.exit(main())
