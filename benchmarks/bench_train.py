"""Training throughput and quality: this project's TopK trainer against EleutherAI sparsify.

Part A (cached activations): activations at one hookpoint are produced once from
the model and saved to a tensor; every trainer then reads the same shuffled
batches of that tensor, with the same d_sae, k and batch size:

- ours: `sae_acceptance.train.topk.train_topk` (Adam, warm-up, decay, AuxK).
- ours-signum: the same with `optimizer="signum"` (sign descent under
  schedule-free averaging, sparsify's default optimiser).
- sparsify: sparsify's `SparseCoder` stepped exactly as `sparsify.Trainer.fit`
  steps it on its `fvu` loss (b_dec at the first batch's mean, unit-norm
  decoder, parallel-gradient removal, dead-latent AuxK), with its default
  optimizer (SignSGD under schedule-free, lr 5e-3/sqrt(d_sae/2^14)).
- sparsify-adam: the same with `optimizer="adam"` (torch Adam, lr
  2e-4/sqrt(d_sae/2^14), linear warm-up and decay), the recipe ours follows.

sparsify's `Trainer` itself needs a Hugging Face model and a token dataset, so it
cannot take cached activations; the loop here is its inner step without the
model, distributed and logging code. Reported: training tokens/s (wall and CPU),
and FVU and alive fraction of the result on held-out activations.

Part B (k-grid): `train_topk_grid` with 6 values of k in one pass, activations
produced from the model by `ActivationBuffer` during training, against 6
separate `train_topk` runs that each produce their own activations.

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --part grid --grid-tokens 65536
"""

from __future__ import annotations

import argparse
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
TRAINERS = ("ours", "ours-signum", "sparsify", "sparsify-adam")
GRID = ("grid", "separate")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(p)
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="hook blocks.L.hook_resid_post (default: n_layers // 2)",
    )
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=2048, help="training batch, in tokens")
    p.add_argument("--train-tokens", type=int, default=262_144, help="part A: training tokens per trainer")
    p.add_argument("--val-tokens", type=int, default=32_768, help="held-out activations for FVU / alive")
    p.add_argument("--warmup-steps", type=int, default=16)
    p.add_argument("--grid-ks", type=int, nargs="+", default=[8, 16, 24, 32, 48, 64])
    p.add_argument("--grid-tokens", type=int, default=131_072, help="part B: training tokens per SAE")
    p.add_argument("--grid-d-sae", type=int, default=None, help="part B d_sae (default: --d-sae)")
    p.add_argument("--part", choices=["all", "cached", "grid"], default="all")
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    p.add_argument("--repeats", type=int, default=1, help="timed runs per contender (median reported)")
    p.add_argument("--json", type=Path)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--worker", choices=TRAINERS + GRID, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.layer is None:
        args.layer = common.model_size(args).n_layers // 2
    args.grid_d_sae = args.grid_d_sae or args.d_sae
    return args


def hook_name(args) -> str:
    return f"blocks.{args.layer}.hook_resid_post"


def n_sequences(tokens: int, ctx: int) -> int:
    """Sequences that give at least `tokens` counted positions (position 0 is a bos, not counted)."""
    return -(-tokens // (ctx - 1))


# ----------------------------------------------------------------------------- setup (parent)


def prepare(args, workdir: Path) -> None:
    common.set_threads(args)
    size = common.model_size(args)
    print(f"building model {size}; caching activations at {hook_name(args)} in {workdir}", flush=True)
    common.build_checkpoint(workdir / "model", size, args.ctx, args.seed)
    model = common.load_bench_model(workdir / "model", args.device, args.dtype)
    for split, n_tokens, seed in (
        ("train", args.train_tokens, 1),
        ("val", args.val_tokens, 2),
        ("grid", args.grid_tokens, 3),
    ):
        tokens = common.random_tokens(n_sequences(n_tokens, args.ctx), args.ctx, size.vocab, args.seed + seed)
        torch.save(tokens, workdir / f"tokens_{split}.pt")
        if split == "grid":
            continue
        acts = []
        with torch.inference_mode():
            for begin in range(0, tokens.shape[0], 32):
                tok = tokens[begin : begin + 32]
                act = model(tok.to(args.device), stop_at_layer=args.layer + 1)
                acts.append(act[common.counted_mask(tok).to(act.device)].float().cpu())
        torch.save(torch.cat(acts)[:n_tokens].clone(), workdir / f"acts_{split}.pt")


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def held_out_quality(sae, acts: torch.Tensor, device: str, chunk: int = 4096) -> dict:
    """FVU = Σ‖x − x̂‖² / Σ‖x − mean x‖² over the held-out set, and the share of latents that fired."""
    sae = sae.to(device=device, dtype=torch.float32)
    mean = acts.double().mean(0)
    sse = sst = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.int64, device=device)
    for begin in range(0, acts.shape[0], chunk):
        x = acts[begin : begin + chunk].to(device)
        recon, code = sae.reconstruct(x)
        sse += float((x - recon).double().pow(2).sum())
        sst += float((x.double() - mean.to(device)).pow(2).sum())
        fired += code.fired(sae.d_sae)
    return {"fvu": sse / sst, "alive_frac": float((fired > 0).double().mean())}


