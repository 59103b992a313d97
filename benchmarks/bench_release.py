"""A release's eval: 6 hooks x 6 TopK SAEs (a k grid per hook) on the benchmark model.

- limit: the forward work any exact patched-loss eval of the release must do, bare: one
  full forward per batch (capturing every hook), then per hook one zero-ablation tail,
  and per SAE one TopK encode/decode and one tail. No metric is computed.
- project: `engine.run_model` over every hook and SAE at once, then every SAE's point metrics.
- saelens: `sae_lens.evals.run_evals` once per SAE (as its users run a release), with the
  same metric groups as bench_eval.py.

Targets: project / limit <= 1.15; SAELens / project >= 5. Method as bench_eval.py: a fresh
interpreter per contender and repeat, round-robin repeats, one untimed warm-up batch.

    python benchmarks/bench_release.py --json benchmarks/results/cpu2-release.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_eval  # noqa: E402
import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
CONTENDERS = ("limit", "project", "saelens")
K_GRID = (8, 16, 24, 32, 48, 64)


def default_hooks(n_layers: int) -> list[str]:
    """A release's usual shape: the residual stream after each block (six blocks, evenly spread)."""
    layers = sorted({round(i * (n_layers - 1) / 5) for i in range(6)}) if n_layers > 6 else range(n_layers)
    return [f"blocks.{layer}.hook_resid_post" for layer in layers]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(p)
    p.add_argument("--hooks", nargs="+", help="default: blocks.L.hook_resid_post of six blocks, evenly spread")
    p.add_argument("--k-grid", type=int, nargs="+", default=list(K_GRID))
    p.add_argument("--n-batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    common.add_backend_arg(p)
    common.add_inline_arg(p)
    p.add_argument("--json", type=Path)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.hooks = args.hooks or default_hooks(common.model_size(args).n_layers)
    if args.backend != "transformer_lens" and "saelens" in args.contenders:
        args.contenders.remove("saelens")
    return args


def sae_dir(workdir: Path, hook: str, k: int) -> Path:
    return workdir / "saes" / hook / f"k{k}"


def prepare(args, workdir: Path) -> None:
    from sae_acceptance.sources.sae_io import save_sae

    common.set_threads(args)
    size = common.model_size(args)
    print(f"building model {size}, {len(args.hooks)} hooks x {len(args.k_grid)} SAEs in {workdir}", flush=True)
    common.build_checkpoint(workdir / "model", size, args.ctx, args.seed)
    tokens = common.random_tokens(args.n_batches * args.batch_size, args.ctx, size.vocab, args.seed + 1)
    torch.save(tokens, workdir / "tokens.pt")
    model = common.load_bench_model(workdir / "model", "cpu", "float32")
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens[: args.batch_size], names_filter=args.hooks)
    keep = common.counted_mask(tokens[: args.batch_size])
    for h, hook in enumerate(args.hooks):
        mean = cache[hook][keep].mean(0)
        for i, k in enumerate(args.k_grid):
            sae = common.random_topk_sae(size.d_model, args.d_sae, k, seed=1000 * h + i, hook=hook, b_dec=mean)
            save_sae(sae, sae_dir(workdir, hook, k), metadata={"context_size": args.ctx})


def _saes(args, workdir: Path):
    from sae_acceptance.sources.sae_io import load_sae

    dtype = getattr(torch, args.dtype)
    return {
        hook: {f"k{k}": load_sae(sae_dir(workdir, hook, k), device=args.device, dtype=dtype) for k in args.k_grid}
        for hook in args.hooks
    }


def worker_limit(args, workdir: Path) -> dict:
    common.set_threads(args)
    backend = common.load_bench_backend(workdir / "model", args.device, args.dtype, args.backend)
    tokens = torch.load(workdir / "tokens.pt")
    saes = _saes(args, workdir)
    weights = {hook: [(s.W_enc, s.b_enc, s.W_dec, s.b_dec, s.k) for s in per.values()] for hook, per in saes.items()}
    bare = common.BareTails(backend)
    entry = {}  # where each hook's tail starts: after its block for resid_post, at it otherwise
    for hook in args.hooks:
        _, layer, kind = hook.split(".", 2)
        entry[hook] = int(layer) + 1 if kind == "hook_resid_post" else int(layer)

    def once(tokens):
        with torch.inference_mode():
            for begin in range(0, tokens.shape[0], args.batch_size):
                tok = tokens[begin : begin + args.batch_size].to(args.device)
                _, at_entry, acts = bare.original(tok, set(entry.values()), args.hooks)
                for hook, ws in weights.items():
                    act, start = acts[hook], entry[hook]
                    resid = hook.endswith("hook_resid_post")

                    def tail(value, hook=hook, start=start, resid=resid, at_entry=at_entry):
                        return bare.tail(value, start) if resid else bare.tail(at_entry[start], start, (hook, value))

                    tail(torch.zeros_like(act))
                    flat = act.reshape(-1, act.shape[-1])
                    for w in ws:
                        tail(common.bare_topk(flat, *w).reshape(act.shape))
        return None

    timing, memory, _ = bench_eval._timed(args, once, tokens)
    return {**timing, "memory": memory}


