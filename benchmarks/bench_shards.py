"""Spreading a gate: pytest-xdist by hookpoint, shards across machines, compact baselines.

Three measurements on random-weight GPT-NeoX checkpoints (`common.build_checkpoint`) and
random TopK SAEs saved in SAELens format, through the product's own entry points:

1. `pytest thresholds.toml -n 2` against `-n 0` on 2 hooks x `--xdist-per-hook` SAEs (default
   3): how many model runs evaluate each hook (must be one), and the summed CPU seconds inside
   `run_model` of every process (a conftest wraps it), target <= 1.1x.
2. `sae-acceptance eval --shard I/N` for N = 2 and 3, each shard its own process, on
   2 models x `--layers` hooks x `--per-hook` SAEs (default 3 x 3), against the single
   run: the sum of the shards' CPU seconds in `run_model`, target <= 1.05x (medians of
   `--repeats` round-robin runs); and `merge` giving the single run's metrics.
3. A baseline of SAEs with 16,384 latents measured on 200 sequences: bytes per SAE
   (JSON block + sidecar), target <= 30 KB.

    python benchmarks/bench_shards.py --json benchmarks/results/cpu2-shards.json
    python benchmarks/bench_shards.py --skip shards baseline --xdist-per-hook 12 \
        --json benchmarks/results/cpu2-shards-xdist-wide.json
    python benchmarks/bench_shards.py --skip xdist baseline --layers 0 1 2 3 4 5 --per-hook 6 \
        --d-sae 8192 --n-seq 32 --batch 8 --json benchmarks/results/cpu2-shards-release.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import build_checkpoint, environment, median, model_size, random_tokens, random_topk_sae

HERE = Path(__file__).resolve()
COUNTING = """
import json, time
from pathlib import Path

import torch

import sae_acceptance.evaluate as evaluate

torch.set_num_threads(1)
_real = evaluate.run_model


def _counting(backend, by_hook, *args, **kwargs):
    start = time.process_time()
    out = _real(backend, by_hook, *args, **kwargs)
    with open(Path(__file__).parent / "runs.log", "a") as log:
        log.write(json.dumps({"hooks": sorted(by_hook), "cpu_s": time.process_time() - start}) + "\\n")
    return out


evaluate.run_model = _counting
"""


def write_config(
    folder: Path, name: str, models: list[Path], layers: list[int], per_hook: int, tokens: Path, args
) -> Path:
    entries = []
    for m, model in enumerate(models):
        for layer in layers:
            hook = f"blocks.{layer}.hook_resid_post"
            for i in range(per_hook):
                sae_name = f"m{m}-L{layer}-{i}"
                path = folder / "saes" / sae_name
                if not path.exists():
                    _save(
                        random_topk_sae(
                            args.d_model_resolved, args.d_sae, 16 * (i + 1), 100 * m + 10 * layer + i, hook
                        ),
                        path,
                    )
                entries.append(f'[[sae]]\nname = "{sae_name}"\npath = "saes/{sae_name}"\nmodel = "{model}"\n')
    text = (
        f'[eval]\ndata = "{tokens}"\nn_sequences = {args.n_seq}\ncontext_size = {args.ctx}\nbatch_size = {args.batch}\n'
        'bootstrap_resamples = 1000\ndevice = "cpu"\n\n[gate]\nrel_error = { max = 100.0 }\n\n' + "\n".join(entries)
    )
    out = folder / name
    out.write_text(text)
    return out


def _save(sae, path: Path) -> None:
    from sae_acceptance.sources.sae_io import save_sae

    save_sae(sae, path)


def runs(folder: Path) -> list[dict]:
    log = folder / "runs.log"
    if not log.exists():
        return []
    out = [json.loads(line) for line in log.read_text().splitlines()]
    log.unlink()
    return out


def call(cmd: list[str], cwd: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode})")
    return proc.returncode


def eval_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(HERE), "--worker-eval", str(config), *extra]


def worker_eval(argv: list[str]) -> None:
    """`sae-acceptance eval --config ...` in this process, with run_model's CPU seconds counted."""
    folder = Path(argv[0]).parent
    exec(COUNTING, {"__file__": str(folder / "conftest.py")})  # the same wrapper as the pytest runs
    from sae_acceptance.cli import main

    code = main(["eval", "--config", argv[0], "--no-progress", *argv[1:]])
    sys.exit(code)


