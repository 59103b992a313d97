"""Spreading a gate: pytest-xdist by hookpoint, shards across machines, compact baselines.

Three measurements on random-weight GPT-NeoX checkpoints (`common.build_checkpoint`) and
random TopK SAEs saved in SAELens format, through the product's own entry points:

1. `pytest thresholds.toml -n 2` against `-n 0` on 2 hooks x 3 SAEs: how many model runs
   evaluate each hook (must be one), and the summed CPU seconds inside `run_model` of
   every process (a conftest wraps it), target <= 1.1x.
2. `sae-acceptance eval --shard I/N` for N = 2 and 3, each shard its own process, on
   2 models x 3 hooks x 3 SAEs, against the single run: the sum of the shards' CPU
   seconds in `run_model`, target <= 1.05x; and `merge` giving the single run's metrics.
3. A baseline of SAEs with 16,384 latents measured on 200 sequences: bytes per SAE
   (JSON block + sidecar), target <= 30 KB.

    python benchmarks/bench_shards.py --json benchmarks/results/cpu2-shards.json
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
from common import build_checkpoint, environment, model_size, random_tokens, random_topk_sae

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


def write_config(folder: Path, name: str, models: list[Path], layers: list[int], per_hook: int, tokens: Path,
                 args) -> Path:
    entries = []
    for m, model in enumerate(models):
        for layer in layers:
            hook = f"blocks.{layer}.hook_resid_post"
            for i in range(per_hook):
                sae_name = f"m{m}-L{layer}-{i}"
                path = folder / "saes" / sae_name
                if not path.exists():
                    _save(random_topk_sae(args.d_model_resolved, args.d_sae, 16 * (i + 1), 100 * m + 10 * layer + i, hook),
                          path)
                entries.append(f'[[sae]]\nname = "{sae_name}"\npath = "saes/{sae_name}"\nmodel = "{model}"\n')
    text = (
        f'[eval]\ndata = "{tokens}"\nn_sequences = {args.n_seq}\ncontext_size = {args.ctx}\nbatch_size = {args.batch}\n'
        "bootstrap_resamples = 1000\ndevice = \"cpu\"\n\n[gate]\nrel_error = { max = 100.0 }\n\n" + "\n".join(entries)
    )
    out = folder / name
    out.write_text(text)
    return out


def _save(sae, path: Path) -> None:
    from sae_acceptance.sources.sae import save_sae

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


def xdist_part(folder: Path, config: Path) -> dict:
    (folder / "conftest.py").write_text(COUNTING)
    out = {}
    for n in ("0", "2"):
        start = time.perf_counter()
        call([sys.executable, "-m", "pytest", config.name, "-p", "no:cacheprovider", "--sae-no-progress", "-q",
              "-n", n, "--sae-json", f"xdist-n{n}.json"], folder)
        wall = time.perf_counter() - start
        measured = runs(folder)
        hooks = [h for r in measured for h in r["hooks"]]
        out[f"n{n}"] = {"model_runs": measured, "cpu_s": sum(r["cpu_s"] for r in measured), "wall_s": wall,
                        "each_hook_once": sorted(hooks) == sorted(set(hooks))}
    (folder / "conftest.py").unlink()
    a, b = (json.loads((folder / f"xdist-n{n}.json").read_text())["saes"] for n in ("0", "2"))
    out["ratio_cpu"] = out["n2"]["cpu_s"] / out["n0"]["cpu_s"]
    out["same_report"] = a == b
    return out


def shard_part(folder: Path, config: Path, counts: list[int]) -> dict:
    call(eval_cmd(config, "--json", "single.json"), folder)
    single = runs(folder)
    out = {"single": {"cpu_s": sum(r["cpu_s"] for r in single), "model_runs": single}}
    one = json.loads((folder / "single.json").read_text())["saes"]
    for count in counts:
        shards = []
        for i in range(1, count + 1):
            call(eval_cmd(config, "--shard", f"{i}/{count}", "--json", f"shard{i}of{count}.json"), folder)
            shards.append({"cpu_s": sum(r["cpu_s"] for r in runs(folder)),
                           "saes": json.loads((folder / f"shard{i}of{count}.json").read_text())["shard"]["saes"]})
        call([sys.executable, "-m", "sae_acceptance.cli", "merge", *(f"shard{i}of{count}.json" for i in range(1, count + 1)),
              "--json", f"merged{count}.json"], folder)
        merged = json.loads((folder / f"merged{count}.json").read_text())["saes"]
        total = sum(s["cpu_s"] for s in shards)
        out[f"shards{count}"] = {"shards": shards, "cpu_s": total, "ratio_cpu": total / out["single"]["cpu_s"],
                                 "max_shard_over_single": max(s["cpu_s"] for s in shards) / out["single"]["cpu_s"],
                                 "merged_equals_single": merged == one}
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
    text = (f'[eval]\nmodel = "{model}"\ndata = "{tokens}"\nn_sequences = 200\ncontext_size = {args.ctx}\n'
            f"batch_size = {args.batch}\nbootstrap_resamples = 1000\ndevice = \"cpu\"\n\n[gate]\nrel_error = {{ max = 100.0 }}\n\n"
            + "\n".join(saes))
    (folder / "base.toml").write_text(text)
    report = evaluate(load_thresholds(folder / "base.toml"), progress=False)
    target = folder / "base.baseline.json"
    write_baseline(target, baseline_entries(report))
    json_b, npz_b = target.stat().st_size, sidecar_path(target).stat().st_size
    return {"saes": args.baseline_saes, "n_sequences": 200, "d_sae": 16384, "json_bytes": json_b,
            "sidecar_bytes": npz_b, "bytes_per_sae": (json_b + npz_b) / args.baseline_saes,
            "fired_alive": [float((r.sums.fired > 0).mean()) for r in report.saes.values()]}


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
            config = write_config(folder, "thresholds-xdist.toml", models[:1], [1, 3], 3, tokens, args)
            result["xdist"] = xdist_part(folder, config)
            print("xdist", json.dumps({k: v for k, v in result["xdist"].items() if not k.startswith("n")}), flush=True)
            save(args, result)
        if "shards" not in args.skip:
            config = write_config(folder, "thresholds-shards.toml", models, [1, 3, 5], 3, tokens, args)
            result["shards"] = shard_part(folder, config, args.shards)
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
