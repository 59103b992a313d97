"""Where the k-grid trainer spends its time: torch.profiler, by stage, and the grid's bound.

Runs `train_topk_grid` (bench_train's part B set-up: activations produced by
`ActivationBuffer` from the model while training) with `record_function` ranges
around its stages, patched in from outside (nothing in the package changes),
and prints the operator table, the time per stage, and what they imply for the
grid against separate runs: with ``A`` the cost of producing the activations
and ``S`` one SAE's training on them, 6 separate runs cost ``6 (A + S)`` and the
grid ``A + 6 S``, so the speedup is ``6 (r + 1) / (r + 6)`` with ``r = A / S``.
It also times the encoder product alone (the one dense ``[n, d_in] x [d_in,
d_sae]`` product of a step): the SAE step cannot cost less than that, which
bounds ``r`` and so the speedup for any implementation of the same training.

    python benchmarks/breakdown_train.py
    python benchmarks/breakdown_train.py --optimizer signum --grid-tokens 65536
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402
import common  # noqa: E402

ACTIVATIONS = "activations (model to the hook)"
SAE_STAGES = (
    "SAE forward (encoder product, top-k, decode, loss)",
    "SAE backward",
    "optimiser step",
    "decoder norm upkeep",
)


def instrument(synchronize: bool) -> None:
    """Wrap the trainer's building blocks in profiler ranges; with `synchronize` (a GPU) each
    range waits for its kernels, so that its CPU time is the stage's time, not its launches."""
    from schedulefree import ScheduleFreeWrapper

    from sae_acceptance.train.activations import ActivationBuffer
    from sae_acceptance.train.topk import TopKTrainee

    def wrap(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def wrapped(*a, **kw):
            with record_function(f"stage: {label}"):
                out = fn(*a, **kw)
                if synchronize:
                    torch.cuda.synchronize()
                return out

        setattr(owner, name, wrapped)

    wrap(ActivationBuffer, "_run", ACTIVATIONS)
    wrap(TopKTrainee, "step_loss", SAE_STAGES[0])
    wrap(torch.Tensor, "backward", SAE_STAGES[1])
    wrap(torch.optim.Adam, "step", SAE_STAGES[2])
    wrap(ScheduleFreeWrapper, "step", SAE_STAGES[2])
    wrap(TopKTrainee, "remove_parallel_decoder_grad", SAE_STAGES[3])
    wrap(TopKTrainee, "normalise_decoder", SAE_STAGES[3])


def encoder_product_seconds(args, d_in: int, tokens: int, repeats: int = 5) -> float:
    """Seconds for the encoder products of `tokens` tokens, batch by batch, into one buffer
    as the trainer does (median of `repeats`)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_tokens, d_in, generator=g).to(args.device)
    enc = torch.randn(args.grid_d_sae, d_in, generator=g).to(args.device)
    b_enc = torch.zeros(args.grid_d_sae, device=args.device)
    out = torch.empty(args.batch_tokens, args.grid_d_sae, device=args.device)
    steps = -(-tokens // args.batch_tokens)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            torch.addmm(b_enc, x, enc.t(), out=out)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return common.median(times)


def speedup(r: float, n: int) -> float:
    return n * (r + 1) / (r + n)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(p)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--grid-ks", type=int, nargs="+", default=[8, 16, 24, 32, 48, 64])
    p.add_argument("--grid-tokens", type=int, default=32_768, help="training tokens per SAE")
    p.add_argument("--grid-d-sae", type=int, default=8192)
    p.add_argument("--warmup-steps", type=int, default=16)
    p.add_argument("--optimizer", choices=["adam", "signum"], default="adam")
    p.add_argument("--rows", type=int, default=20)
    args = p.parse_args(argv)
    size = common.model_size(args)
    args.layer = size.n_layers // 2 if args.layer is None else args.layer
    common.set_threads(args)

    from sae_acceptance.train.topk import train_topk_grid

    with tempfile.TemporaryDirectory(prefix="breakdown_train_") as tmp:
        workdir = Path(tmp)
        common.build_checkpoint(workdir / "model", size, args.ctx, args.seed)
        model = common.load_bench_model(workdir / "model", args.device, args.dtype)
    tokens = common.random_tokens(
        bench_train.n_sequences(args.grid_tokens, args.ctx), args.ctx, size.vocab, args.seed + 3
    )
    cfg = bench_train.train_config(args, args.grid_ks[0], args.grid_d_sae, args.optimizer)
    instrument(synchronize=args.device.startswith("cuda"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        train_topk_grid(
            bench_train._buffer(args, model, tokens),
            size.d_model,
            args.grid_ks,
            cfg,
            args.grid_tokens,
            progress=False,
        )
    wall = time.perf_counter() - start
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))

    stage = {e.key[7:]: e.cpu_time_total / 1e6 for e in events if e.key.startswith("stage: ")}
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    n = len(args.grid_ks)
    print(
        f"\nk-grid {args.grid_ks}, d_sae {args.grid_d_sae}, {args.grid_tokens} tokens per SAE, "
        f"hook blocks.{args.layer}.hook_resid_post of d_model {size.d_model} x {size.n_layers} "
        f"layers, optimizer {args.optimizer}; {wall:.1f} s wall under the profiler "
        f"(self CPU time {total:.1f} s)"
    )
    for label in (ACTIVATIONS, *SAE_STAGES):
        seconds = stage.get(label, 0.0)
        print(f"  {label:<52} {seconds:8.2f} s  {100 * seconds / total:5.1f} %")
    activations = stage.get(ACTIVATIONS, 0.0)
    per_sae = sum(stage.get(label, 0.0) for label in SAE_STAGES) / n
    product = encoder_product_seconds(args, size.d_model, args.grid_tokens)
    r = activations / per_sae
    r_floor = activations / product
    print(
        f"\nA (activations, once) = {activations:.2f} s; S (one SAE's training) = {per_sae:.2f} s, "
        f"of which its encoder product alone takes {product:.2f} s (timed bare, outside the profiler)"
    )
    print(f"r = A / S = {r:.2f}: grid over {n} separate runs at most {speedup(r, n):.2f}x")
    need = f"3x needs r >= {2 * n / (n - 3):.1f} for {n} SAEs" if n > 3 else f"3x is out of reach for {n} SAEs"
    print(
        f"even if a step cost only its encoder product: r <= {r_floor:.2f}, "
        f"speedup <= {speedup(r_floor, n):.2f}x ({need})"
    )


if __name__ == "__main__":
    main()
