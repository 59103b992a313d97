"""sae-acceptance eval | pr-profile | train | sweep | schema | build-reference.

The same loaders and engine as the pytest plugin. Exit status: 0 all as
expected, 1 a gate failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from sae_acceptance.config import (
    CanyonSettings,
    EvalSettings,
    describe,
    load_thresholds,
    thresholds_from_mapping,
    write_json_schema,
)
from sae_acceptance.errors import ConfigError, SAEAcceptanceError
from sae_acceptance.evaluate import evaluate
from sae_acceptance.geometry import CanyonRule
from sae_acceptance.io import write_atomic, write_json
from sae_acceptance.pr_profile import (
    format_profile_table,
    plot_pr_profile,
    pr_profile,
    profile_to_json,
)
from sae_acceptance.reference.build import build_reference
from sae_acceptance.report import format_report
from sae_acceptance.sources.model import load_model, special_token_ids
from sae_acceptance.sources.tokens import counted_mask, load_tokens
from sae_acceptance.train import builtin_profiles
from sae_acceptance.train.hookpoint import train_at_hook
from sae_acceptance.train.settings import TrainSettings
from sae_acceptance.train.sweep import sweep

EVAL_SET = ("data", "n_sequences", "context_size", "skip", "batch_size", "device", "dtype")
EVAL_RUN = ("sae_dtype", "backend", "bootstrap_resamples", "seed")
TRAIN_OPTIONS = ("expansion_factor", "d_sae", "batch_size", "lr", "optimizer", "warmup_steps", "dead_tokens", "seed")


def add_fields(parser: argparse.ArgumentParser, model: type[BaseModel], names: tuple[str, ...], defaults: bool = True) -> None:
    """One `--flag` per settings field: type, choices, help and default come from the model,
    so the CLI never restates a default. With `defaults=False` an absent flag is None."""
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
        default = field.default if defaults and not field.is_required() else None
        if default is not None:
            options["help"] = f"{field.description} (default: {default})"
        parser.add_argument(f"--{name.replace('_', '-')}", default=default, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-acceptance", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate SAEs (a thresholds file, or SAEs named here)")
    ev.add_argument("--config", type=Path, help="a thresholds.toml: run its gate without pytest")
    ev.add_argument("--model", help="TransformerLens model name or local HF checkpoint directory")
    ev.add_argument("--hook", help="hookpoint, e.g. blocks.3.hook_resid_post (default: the SAE's own)")
    ev.add_argument("--sae", action="append", default=[], metavar="PATH",
                    help="SAE directory, hf://owner/repo/folder or sae-lens://release/sae_id (repeatable)")
    add_fields(ev, EvalSettings, EVAL_SET + EVAL_RUN, defaults=False)  # thresholds.toml's defaults apply
    ev.add_argument("--json", type=Path, metavar="OUT", help="write the JSON report here")
    ev.add_argument("--no-progress", action="store_true")

    pr = sub.add_parser("pr-profile", help="participation ratio per layer, and the canyon rule")
    pr.add_argument("--model", required=True)
    add_fields(pr, EvalSettings, EVAL_SET)
    pr.add_argument("--hook-type", default="resid_post")
    add_fields(pr, CanyonSettings, ("threshold", "use"))
    pr.add_argument("--json", type=Path, metavar="OUT")
    pr.add_argument("--plot", type=Path, metavar="OUT.png")
    pr.add_argument("--no-progress", action="store_true")

    sw = sub.add_parser("sweep", help="train a sweep profile's SAEs, gate them, write the log's tables")
    sw.add_argument("--profile", required=True, help=f"{', '.join(builtin_profiles())}, or a profile .toml")
    sw.add_argument("--out", type=Path, required=True)
    sw.add_argument("--cache", type=Path, default=None, help="trained-SAE cache (default: ~/.cache/sae-acceptance/sweeps)")
    sw.add_argument("--device", default="auto")
    sw.add_argument("--no-progress", action="store_true")

    tr = sub.add_parser("train", help="train TopK SAEs (a k grid from one data pass) at one hookpoint")
    tr.add_argument("--model", required=True)
    tr.add_argument("--hook", required=True)
    tr.add_argument("--data", required=True, help="a .npy token file, a local dataset directory, or a hub dataset")
    tr.add_argument("--k", type=int, action="append", required=True, help="repeatable: one SAE per k")
    tr.add_argument("--train-tokens", type=int, required=True)
    add_fields(tr, EvalSettings, ("context_size",))
    add_fields(tr, TrainSettings, TRAIN_OPTIONS)
    tr.add_argument("--device", default="auto")
    tr.add_argument("--out", type=Path, required=True, help="writes OUT/k{k} in SAELens format")
    tr.add_argument("--no-progress", action="store_true")

    sc = sub.add_parser("schema", help="write the JSON Schema of thresholds.toml")
    sc.add_argument("--out", type=Path, default=Path("thresholds.schema.json"))

    ref = sub.add_parser("build-reference", help="rebuild the embedded reference model, tokens and SAEs")
    ref.add_argument("--out", type=Path, default=Path("reference"))
    ref.add_argument("--reuse-model", action="store_true", help="keep the checkpoint, retrain the SAEs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SAEAcceptanceError as err:
        print(f"sae-acceptance: error: {err}", file=sys.stderr)
        return 2


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
    report = evaluate(loaded, progress=not args.no_progress)
    print(format_report(report))
    if args.json is not None:
        write_atomic(args.json, report.to_json())
        print(f"report written to {args.json}")
    if any(r.error for r in report.saes.values()):
        return 2
    return 0 if report.passed else 1


def _cmd_pr_profile(args: argparse.Namespace) -> int:
    if not args.data:
        raise SAEAcceptanceError("pr-profile needs --data")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    tokens = load_tokens(args.data, args.n_sequences, args.context_size, args.skip, tokenizer=model.tokenizer)
    rule = CanyonRule(args.threshold, args.use)
    profile = pr_profile(
        model,
        tokens,
        counted_mask(tokens, special_token_ids(model)),
        hook_type=args.hook_type,
        batch_size=args.batch_size,
        rule=rule,
        progress=not args.no_progress,
    )
    print(format_profile_table(profile))
    if args.json is not None:
        write_json(args.json, profile_to_json(args.model, profile, rule, args.hook_type))
        print(f"profile written to {args.json}")
    if args.plot is not None:
        plot_pr_profile(profile, args.plot, rule, title=f"{args.model}: {args.hook_type}")
        print(f"plot written to {args.plot}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    return sweep(args.profile, args.out, args.cache, args.device, not args.no_progress)


def _cmd_train(args: argparse.Namespace) -> int:
    model = load_model(args.model, device=args.device)
    n_sequences = args.train_tokens // args.context_size + 1
    tokens = load_tokens(args.data, n_sequences, args.context_size, tokenizer=model.tokenizer)
    settings = {name: getattr(args, name) for name in TRAIN_OPTIONS if getattr(args, name) is not None}
    try:
        cfg = TrainSettings(k=max(args.k), **settings)
    except ValidationError as err:
        raise ConfigError(describe(err, "", "train")) from None
    paths = train_at_hook(model, str(args.model), tokens, args.hook, args.k, cfg,
                          out={k: args.out / f"k{k}" for k in args.k}, train_tokens=args.train_tokens,
                          metadata={"context_size": args.context_size, "dataset_path": args.data},
                          progress=not args.no_progress)
    for k, path in paths.items():
        print(f"k={k}: {path}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    write_json_schema(args.out)
    print(f"schema written to {args.out}")
    return 0


def _cmd_build_reference(args: argparse.Namespace) -> int:
    build_reference(args.out, reuse_model=args.reuse_model)
    return 0


COMMANDS = {
    "eval": _cmd_eval,
    "pr-profile": _cmd_pr_profile,
    "sweep": _cmd_sweep,
    "train": _cmd_train,
    "schema": _cmd_schema,
    "build-reference": _cmd_build_reference,
}


if __name__ == "__main__":
    sys.exit(main())