def worker_project(args, workdir: Path) -> dict:
    from sae_acceptance.engine import run_model
    from sae_acceptance.metrics import alive_fraction

    common.set_threads(args)
    backend = common.load_bench_backend(workdir / "model", args.device, args.dtype, args.backend)
    tokens = torch.load(workdir / "tokens.pt")
    saes = _saes(args, workdir)

    def once(tokens):
        run = run_model(backend, saes, tokens, common.counted_mask(tokens), args.batch_size, progress=False)
        return {
            f"{hook}/{name}": {
                **{k: float(v) for k, v in sums.metrics().items()},
                "alive_frac": alive_fraction(sums.fired),
            }
            for hook, hook_run in run.hooks.items()
            for name, sums in hook_run.sums.items()
        }

    timing, memory, metrics = bench_eval._timed(args, once, tokens)
    return {**timing, "memory": memory, "metrics": metrics}


def worker_saelens(args, workdir: Path) -> dict:
    """run_evals per SAE, as bench_eval.py runs it (one SAE at a time)."""
    out_metrics, seconds, cpu, memories = {}, 0.0, 0.0, []
    for hook in args.hooks:
        for k in args.k_grid:
            sub = argparse.Namespace(
                **{**vars(args), "layer": None, "worker_n_saes": 1, "repeats": 1, "n_saes": [1], "k": k, "k_grid": None}
            )
            sub.workdir = workdir
            r = _saelens_one(sub, sae_dir(workdir, hook, k))
            seconds += r["seconds"]
            cpu += r["cpu_seconds"]
            memories.append(r["memory"])
            out_metrics[f"{hook}/k{k}"] = r["metrics"]
    peak = max(memories, key=common.peak_mb)
    return {"seconds": seconds, "cpu_seconds": cpu, "memory": peak, "metrics": out_metrics}


def _saelens_one(args, directory: Path) -> dict:
    """bench_eval's SAELens worker on one SAE directory (its loader takes `saes/sae0`)."""
    link = Path(tempfile.mkdtemp()) / "saes"
    link.mkdir()
    (link / "sae0").symlink_to(directory, target_is_directory=True)
    (link.parent / "model").symlink_to(args.workdir / "model", target_is_directory=True)
    (link.parent / "tokens.pt").symlink_to(args.workdir / "tokens.pt")
    r = bench_eval.worker_saelens(args, link.parent)
    r["metrics"] = next(iter(r["metrics"].values()))
    return r


WORKERS = {"limit": worker_limit, "project": worker_project, "saelens": worker_saelens}


def run_one(args) -> dict:
    """One contender's run (in a worker process, or inline)."""
    code = common.code_fingerprint()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = WORKERS[args.worker](args, args.workdir)
    result["load"], result["code"] = common.load_average(), code
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        common.emit(run_one(args))
        return
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_release_") as tmp:
        workdir = args.workdir or Path(tmp)
        prepare(args, workdir)
        for rep in range(args.repeats):
            for contender in args.contenders:
                worker_argv = ["--worker", contender, "--workdir", str(workdir), *common.worker_flags(raw_argv)]
                r = common.run_worker(
                    SCRIPT,
                    worker_argv,
                    f"repeat {rep + 1}/{args.repeats}",
                    inline=(lambda a: run_one(parse_args(a))) if args.inline else None,
                )
                print(f"    {contender}: {r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU", flush=True)
                agg = results.setdefault(contender, {"seconds": [], "cpu_seconds": [], "memory": [], "load": []})
                for key in ("seconds", "cpu_seconds", "memory", "load"):
                    agg[key].append(r[key])
                agg.setdefault("metrics", r.get("metrics"))
    n_tokens = args.n_batches * args.batch_size * args.ctx
    summary = {
        name: {
            "median_s": common.median(r["seconds"]),
            "tokens_per_s": n_tokens / common.median(r["seconds"]),
            "peak_mb": max(common.peak_mb(m) for m in r["memory"]),
            "all_s": r["seconds"],
        }
        for name, r in results.items()
    }
    ratios = {}
    if "project" in summary and "limit" in summary:
        ratios["project_over_limit"] = summary["project"]["median_s"] / summary["limit"]["median_s"]
    if "saelens" in summary and "project" in summary:
        ratios["saelens_over_project"] = summary["saelens"]["median_s"] / summary["project"]["median_s"]
    size = common.model_size(args)
    print(
        f"\nrelease: {len(args.hooks)} hooks x {len(args.k_grid)} SAEs (k {args.k_grid}, d_sae {args.d_sae}) on "
        f"d_model={size.d_model} layers={size.n_layers} vocab={size.vocab}, {n_tokens} tokens, {args.device} "
        f"{args.dtype}, backend {args.backend}"
    )
    for name, r in summary.items():
        print(f"  {name:<8} {r['median_s']:>9.2f} s {r['tokens_per_s']:>9.0f} tokens/s {r['peak_mb']:>8.0f} MB")
    for key, value in ratios.items():
        print(f"  {key} = {value:.2f}")
    if args.json:
        payload = {
            "environment": common.environment(args.device),
            "config": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("worker")
            },
            "summary": summary,
            "ratios": ratios,
            "raw": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
