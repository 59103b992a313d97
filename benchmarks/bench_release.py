"""A release's eval: 6 hooks x 6 TopK SAEs (a k grid per hook) on the benchmark model.

- limit: the forward work any exact patched-loss eval of the release must do, bare: one
  full forward per batch (capturing every hook), then per hook one zero-ablation tail,
  and per SAE one TopK encode/decode and one tail. No metric is computed.
- project: `engine.run_model` over every hook and SAE at once, then every SAE's point metrics.
- saelens: `sae_lens.evals.run_evals` once per SAE (as its users run a release), with the
  same metric groups as bench_eval.py.
- project-diag (with `--diagnostics on` or a list of parts): `run_model` with `[eval] diagnostics`
  set so; `project` then runs with them off.
- limit-diag (likewise): the bare work the diagnostic passes add, timed alone (the original
  forward each batch runs untimed): one tail per SAE (the random-direction pass) and one tail
  forward and backward per hook (the loss gradient at the hook), as the parts ask.

Targets: project / limit <= 1.15; SAELens / project >= 5; with diagnostics,
(project-diag - project) / limit-diag <= 1.15. Method as bench_eval.py: a fresh
interpreter per contender and repeat, round-robin repeats, one untimed warm-up batch.

    python benchmarks/bench_release.py --json benchmarks/results/cpu2-release.json
    python benchmarks/bench_release.py --contenders project --diagnostics on --repeats 3 --json diag.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from sae_acceptance.config import DIAGNOSTIC_PARTS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_eval  # noqa: E402
import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
CONTENDERS = ("limit", "project", "saelens")
DIAGNOSTIC_CONTENDERS = ("project-diag", "limit-diag")
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
    p.add_argument(
        "--diagnostics",
        type=diagnostics_value,
        default=False,
        metavar="off|on|PART[,PART...]",
        help=f"also time run_model with [eval] diagnostics so set, and the bare work its extra passes add "
        f"(parts: {', '.join(DIAGNOSTIC_PARTS)}); default off",
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--worker", choices=CONTENDERS + DIAGNOSTIC_CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.hooks = args.hooks or default_hooks(common.model_size(args).n_layers)
    if args.diagnostics:
        args.contenders += [c for c in DIAGNOSTIC_CONTENDERS if c not in args.contenders]
    if args.backend != "transformer_lens" and "saelens" in args.contenders:
        args.contenders.remove("saelens")
    return args


def diagnostics_value(text: str) -> bool | list[str]:
    """`--diagnostics` as `[eval] diagnostics` takes it: off (False), on (True), or a list of parts."""
    if text in ("off", "on"):
        return text == "on"
    parts = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(DIAGNOSTIC_PARTS))
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"expected off, on or parts among {', '.join(DIAGNOSTIC_PARTS)}, got {text!r}")
    return parts


def engine_diagnostics(args):
    """The engine's switches for `--diagnostics`, through the same code as `[eval] diagnostics`."""
    from sae_acceptance.config import EvalSettings
    from sae_acceptance.evaluate import diagnostics_of

    return diagnostics_of(EvalSettings(data="bench", diagnostics=args.diagnostics, seed=args.seed))


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


class _BareRelease:
    """The release's bare passes (common.BareTails): one original forward per batch capturing every
    hook, then tails from each hook, and the timed pieces summed where only some of the work counts."""

    def __init__(self, args, workdir: Path) -> None:
        common.set_threads(args)
        self.args = args
        self.bare = common.BareTails(
            common.load_bench_backend(workdir / "model", args.device, args.dtype, args.backend)
        )
        self.tokens = torch.load(workdir / "tokens.pt")
        self.weights = {
            hook: [(s.W_enc, s.b_enc, s.W_dec, s.b_dec, s.k) for s in per.values()]
            for hook, per in _saes(args, workdir).items()
        }
        self.entry = {}  # where each hook's tail starts: after its block for resid_post, at it otherwise
        for hook in args.hooks:
            _, layer, kind = hook.split(".", 2)
            self.entry[hook] = int(layer) + 1 if kind == "hook_resid_post" else int(layer)

    def batches(self, tokens: torch.Tensor):
        """Per batch: its tokens, the residuals entering each tail's first block, every hook's activation."""
        for begin in range(0, tokens.shape[0], self.args.batch_size):
            tok = tokens[begin : begin + self.args.batch_size].to(self.args.device)
            _, at_entry, acts = self.bare.original(tok, set(self.entry.values()), self.args.hooks)
            yield tok, at_entry, acts

    def tail(self, hook: str, value: torch.Tensor, at_entry: dict[int, torch.Tensor]) -> torch.Tensor:
        """Logits of the tail from `hook` with its activation set to `value`."""
        start = self.entry[hook]
        if hook.endswith("hook_resid_post"):
            return self.bare.tail(value, start)
        return self.bare.tail(at_entry[start], start, (hook, value))

    def timed(self, fn) -> dict:
        """bench_eval's warm-up, timer and peak memory around `fn(tokens)`."""
        timing, memory, out = bench_eval._timed(self.args, fn, self.tokens)
        return {**timing, "memory": memory, "out": out}