def xdist_part(folder: Path, config: Path, repeats: int) -> dict:
    """`-n 0` and `-n 2` round-robin, `repeats` times each; the ratio is of the medians."""
    (folder / "conftest.py").write_text(COUNTING)
    out: dict = {"n0": {"repeats": []}, "n2": {"repeats": []}}
    same = []
    for _ in range(repeats):
        for n in ("0", "2"):
            start = time.perf_counter()
            call(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    config.name,
                    "-p",
                    "no:cacheprovider",
                    "--sae-no-progress",
                    "-q",
                    "-n",
                    n,
                    "--sae-json",
                    f"xdist-n{n}.json",
                ],
                folder,
            )
            wall = time.perf_counter() - start
            measured = runs(folder)
            hooks = [h for r in measured for h in r["hooks"]]
            out[f"n{n}"]["repeats"].append(
                {
                    "model_runs": measured,
                    "cpu_s": sum(r["cpu_s"] for r in measured),
                    "wall_s": wall,
                    "each_hook_once": sorted(hooks) == sorted(set(hooks)),
                }
            )
        a, b = (json.loads((folder / f"xdist-n{n}.json").read_text())["saes"] for n in ("0", "2"))
        same.append(a == b)
    (folder / "conftest.py").unlink()
    for n in ("n0", "n2"):
        out[n]["cpu_s"] = median([r["cpu_s"] for r in out[n]["repeats"]])
        out[n]["each_hook_once"] = all(r["each_hook_once"] for r in out[n]["repeats"])
    out["ratio_cpu"] = out["n2"]["cpu_s"] / out["n0"]["cpu_s"]
    out["ratio_cpu_each"] = [
        b["cpu_s"] / a["cpu_s"] for a, b in zip(out["n0"]["repeats"], out["n2"]["repeats"], strict=True)
    ]
    out["same_report"] = all(same)
    return out


def shard_part(folder: Path, config: Path, counts: list[int], repeats: int) -> dict:
    """Round-robin repeats (single, 2 shards, 3 shards, single, ...): a change of load on a shared
    machine hits every contender alike; the ratio is of the medians."""
    out: dict = {"single": {"repeats": []}, **{f"shards{count}": {"repeats": []} for count in counts}}
    for _ in range(repeats):
        call(eval_cmd(config, "--json", "single.json"), folder)
        single = runs(folder)
        out["single"]["repeats"].append({"cpu_s": sum(r["cpu_s"] for r in single), "model_runs": single})
        one = json.loads((folder / "single.json").read_text())["saes"]
        for count in counts:
            shards = []
            for i in range(1, count + 1):
                call(eval_cmd(config, "--shard", f"{i}/{count}", "--json", f"shard{i}of{count}.json"), folder)
                shards.append(
                    {
                        "cpu_s": sum(r["cpu_s"] for r in runs(folder)),
                        "saes": json.loads((folder / f"shard{i}of{count}.json").read_text())["shard"]["saes"],
                    }
                )
            call(
                [
                    sys.executable,
                    "-m",
                    "sae_acceptance.cli",
                    "merge",
                    *(f"shard{i}of{count}.json" for i in range(1, count + 1)),
                    "--json",
                    f"merged{count}.json",
                ],
                folder,
            )
            merged = json.loads((folder / f"merged{count}.json").read_text())["saes"]
            out[f"shards{count}"]["repeats"].append(
                {"shards": shards, "cpu_s": sum(s["cpu_s"] for s in shards), "merged_equals_single": merged == one}
            )
    out["single"]["cpu_s"] = median([r["cpu_s"] for r in out["single"]["repeats"]])
    for count in counts:
        part = out[f"shards{count}"]
        part["cpu_s"] = median([r["cpu_s"] for r in part["repeats"]])
        part["ratio_cpu"] = part["cpu_s"] / out["single"]["cpu_s"]
        part["ratio_cpu_each"] = [
            r["cpu_s"] / s["cpu_s"] for r, s in zip(part["repeats"], out["single"]["repeats"], strict=True)
        ]
        part["max_shard_over_single"] = (
            median([max(s["cpu_s"] for s in r["shards"]) for r in part["repeats"]]) / out["single"]["cpu_s"]
        )
        part["merged_equals_single"] = all(r["merged_equals_single"] for r in part["repeats"])
    return out


