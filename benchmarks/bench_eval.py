"""Eval throughput: this project's `run_hook` against SAELens `run_evals` and the bare limit.

For 1 and for 6 TopK SAEs at one hookpoint of the same model, on the same tokens:

- limit: the forward work any exact patched-loss eval must do, measured bare: one
  pass up to the hook (`model(tokens, stop_at_layer=L+1)`), one tail pass
  (`model(x, start_at_layer=L+1)`) per variant (original, zero-ablated, each SAE),
  one encode/decode per SAE. No metric is computed.
- project: `sae_acceptance.engine.run_hook` over all SAEs at once, then the point
  metrics of every SAE (`SequenceSums.metrics()`, no bootstrap).
- saelens: `sae_lens.evals.run_evals` once per SAE with CE, KL (with and without
  the SAE, and zero-ablated), l2 norms, variance metrics, sparsity and feature
  density, over the same batches (`n_eval_reconstruction_batches` and
  `n_eval_sparsity_variance_batches` both cover the whole token set).

Each contender runs in a fresh interpreter (so peak memory is its own), with one
untimed warm-up on one batch and then one timed run over all tokens. The
repeats go round-robin (limit, project, saelens, limit, ...) so that a load
change on a shared machine hits every contender alike; the tables show the
medians of `--repeats` runs and the largest peak memory.

    python benchmarks/bench_eval.py                       # default size, ~13 minutes on 2 shared CPU cores
    python benchmarks/bench_eval.py --preset pythia-70m --device cuda --json out.json
    /path/to/tl4-venv/bin/python benchmarks/bench_eval.py --backend tl4   # TransformerLens 4's bridge (no SAELens there)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
CONTENDERS = ("limit", "project", "saelens")
# metric (project name, SAELens name): checked to agree between the two
CROSS_CHECK = [
    ("ce_orig", "ce_loss_without_sae"),
    ("ce_recon", "ce_loss_with_sae"),
    ("ce_ablate", "ce_loss_with_ablation"),  # differ by design, see ABLATION_NOTE
    ("kl_div", "kl_div_with_sae"),
    ("kl_ablate", "kl_div_with_ablation"),
    ("cosine", "cossim"),
    ("l2_ratio", "l2_ratio"),
    ("mse_sum", "mse"),
    ("r2", "explained_variance"),
    ("l0", "l0"),
    ("alive_frac", "alive_frac"),
]


ABLATION_NOTE = (
    "ce_ablate/kl_ablate differ by design: SAELens zero-ablates every position, "
    "this project keeps excluded (special-token) positions at their original activation"
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(p)
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="hook blocks.L.hook_resid_post (default: n_layers // 2)",
    )
    p.add_argument("--n-batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--k-grid", type=int, nargs="+", help="SAE i gets k = K_GRID[i] (a k grid) instead of --k")
    p.add_argument("--n-saes", type=int, nargs="+", default=[1, 6])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="1: warm up on one batch first; 0: no warm-up")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    common.add_backend_arg(p)
    common.add_inline_arg(p)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--workdir", type=Path, help="keep the model/SAEs/tokens here (default: a temp dir)")
    # internal: one contender in a fresh process
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--worker-n-saes", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = common.model_size(args)
    if args.layer is None:
        args.layer = size.n_layers // 2
    if args.backend != "transformer_lens" and "saelens" in args.contenders:
        args.contenders.remove("saelens")  # SAELens runs TransformerLens 3 models only
    return args


def hook_name(args) -> str:
    return f"blocks.{args.layer}.hook_resid_post"


def sae_k(args, i: int) -> int:
    return args.k_grid[i % len(args.k_grid)] if args.k_grid else args.k


# ----------------------------------------------------------------------------- setup (parent)


def prepare(args, workdir: Path) -> None:
    common.set_threads(args)
    size = common.model_size(args)
    print(
        f"building model {size} and {max(args.n_saes)} SAEs (d_sae={args.d_sae}, k={args.k}) in {workdir}",
        flush=True,
    )
    common.build_checkpoint(workdir / "model", size, args.ctx, args.seed)
    tokens = common.random_tokens(args.n_batches * args.batch_size, args.ctx, size.vocab, args.seed + 1)
    torch.save(tokens, workdir / "tokens.pt")
    # b_dec at the mean activation of one batch: the random SAEs then reconstruct around the data
    model = common.load_bench_model(workdir / "model", "cpu", "float32")
    with torch.inference_mode():
        act = model(tokens[: args.batch_size], stop_at_layer=args.layer + 1)
    mean = act[common.counted_mask(tokens[: args.batch_size])].mean(0)
    del model, act
    from sae_acceptance.sources.sae_io import save_sae

    for i in range(max(args.n_saes)):
        sae = common.random_topk_sae(
            size.d_model, args.d_sae, sae_k(args, i), seed=100 + i, hook=hook_name(args), b_dec=mean
        )
        save_sae(sae, workdir / "saes" / f"sae{i}", metadata={"context_size": args.ctx})


# ----------------------------------------------------------------------------- workers (children)


def _load(args, workdir: Path, backend: bool = False):
    """The model (TransformerLens, for SAELens) or the project's backend, tokens, SAE directories."""
    common.set_threads(args)
    if backend:
        model = common.load_bench_backend(workdir / "model", args.device, args.dtype, args.backend)
    else:
        model = common.load_bench_model(workdir / "model", args.device, args.dtype)
    tokens = torch.load(workdir / "tokens.pt")
    sae_dirs = [workdir / "saes" / f"sae{i}" for i in range(args.worker_n_saes)]
    return model, tokens, sae_dirs