def sparsify_to_sae(coder, k: int):
    from sae_acceptance.sources.sae import SAE

    return SAE(
        W_enc=coder.encoder.weight.detach().T.contiguous().float(),
        b_enc=coder.encoder.bias.detach().float(),
        W_dec=coder.W_dec.detach().float(),
        b_dec=coder.b_dec.detach().float(),
        architecture="topk",
        k=k,
    )


# ----------------------------------------------------------------------------- workers (children)


def train_config(args, k: int, d_sae: int, optimizer: str = "adam"):
    from sae_acceptance.train.settings import TrainSettings

    return TrainSettings(
        k=k,
        optimizer=optimizer,
        d_sae=d_sae,
        batch_size=args.batch_tokens,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
    )


def cached_batches(args, acts: torch.Tensor):
    from sae_acceptance.train.activations import activation_batches_from_tensor

    for batch in activation_batches_from_tensor(acts, args.batch_tokens, seed=args.seed):
        yield batch.to(args.device)


def worker_ours(args, workdir: Path, optimizer: str) -> dict:
    from sae_acceptance.train.topk import train_topk

    acts = torch.load(workdir / "acts_train.pt")
    d_in = acts.shape[1]
    cfg = train_config(args, args.k, args.d_sae, optimizer)
    with common.PeakMemory(args.device) as mem, common.Timer(args.device) as t:
        sae = train_topk(cached_batches(args, acts), d_in, cfg, total_tokens=acts.shape[0], progress=False)
    quality = held_out_quality(sae, torch.load(workdir / "acts_val.pt"), args.device)
    quality["final_train_fvu"] = sae.metadata.get("final_train_fvu")
    return {
        "seconds": t.seconds,
        "cpu_seconds": t.cpu_seconds,
        "tokens": acts.shape[0],
        "memory": mem.as_dict(),
        **quality,
    }


