"""sae-acceptance eval | pr-profile | train | sweep | schema | build-reference.

The same loaders and engine as the pytest plugin. Bad input ends in one line on
stderr and exit status 2; a failed gate in exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sae_acceptance.errors import SAEAcceptanceError
from sae_acceptance.train import OPTIMISERS, builtin_profiles

EVAL_FLAGS = ("data", "n_sequences", "context_size", "skip", "batch_size", "device", "dtype")


def _eval_args(parser: argparse.ArgumentParser, with_defaults: bool = True) -> None:
    """The eval-set flags; defaults are thresholds.toml's own (`EvalSettings`), or None to tell
    what was given on the command line."""
    from sae_acceptance.config import EvalSettings

    def default(name: str):
        return EvalSettings.model_fields[name].default if with_defaults else None

    parser.add_argument("--data", help="a .npy token file, a local dataset directory, or a hub dataset")
    parser.add_argument("--n-sequences", type=int, default=default("n_sequences"))
    parser.add_argument("--context-size", type=int, default=default("context_size"))
    parser.add_argument("--skip", type=int, default=default("skip"), help="sequences skipped first")
    parser.add_argument("--batch-size", type=int, default=default("batch_size"))
    parser.add_argument("--device", default=default("device"), help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=default("dtype"), choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-acceptance", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="evaluate SAEs (a thresholds file, or SAEs named here)")
    ev.add_argument("--config", type=Path, help="a thresholds.toml: run its gate without pytest")
    ev.add_argument("--model", help="TransformerLens model name or local HF checkpoint directory")
    ev.add_argument("--hook", help="hookpoint, e.g. blocks.3.hook_resid_post (default: the SAE's own)")
    ev.add_argument("--sae", action="append", default=[], metavar="PATH", help="SAE directory, hf://owner/repo/folder or sae-lens://release/sae_id (repeatable)")
    _eval_args(ev, with_defaults=False)  # thresholds.toml's defaults apply; with --config, its values
    ev.add_argument("--bootstrap-resamples", type=int)
    ev.add_argument("--seed", type=int)
    ev.add_argument("--json", type=Path, metavar="OUT", help="write the JSON report here")

    pr = sub.add_parser("pr-profile", help="participation ratio per layer, and the canyon rule")
    pr.add_argument("--model", required=True)
    _eval_args(pr)
    pr.add_argument("--hook-type", default="resid_post")
    pr.add_argument("--threshold", type=float, default=0.02, help="canyon rule: pr_ratio below this")
    pr.add_argument("--use", choices=["raw", "deflated"], default="raw")
    pr.add_argument("--json", type=Path, metavar="OUT")
    pr.add_argument("--plot", type=Path, metavar="OUT.png")

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
    tr.add_argument("--context-size", type=int, default=256)
    tr.add_argument("--expansion-factor", type=int, default=32)
    tr.add_argument("--batch-size", type=int, default=4096)
    tr.add_argument("--optimizer", choices=OPTIMISERS, default="adam",
                    help="adam: Adam with warm-up and decay; signum: sign descent, schedule-free")
    tr.add_argument("--lr", type=float, default=None, help="default: 2e-4 (adam) or 5e-3 (signum) / sqrt(d_sae / 2^14)")
    tr.add_argument("--seed", type=int, default=0)
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
    from sae_acceptance.config import load_thresholds, thresholds_from_mapping
    from sae_acceptance.evaluate import evaluate
    from sae_acceptance.report import format_report, write_atomic

    settings = {name: getattr(args, name) for name in (*EVAL_FLAGS, "bootstrap_resamples", "seed")}
    given = {name: value for name, value in settings.items() if value is not None}
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
    from sae_acceptance.geometry import (
        CanyonRule,
        format_profile_table,
        plot_pr_profile,
        pr_profile,
        profile_to_json,
    )
    from sae_acceptance.report import write_json
    from sae_acceptance.sources.model import load_model, special_token_ids
    from sae_acceptance.sources.tokens import counted_mask, load_tokens

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
    from sae_acceptance.train.sweep import run_sweep_command

    return run_sweep_command(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from sae_acceptance.sources.model import load_model
    from sae_acceptance.sources.tokens import load_tokens
    from sae_acceptance.train.hookpoint import train_at_hook
    from sae_acceptance.train.topk import TrainConfig

    model = load_model(args.model, device=args.device)
    n_sequences = args.train_tokens // args.context_size + 1
    tokens = load_tokens(args.data, n_sequences, args.context_size, tokenizer=model.tokenizer)
    cfg = TrainConfig(k=max(args.k), optimizer=args.optimizer, expansion_factor=args.expansion_factor,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    paths = train_at_hook(model, str(args.model), tokens, args.hook, args.k, cfg,
                          out={k: args.out / f"k{k}" for k in args.k}, train_tokens=args.train_tokens,
                          metadata={"context_size": args.context_size, "dataset_path": args.data},
                          progress=not args.no_progress)
    for k, path in paths.items():
        print(f"k={k}: {path}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from sae_acceptance.config import write_json_schema

    write_json_schema(args.out)
    print(f"schema written to {args.out}")
    return 0


def _cmd_build_reference(args: argparse.Namespace) -> int:
    from sae_acceptance.reference.build import build_reference

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