def _timed(args, fn, tokens):
    """Warm up on the first batch, then time one run over all tokens (its peak memory too)."""
    if args.warmup:
        fn(tokens[: args.batch_size])
    with common.PeakMemory(args.device) as mem, common.Timer(args.device) as t:
        out = fn(tokens)
    return {"seconds": t.seconds, "cpu_seconds": t.cpu_seconds}, mem.as_dict(), out


def worker_limit(args, workdir: Path) -> dict:
    from sae_acceptance.sources.sae_io import load_sae

    backend, tokens, sae_dirs = _load(args, workdir, backend=True)
    dtype = getattr(torch, args.dtype)
    saes = [load_sae(d, device=args.device, dtype=dtype) for d in sae_dirs]
    weights = [(s.W_enc, s.b_enc, s.W_dec, s.b_dec, s.k) for s in saes]
    bare = common.BareTails(backend)
    entry = args.layer + 1  # blocks.L.hook_resid_post is what block L + 1 receives

    def once(tokens):
        with torch.inference_mode():
            for begin in range(0, tokens.shape[0], args.batch_size):
                tok = tokens[begin : begin + args.batch_size].to(args.device)
                act = bare.original(tok, {entry}, [])[1][entry]
                bare.tail(torch.zeros_like(act), entry)
                flat = act.reshape(-1, act.shape[-1])
                for w in weights:
                    bare.tail(common.bare_topk(flat, *w).reshape(act.shape), entry)
        return None

    timing, memory, _ = _timed(args, once, tokens)
    return {**timing, "memory": memory}


def worker_project(args, workdir: Path) -> dict:
    from sae_acceptance.engine import run_hook
    from sae_acceptance.metrics import alive_fraction
    from sae_acceptance.sources.sae_io import load_sae

    model, tokens, sae_dirs = _load(args, workdir, backend=True)
    dtype = getattr(torch, args.dtype)
    saes = {d.name: load_sae(d, device=args.device, dtype=dtype) for d in sae_dirs}

    def once(tokens):
        counted = common.counted_mask(tokens)
        run = run_hook(
            model,
            hook_name(args),
            saes,
            tokens,
            counted,
            batch_size=args.batch_size,
            progress=False,
        )
        out = {}
        for name, sums in run.sums.items():
            m = {k: float(v) for k, v in sums.metrics().items()}
            m["kl_ablate"] = float(sums.scalars["kl_ablate"].sum() / sums.scalars["n_tokens"].sum())
            m["alive_frac"] = alive_fraction(sums.fired)
            out[name] = m
        return out

    timing, memory, metrics = _timed(args, once, tokens)
    return {**timing, "memory": memory, "metrics": metrics}