def baseline_part(folder: Path, model: Path, args) -> dict:
    from sae_acceptance.baseline import baseline_entries, sidecar_path, write_baseline
    from sae_acceptance.config import load_thresholds
    from sae_acceptance.evaluate import evaluate

    tokens = folder / "tokens200.npy"
    np.save(tokens, random_tokens(200, args.ctx, args.vocab_resolved, args.seed + 7).numpy())
    saes = []
    for i in range(args.baseline_saes):
        path = folder / "saes16k" / f"s{i}"
        _save(random_topk_sae(args.d_model_resolved, 16384, 32, 1000 + i, "blocks.2.hook_resid_post"), path)
        saes.append(f'[[sae]]\nname = "s{i}"\npath = "{path}"\n')
    text = (
        f'[eval]\nmodel = "{model}"\ndata = "{tokens}"\nn_sequences = 200\ncontext_size = {args.ctx}\n'
        f'batch_size = {args.batch}\nbootstrap_resamples = 1000\ndevice = "cpu"\n\n[gate]\nrel_error = {{ max = 100.0 }}\n\n'
        + "\n".join(saes)
    )
    (folder / "base.toml").write_text(text)
    report = evaluate(load_thresholds(folder / "base.toml"), progress=False)
    target = folder / "base.baseline.json"
    write_baseline(target, baseline_entries(report))
    json_b, npz_b = target.stat().st_size, sidecar_path(target).stat().st_size
    return {
        "saes": args.baseline_saes,
        "n_sequences": 200,
        "d_sae": 16384,
        "json_bytes": json_b,
        "sidecar_bytes": npz_b,
        "bytes_per_sae": (json_b + npz_b) / args.baseline_saes,
        "fired_alive": [float((r.sums.fired > 0).mean()) for r in report.saes.values()],
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker-eval":
        worker_eval(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--n-layers", type=int)
    parser.add_argument("--n-heads", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--n-seq", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 3])
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[1, 3, 5],
        help="the shard run's hooks: blocks.L.hook_resid_post of each model",
    )
    parser.add_argument("--per-hook", type=int, default=3, help="the shard run's SAEs per hook")
    parser.add_argument("--xdist-per-hook", type=int, default=3, help="the xdist run's SAEs at each of its 2 hooks")
    parser.add_argument(
        "--repeats", type=int, default=3, help="round-robin repeats of the xdist and shard runs (medians)"
    )
    parser.add_argument("--baseline-saes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["xdist", "shards", "baseline"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = model_size(args)
    args.d_model_resolved, args.vocab_resolved = size.d_model, size.vocab
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "environment": environment("cpu"), "size": vars(size)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = [build_checkpoint(folder / f"model{m}", size, args.ctx, seed=m) for m in range(2)]
        tokens = folder / "tokens.npy"
        np.save(tokens, random_tokens(args.n_seq, args.ctx, size.vocab, args.seed).numpy())
        if "xdist" not in args.skip:
            config = write_config(
                folder, "thresholds-xdist.toml", models[:1], [1, 3], args.xdist_per_hook, tokens, args
            )
            result["xdist"] = xdist_part(folder, config, args.repeats)
            print("xdist", json.dumps({k: v for k, v in result["xdist"].items() if not k.startswith("n")}), flush=True)
            save(args, result)
        if "shards" not in args.skip:
            config = write_config(folder, "thresholds-shards.toml", models, args.layers, args.per_hook, tokens, args)
            result["shards"] = shard_part(folder, config, args.shards, args.repeats)
            print("shards", json.dumps({k: v.get("ratio_cpu") for k, v in result["shards"].items()}), flush=True)
            save(args, result)
        if "baseline" not in args.skip:
            result["baseline"] = baseline_part(folder, models[0], args)
            print("baseline", json.dumps(result["baseline"]), flush=True)
            save(args, result)


def save(args, result: dict) -> None:
    """After each part: a later part that fails keeps the earlier ones' numbers."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
