"""Where `run_model` spends its time beyond the bare limit: torch.profiler, by stage.

Runs the engine on a few batches of the bench_eval setup with `record_function`
ranges around its stages (patched in from outside: nothing in the package is
changed) and prints the profiler's operator table and the time per stage.

    python benchmarks/breakdown_eval.py --n-saes 6 --n-batches 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_eval  # noqa: E402
import bench_release  # noqa: E402
import common  # noqa: E402


def instrument() -> None:
    """Wrap the engine's building blocks in profiler ranges."""
    import sae_acceptance.engine as engine
    from sae_acceptance.covariance import CovarianceAccumulator
    from sae_acceptance.diagnostics import WorstContexts
    from sae_acceptance.sources.backends import Backend
    from sae_acceptance.sources.sae import SAE, SparseCode

    def wrap(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def wrapped(*a, **kw):
            with record_function(label):
                return fn(*a, **kw)

        setattr(owner, name, wrapped)

    wrap(Backend, "forward", "stage: original forward (every layer, hooks captured)")
    wrap(Backend, "patched", "stage: patched pass (tail from the hook, or full)")
    wrap(engine._LossTerms, "__call__", "stage: CE/KL terms from logits")
    wrap(SAE, "encode", "stage: SAE encode")
    wrap(SAE, "decode", "stage: SAE decode")
    wrap(CovarianceAccumulator, "update", "stage: covariance update (float64)")
    wrap(engine, "_per_sequence", "stage: per-sequence float64 sums")
    wrap(engine._Evaluation, "_gradient", "stage: diagnostics: gradient (tail forward + backward)")
    wrap(engine, "random_unit", "stage: diagnostics: random directions")
    wrap(WorstContexts, "update", "stage: diagnostics: worst contexts")
    wrap(engine, "_saebench_sums", "stage: diagnostics: SAEBench sums")
    wrap(SparseCode, "fired_sequences", "stage: diagnostics: sequences each latent fired in")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(p)
    p.add_argument("--n-batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--n-saes", type=int, default=6)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument(
        "--diagnostics",
        type=bench_release.diagnostics_value,
        default=False,
        metavar="off|on|PART[,PART...]",
        help="[eval] diagnostics for run_model (default off)",
    )
    common.add_backend_arg(p)
    args = p.parse_args(argv)
    size = common.model_size(args)
    args.layer = size.n_layers // 2 if args.layer is None else args.layer
    args.n_saes, args.k_grid = [args.n_saes], None
    common.set_threads(args)

    from sae_acceptance.engine import run_model
    from sae_acceptance.sources.sae_io import load_sae

    with tempfile.TemporaryDirectory(prefix="breakdown_eval_") as tmp:
        workdir = Path(tmp)
        bench_eval.prepare(args, workdir)
        model = common.load_bench_backend(workdir / "model", args.device, args.dtype, args.backend)
        tokens = torch.load(workdir / "tokens.pt")
        saes = {
            f"sae{i}": load_sae(workdir / "saes" / f"sae{i}", device=args.device, dtype=getattr(torch, args.dtype))
            for i in range(args.n_saes[0])
        }
    counted = common.counted_mask(tokens)
    hook = bench_eval.hook_name(args)
    diagnostics = bench_release.engine_diagnostics(args)
    run_model(
        model,
        {hook: saes},
        tokens[: args.batch_size],
        counted[: args.batch_size],
        args.batch_size,
        False,
        None,
        diagnostics,
    )
    instrument()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        run_model(model, {hook: saes}, tokens, counted, args.batch_size, False, None, diagnostics)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"\nstages (CPU time including children; total self CPU time {total:.2f} s):")
    for e in sorted((e for e in events if e.key.startswith("stage: ")), key=lambda e: -e.cpu_time_total):
        print(
            f"  {e.key[7:]:<40} {e.cpu_time_total / 1e6:8.3f} s  {100 * e.cpu_time_total / 1e6 / total:5.1f} %"
            f"  ({e.count} calls)"
        )


if __name__ == "__main__":
    main()