def worker_limit(args, workdir: Path) -> dict:
    bare = _BareRelease(args, workdir)

    def once(tokens):
        with torch.inference_mode():
            for _, at_entry, acts in bare.batches(tokens):
                for hook, ws in bare.weights.items():
                    act = acts[hook]
                    bare.tail(hook, torch.zeros_like(act), at_entry)
                    flat = act.reshape(-1, act.shape[-1])
                    for w in ws:
                        bare.tail(hook, common.bare_topk(flat, *w).reshape(act.shape), at_entry)

    r = bare.timed(once)
    return {"seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "memory": r["memory"]}


def worker_limit_diag(args, workdir: Path) -> dict:
    """The bare work the diagnostic passes add: per SAE one tail (random part), per hook one tail
    forward and backward to the hook's activation (gradient part). Only those are timed."""
    bare = _BareRelease(args, workdir)
    diagnostics = engine_diagnostics(args)
    for p in bare.bare.model.parameters():  # the activation's gradient only, as the engine takes it
        p.requires_grad_(False)

    def once(tokens):
        seconds = cpu = 0.0
        with torch.no_grad():
            for tok, at_entry, acts in bare.batches(tokens):
                targets = tok[:, 1:].reshape(-1)
                with common.Timer(args.device) as t:
                    for hook, ws in bare.weights.items():
                        act = acts[hook]
                        if diagnostics.gradient:
                            leaf = act.detach().clone().requires_grad_(True)
                            with torch.enable_grad():
                                logits = bare.tail(hook, leaf, at_entry)[:, :-1]
                                loss = torch.nn.functional.cross_entropy(
                                    logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum"
                                )
                                torch.autograd.grad(loss, leaf)
                        if diagnostics.random:
                            for _ in ws:
                                bare.tail(hook, act, at_entry)
                seconds, cpu = seconds + t.seconds, cpu + t.cpu_seconds
        return {"seconds": seconds, "cpu_seconds": cpu}

    r = bare.timed(once)
    return {**r["out"], "memory": r["memory"], "whole_run_s": r["seconds"]}


def worker_project(args, workdir: Path, diagnostics=None) -> dict:
    from sae_acceptance.engine import run_model
    from sae_acceptance.metrics import alive_fraction

    common.set_threads(args)
    backend = common.load_bench_backend(workdir / "model", args.device, args.dtype, args.backend)
    tokens = torch.load(workdir / "tokens.pt")
    saes = _saes(args, workdir)

    def once(tokens):
        run = run_model(
            backend,
            saes,
            tokens,
            common.counted_mask(tokens),
            args.batch_size,
            progress=False,
            diagnostics=diagnostics,
        )
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


def worker_project_diag(args, workdir: Path) -> dict:
    """run_model with `--diagnostics` as `[eval] diagnostics`."""
    return worker_project(args, workdir, engine_diagnostics(args))


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


WORKERS = {
    "limit": worker_limit,
    "project": worker_project,
    "saelens": worker_saelens,
    "project-diag": worker_project_diag,
    "limit-diag": worker_limit_diag,
}


def run_one(args) -> dict:
    """One contender's run (in a worker process, or inline)."""
    code = common.code_fingerprint()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = WORKERS[args.worker](args, args.workdir)
    result["load"], result["code"] = common.load_average(), code
    return result


def diagnostics_ratios(results: dict[str, dict]) -> dict[str, float | list[float]]:
    """What the diagnostics cost against the bare work their passes add: (on - off) / limit-diag,
    of the medians in wall and CPU time, and of each round-robin repeat to show the spread."""
    on, off, limit = results["project-diag"], results["project"], results["limit-diag"]
    out: dict[str, float | list[float]] = {}
    for key, suffix in (("seconds", ""), ("cpu_seconds", "_cpu")):
        extra = common.median(on[key]) - common.median(off[key])
        out[f"diagnostics_extra_s{suffix}"] = extra
        out[f"diagnostics_over_limit{suffix}"] = extra / common.median(limit[key])
        out[f"diagnostics_on_over_off{suffix}"] = common.median(on[key]) / common.median(off[key])
    for key, suffix in (("seconds", ""), ("cpu_seconds", "_cpu")):
        out[f"diagnostics_over_limit{suffix}_each"] = [
            (a - b) / c for a, b, c in zip(on[key], off[key], limit[key], strict=True)
        ]
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        common.emit(run_one(args))
        return
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    results: dict[str, dict] = {}
    uptime = {"start": common.uptime()}
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
    uptime["end"] = common.uptime()
    n_tokens = args.n_batches * args.batch_size * args.ctx
    summary = {
        name: {
            "median_s": common.median(r["seconds"]),
            "median_cpu_s": common.median(r["cpu_seconds"]),
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
    if args.diagnostics and "project" in results:
        ratios |= diagnostics_ratios(results)
    size = common.model_size(args)
    print(
        f"\nrelease: {len(args.hooks)} hooks x {len(args.k_grid)} SAEs (k {args.k_grid}, d_sae {args.d_sae}) on "
        f"d_model={size.d_model} layers={size.n_layers} vocab={size.vocab}, {n_tokens} tokens, {args.device} "
        f"{args.dtype}, backend {args.backend}"
    )
    for name, r in summary.items():
        print(
            f"  {name:<12} {r['median_s']:>9.2f} s ({r['median_cpu_s']:.2f} s CPU) {r['tokens_per_s']:>9.0f} tokens/s "
            f"{r['peak_mb']:>8.0f} MB"
        )
    for key, value in ratios.items():
        print(f"  {key} = {' '.join(f'{v:.2f}' for v in value) if isinstance(value, list) else f'{value:.2f}'}")
    print(f"  uptime: {uptime['end']}")
    if args.json:
        payload = {
            "environment": common.environment(args.device),
            "config": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("worker")
            },
            "summary": summary,
            "ratios": ratios,
            "uptime": uptime,
            "raw": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