def worker_sparsify(args, workdir: Path, optimizer: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sparsify import SparseCoder, SparseCoderConfig

    from sae_acceptance.train.settings import TrainSettings

    acts = torch.load(workdir / "acts_train.pt")
    d_in, total = acts.shape[1], acts.shape[0]
    ours = TrainSettings()  # the AuxK weight and dead-latent window ours uses, for parity
    auxk_alpha, dead_threshold = ours.auxk_alpha, ours.dead_tokens
    n_steps = -(-total // args.batch_tokens)

    with common.PeakMemory(args.device) as mem, common.Timer(args.device) as t:
        torch.manual_seed(args.seed)
        coder = SparseCoder(
            d_in,
            SparseCoderConfig(num_latents=args.d_sae, k=args.k),
            args.device,
            dtype=torch.float32,
        )
        schedulers = []
        if optimizer == "adam":  # sparsify.Trainer's "adam" branch without bitsandbytes
            from transformers import get_linear_schedule_with_warmup

            opt = torch.optim.Adam(coder.parameters(), lr=2e-4 / (coder.num_latents / 2**14) ** 0.5)
            schedulers.append(get_linear_schedule_with_warmup(opt, args.warmup_steps, n_steps))
        else:  # sparsify.Trainer's default "signum" branch
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            opt = ScheduleFreeWrapper(
                SignSGD(coder.parameters(), lr=5e-3 / (coder.num_latents / 2**14) ** 0.5),
                momentum=0.95,
            )
            opt.train()
        since_fired = torch.zeros(coder.num_latents, dtype=torch.long, device=args.device)
        did_fire = torch.zeros(coder.num_latents, dtype=torch.bool, device=args.device)
        for step, x in enumerate(cached_batches(args, acts)):
            if step == 0:
                coder.b_dec.data = x.mean(0).to(coder.dtype)
            coder.set_decoder_norm_to_unit_norm()
            dead_mask = since_fired > dead_threshold if auxk_alpha > 0 else None
            total_variance = (x - x.mean(0)).pow(2).sum()
            out = coder(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
            did_fire[out.latent_indices.flatten()] = True
            float(out.fvu.detach())  # the trainer logs it every step
            loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            loss.backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            for scheduler in schedulers:
                scheduler.step()
            with torch.no_grad():
                since_fired += x.shape[0]
                since_fired[did_fire] = 0
                did_fire.zero_()
        if hasattr(opt, "eval"):  # schedule-free: the averaged weights are the model (as its checkpoints save)
            opt.eval()
        coder.set_decoder_norm_to_unit_norm()
    quality = held_out_quality(sparsify_to_sae(coder, args.k), torch.load(workdir / "acts_val.pt"), args.device)
    return {
        "seconds": t.seconds,
        "cpu_seconds": t.cpu_seconds,
        "tokens": total,
        "memory": mem.as_dict(),
        **quality,
    }


def _buffer(args, model, tokens):
    from sae_acceptance.train.activations import ActivationBuffer

    return ActivationBuffer(
        model,
        tokens,
        hook_name(args),
        batch_size=args.batch_tokens,
        buffer_tokens=16 * args.batch_tokens,
        seed=args.seed,
        counted=common.counted_mask(tokens),
        total_tokens=args.grid_tokens,
    )


def worker_grid(args, workdir: Path, separate: bool) -> dict:
    from sae_acceptance.train.topk import train_topk, train_topk_grid

    common.set_threads(args)
    model = common.load_bench_model(workdir / "model", args.device, args.dtype)
    tokens = torch.load(workdir / "tokens_grid.pt")
    d_in = model.cfg.d_model
    cfg = train_config(args, args.grid_ks[0], args.grid_d_sae)
    with common.PeakMemory(args.device) as mem, common.Timer(args.device) as t:
        if separate:
            saes = {}
            for k in args.grid_ks:
                cfg_k = train_config(args, k, args.grid_d_sae)
                saes[k] = train_topk(_buffer(args, model, tokens), d_in, cfg_k, args.grid_tokens, progress=False)
        else:
            saes = train_topk_grid(
                _buffer(args, model, tokens),
                d_in,
                args.grid_ks,
                cfg,
                args.grid_tokens,
                progress=False,
            )
    val = torch.load(workdir / "acts_val.pt")
    quality = {k: held_out_quality(sae, val, args.device) for k, sae in saes.items()}
    return {
        "seconds": t.seconds,
        "cpu_seconds": t.cpu_seconds,
        "tokens": args.grid_tokens * len(args.grid_ks),
        "memory": mem.as_dict(),
        "per_k": quality,
        "weights": {k: float(s.W_dec.double().sum() + s.W_enc.double().sum()) for k, s in saes.items()},
    }


WORKERS = {
    "ours": lambda a, w: worker_ours(a, w, "adam"),
    "ours-signum": lambda a, w: worker_ours(a, w, "signum"),
    "sparsify": lambda a, w: worker_sparsify(a, w, "signum"),
    "sparsify-adam": lambda a, w: worker_sparsify(a, w, "adam"),
    "grid": lambda a, w: worker_grid(a, w, separate=False),
    "separate": lambda a, w: worker_grid(a, w, separate=True),
}


# ----------------------------------------------------------------------------- parent


def sparsify_available() -> str | None:
    """None when sparsify imports; else why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sparsify  # noqa: F401
    except Exception as err:  # ImportError, or a broken dependency
        return f"{type(err).__name__}: {err}"
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        common.set_threads(args)
        code = common.code_fingerprint()  # before the package is imported: the code this run uses
        result = WORKERS[args.worker](args, args.workdir)
        result["load"] = common.load_average()
        result["code"] = code
        common.emit(result)
        return
    raw_argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    contenders = []
    notes = []
    if args.part in ("all", "cached"):
        missing = sparsify_available()
        for name in args.trainers:
            if name.startswith("sparsify") and missing:
                notes.append(
                    f"{name}: skipped, sparsify cannot be imported ({missing}); "
                    "install it with `pip install --no-deps eai-sparsify` and its small deps"
                )
                continue
            contenders.append(name)
    if args.part in ("all", "grid"):
        contenders += list(GRID)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = args.workdir or Path(tmp)
        prepare(args, workdir)
        for rep in range(args.repeats):
            for name in contenders:
                worker_argv = [
                    "--worker",
                    name,
                    "--workdir",
                    str(workdir),
                    *common.worker_flags(raw_argv),
                ]
                r = common.run_worker(SCRIPT, worker_argv, f"repeat {rep + 1}/{args.repeats}")
                print(f"    {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU", flush=True)
                agg = results.setdefault(name, {"runs": []})
                agg["runs"].append(r)
    summary = summarise(results)
    print_report(args, summary, notes)
    if args.json:
        payload = {
            "environment": common.environment(args.device),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
            "model": common.as_jsonable(common.model_size(args)),
            "summary": summary,
            "notes": notes,
            "raw": results,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")


def summarise(results: dict) -> dict:
    out = {}
    for name, agg in results.items():
        runs = agg["runs"]
        wall = common.median([r["seconds"] for r in runs])
        cpu = common.median([r["cpu_seconds"] for r in runs])
        row = {
            "median_s": wall,
            "median_cpu_s": cpu,
            "tokens": runs[0]["tokens"],
            "tokens_per_s": runs[0]["tokens"] / wall,
            "tokens_per_cpu_s": runs[0]["tokens"] / cpu,
            "peak_mb": max(common.peak_mb(r["memory"]) for r in runs),
            "peak_over_start_mb": max(common.peak_over_start_mb(r["memory"]) for r in runs),
            "load": [r["load"] for r in runs],
        }
        for key in ("fvu", "alive_frac", "per_k", "weights"):
            if key in runs[0]:
                row[key] = runs[0][key]
        out[name] = row
    ratios = {}
    for mine, other in (("ours", "sparsify-adam"), ("ours-signum", "sparsify")):
        if mine in out and other in out:
            ratios[f"{mine}_over_{other}_tokens_per_s"] = out[mine]["tokens_per_s"] / out[other]["tokens_per_s"]
            ratios[f"{mine}_over_{other}_tokens_per_cpu_s"] = (
                out[mine]["tokens_per_cpu_s"] / out[other]["tokens_per_cpu_s"]
            )
    if "grid" in out and "separate" in out:
        ratios["separate_over_grid_s"] = out["separate"]["median_s"] / out["grid"]["median_s"]
        ratios["separate_over_grid_cpu_s"] = out["separate"]["median_cpu_s"] / out["grid"]["median_cpu_s"]
        ratios["grid_equals_separate"] = out["grid"]["weights"] == out["separate"]["weights"]
    return {"contenders": out, "ratios": ratios}


def print_report(args, summary: dict, notes: list[str]) -> None:
    size = common.model_size(args)
    rows = summary["contenders"]
    print(
        f"\nmodel d_model={size.d_model} layers={size.n_layers}, hook {hook_name(args)}, {args.device} "
        f"{args.dtype}, {torch.get_num_threads() if not args.threads else args.threads} thread(s)"
    )
    cached = [n for n in TRAINERS if n in rows]
    if cached:
        print(
            f"A. cached activations: d_sae={args.d_sae} k={args.k}, batch {args.batch_tokens} tokens, "
            f"{rows[cached[0]]['tokens']} training tokens, {args.val_tokens} held-out"
        )
        print(
            f"   {'trainer':<14} {'wall s':>8} {'tok/s':>8} {'CPU s':>8} {'tok/CPU s':>10} {'peak MB':>8} {'+MB':>6} "
            f"{'FVU':>7} {'alive':>6}"
        )
        for n in cached:
            r = rows[n]
            print(
                f"   {n:<14} {r['median_s']:>8.1f} {r['tokens_per_s']:>8.0f} {r['median_cpu_s']:>8.1f} "
                f"{r['tokens_per_cpu_s']:>10.0f} {r['peak_mb']:>8.0f} {r['peak_over_start_mb']:>6.0f} {r['fvu']:>7.4f} {r['alive_frac']:>6.3f}"
            )
    if "grid" in rows:
        print(
            f"B. k-grid {args.grid_ks}: d_sae={args.grid_d_sae}, {args.grid_tokens} tokens per SAE, "
            "activations produced by ActivationBuffer during training"
        )
        for n in GRID:
            r = rows[n]
            fvus = " ".join(f"{q['fvu']:.3f}" for q in r["per_k"].values())
            print(
                f"   {n:<10} {r['median_s']:>8.1f} s wall {r['median_cpu_s']:>8.1f} s CPU "
                f"{r['peak_mb']:>7.0f} MB (+{r['peak_over_start_mb']:.0f})   FVU per k: {fvus}"
            )
    for key, val in summary["ratios"].items():
        print(f"   {key} = {val:.2f}" if isinstance(val, float) else f"   {key} = {val}")
    for note in notes:
        print(f"NOTE {note}")
    loads = [x for r in rows.values() for x in r["load"] if x is not None]
    if loads:
        print(
            f"1-min load average at the end of each run: {min(loads):.1f} .. {max(loads):.1f} on {os.cpu_count()} cores"
        )


if __name__ == "__main__":
    main()