def worker_saelens(args, workdir: Path) -> dict:
    from datasets import Dataset
    from sae_lens import SAE as LensSAE
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    model, tokens, sae_dirs = _load(args, workdir)
    saes = {d.name: LensSAE.load_from_disk(d, device=args.device, dtype=args.dtype) for d in sae_dirs}
    base_cfg = EvalConfig(  # built once: its defaults shell out to git
        batch_size_prompts=args.batch_size,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
    )

    def once(tokens):
        n_batches = tokens.shape[0] // args.batch_size
        dataset = Dataset.from_dict({"input_ids": tokens.tolist()})
        cfg = dataclasses.replace(
            base_cfg,
            n_eval_reconstruction_batches=n_batches,
            n_eval_sparsity_variance_batches=n_batches,
        )
        out = {}
        for name, sae in saes.items():
            store = ActivationsStore.from_sae(
                model,
                sae,
                dataset=dataset,
                context_size=args.ctx,
                streaming=False,
                store_batch_size_prompts=args.batch_size,
                device=args.device,
            )
            metrics, features = run_evals(
                sae,
                store,
                model,
                ActivationScaler(),
                cfg,
                exclude_special_tokens=list(common.SPECIAL_IDS),
            )
            flat = {k: v for group in metrics.values() for k, v in group.items() if isinstance(v, (int, float))}
            flat["alive_frac"] = float((torch.tensor(features["feature_density"]) > 0).float().mean())
            out[name] = flat
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timing, memory, metrics = _timed(args, once, tokens)
    return {**timing, "memory": memory, "metrics": metrics}


WORKERS = {"limit": worker_limit, "project": worker_project, "saelens": worker_saelens}


# ----------------------------------------------------------------------------- report (parent)


def summarise(args, results: dict) -> dict:
    n_tokens = args.n_batches * args.batch_size * args.ctx
    summary = {}
    for n, per in results.items():
        row = {}
        for name, r in per.items():
            med = common.median(r["seconds"])
            row[name] = {
                "median_s": med,
                "tokens_per_s": n_tokens / med,
                "all_s": r["seconds"],
                "median_cpu_s": common.median(r["cpu_seconds"]),
                "all_cpu_s": r["cpu_seconds"],
                "peak_mb": max(common.peak_mb(m) for m in r["memory"]),
                "peak_over_start_mb": max(common.peak_over_start_mb(m) for m in r["memory"]),
            }
        ratios = {}
        for key, a, b in (
            ("project_over_limit", "project", "limit"),
            ("saelens_over_project", "saelens", "project"),
        ):
            if a in row and b in row:
                ratios[key] = row[a]["median_s"] / row[b]["median_s"]
                ratios[key + "_cpu"] = row[a]["median_cpu_s"] / row[b]["median_cpu_s"]
        summary[n] = {"contenders": row, "ratios": ratios}
    return summary


def cross_check(results: dict) -> dict:
    """|project − SAELens| per metric, for every SAE evaluated by both."""
    diffs = {}
    for per in results.values():
        if "project" not in per or "saelens" not in per:
            continue
        for sae, ours in per["project"]["metrics"].items():
            theirs = per["saelens"]["metrics"][sae]
            for a, b in CROSS_CHECK:
                if a in ours and b in theirs:
                    diffs.setdefault(a, []).append((ours[a], theirs[b]))
    return {
        k: {"project": v[0][0], "saelens": v[0][1], "max_abs_diff": max(abs(x - y) for x, y in v)}
        for k, v in diffs.items()
    }


