"""Time the bootstrap: every interval of one SAE from its per-sequence sums.

The log's eval is 200 sequences with 5,000 resamples. All metrics come from one
[resamples, n_seq] matrix of draw counts and one matrix product per sum
(`stats.bootstrap_intervals`), so the cost is that product (the activation
shift sums are [n_seq, d_in]) plus the quantiles. The sums here are random:
timing does not depend on their values.

    python benchmarks/bench_bootstrap.py
    python benchmarks/bench_bootstrap.py --n-sequences 1000 --d-in 2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import environment, median

from sae_acceptance.metrics import SUM_NAMES
from sae_acceptance.stats import (
    BootstrapSettings,
    SequenceSums,
    bootstrap_intervals,
    paired_changes,
)


def random_sums(n_seq: int, d_in: int, seed: int) -> SequenceSums:
    rng = np.random.default_rng(seed)
    scalars = {name: rng.uniform(1.0, 100.0, n_seq) for name in SUM_NAMES}
    return SequenceSums(scalars, rng.integers(0, 5, 32 * d_in), d_in, rng.normal(size=(n_seq, d_in)))


def time_call(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-sequences", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=5000)
    parser.add_argument("--d-in", type=int, action="append", help="repeatable (default: 512 and 1024)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings = BootstrapSettings(args.resamples, 0.95, 0)
    rows = []
    for d_in in args.d_in or [512, 1024]:
        sums, baseline = random_sums(args.n_sequences, d_in, 0), random_sums(args.n_sequences, d_in, 1)
        single = time_call(lambda s=sums: bootstrap_intervals(s, settings), args.repeats)
        paired = time_call(lambda s=sums, b=baseline: paired_changes(s, b, settings), args.repeats)
        n_metrics = len(bootstrap_intervals(sums, settings))
        rows.append({"d_in": d_in, "metrics": n_metrics, "intervals_s": single, "paired_s": paired})
        print(
            f"n_seq {args.n_sequences}, resamples {args.resamples}, d_in {d_in}: "
            f"{n_metrics} intervals in {median(single):.3f} s (median of {args.repeats}); "
            f"paired changes of every metric in {median(paired):.3f} s"
        )
    if args.json:
        payload = {"environment": environment("cpu"), "config": vars(args) | {"json": str(args.json)}, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