def print_report(args, summary: dict, checks: dict, results: dict) -> None:
    size = common.model_size(args)
    n_tokens = args.n_batches * args.batch_size * args.ctx
    print(
        f"\nmodel d_model={size.d_model} layers={size.n_layers} vocab={size.vocab}, hook {hook_name(args)}, "
        f"{args.n_batches}x{args.batch_size} seqs x {args.ctx} = {n_tokens} tokens, "
        f"TopK d_sae={args.d_sae} k={args.k}, {args.device} {args.dtype}, median of {args.repeats}"
    )
    print(
        f"{'SAEs':>4}  {'contender':<9} {'wall s':>8} {'tokens/s':>10} {'CPU s':>8} {'peak MB':>9} {'+MB':>6}   (every run: wall s)"
    )
    for n, s in summary.items():
        for name, r in s["contenders"].items():
            runs = " ".join(f"{x:.2f}" for x in r["all_s"])
            print(
                f"{n:>4}  {name:<9} {r['median_s']:>8.2f} {r['tokens_per_s']:>10.0f} {r['median_cpu_s']:>8.2f}"
                f" {r['peak_mb']:>9.0f} {r['peak_over_start_mb']:>6.0f}   ({runs})"
            )
        for key in ("project_over_limit", "saelens_over_project"):
            if key in s["ratios"]:
                print(f"{'':>4}  {key} = {s['ratios'][key]:.2f} wall, {s['ratios'][key + '_cpu']:.2f} CPU")
    print("peak MB: the timed run's peak RSS (CUDA: max allocated); +MB: its rise over the run's start")
    if checks:
        print("\ncross-check (first SAE; max |diff| over all SAEs):")
        for k, v in checks.items():
            print(
                f"  {k:<10} project={v['project']:.6g}  saelens={v['saelens']:.6g}  max|diff|={v['max_abs_diff']:.2e}"
            )
        print(f"  ({ABLATION_NOTE})")
    loads = [x for per in results.values() for r in per.values() for x in r["load"] if x is not None]
    if loads:
        print(
            f"\n1-min load average at the end of each run: {min(loads):.1f} .. {max(loads):.1f} "
            f"on {os.cpu_count()} cores"
        )


def run_one(args) -> dict:
    """One contender's run (in a worker process, or inline)."""
    code = common.code_fingerprint()  # before the package is imported: the code this run uses
    result = WORKERS[args.worker](args, args.workdir)
    result["load"] = common.load_average()
    result["code"] = code
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    workdir_arg = args.workdir
    if args.worker:
        common.emit(run_one(args))
        return
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        workdir = workdir_arg or Path(tmp)
        prepare(args, workdir)
        results: dict[int, dict] = {n: {} for n in args.n_saes}
        for rep in range(args.repeats):
            for n in args.n_saes:
                for contender in args.contenders:
                    worker_argv = [
                        "--worker",
                        contender,
                        "--worker-n-saes",
                        str(n),
                        "--workdir",
                        str(workdir),
                        *common.worker_flags(raw_argv),
                    ]
                    r = common.run_worker(
                        SCRIPT,
                        worker_argv,
                        f"repeat {rep + 1}/{args.repeats}, {n} SAE(s)",
                        inline=(lambda a: run_one(parse_args(a))) if args.inline else None,
                    )
                    print(f"    {r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU", flush=True)
                    agg = results[n].setdefault(contender, {"seconds": [], "cpu_seconds": [], "memory": [], "load": []})
                    agg["seconds"].append(r["seconds"])
                    agg["cpu_seconds"].append(r["cpu_seconds"])
                    agg["memory"].append(r["memory"])
                    agg["load"].append(r["load"])
                    agg.setdefault("metrics", r.get("metrics"))
                    agg.setdefault("code", []).append(r["code"])
    codes = {json.dumps(c, sort_keys=True) for per in results.values() for r in per.values() for c in r["code"]}
    if len(codes) > 1:
        print("WARNING: the package changed during the benchmark; the runs measured different code")
    summary = summarise(args, results)
    checks = cross_check(results)
    print_report(args, summary, checks, results)
    if args.json:
        payload = {
            "environment": common.environment(args.device),
            "config": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("worker")
            },
            "model": common.as_jsonable(common.model_size(args)),
            "summary": summary,
            "cross_check": checks,
            "cross_check_note": ABLATION_NOTE,
            "raw": results,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
