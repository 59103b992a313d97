"""Collecting a release-sized thresholds file: `pytest --collect-only` on N `[[sae]]` entries.

Writes a thresholds file with N entries (each the embedded reference's L0-k32 under its own
name) and times, in a fresh process per repeat, `pytest --collect-only -q thresholds.toml`
(wall time, and the collection time pytest reports) and, in this process, `load_thresholds`
plus locating every entry's line (what the collector does before it yields its items).

    python benchmarks/bench_collection.py --entries 1000 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_release(folder: Path, entries: int) -> Path:
    """A thresholds file of `entries` [[sae]] tables gating ce_rec (two items each: ce_rec, r2)."""
    head = (
        "[eval]\n"
        f'model = "{REPO / "reference" / "model"}"\n'
        f'data = "{REPO / "reference" / "tokens.npy"}"\n'
        "n_sequences = 8\ncontext_size = 16\n\n"
        "[gate]\nce_rec = { min = 0.5 }\n\n"
    )
    sae = REPO / "reference" / "saes" / "L0-k32"
    body = "".join(f'[[sae]]\npath = "{sae}"\nname = "e{i}"\n\n' for i in range(entries))
    path = folder / "thresholds.toml"
    path.write_text(head + body)
    return path


def collect_once(path: Path) -> dict[str, float]:
    """One fresh `pytest --collect-only` process: its wall time and pytest's own figure."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", path.name]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=path.parent, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"pytest failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    found = re.search(r"(\d+) tests? collected in ([\d.]+)s", proc.stdout)
    if not found:
        raise SystemExit(f"no collection line in pytest's output: {proc.stdout[-500:]}")
    return {"wall_s": wall, "items": int(found[1]), "pytest_collect_s": float(found[2])}


def load_once(path: Path, entries: int) -> float:
    """`load_thresholds` and every entry's line, in this process."""
    from sae_acceptance.config import load_thresholds

    start = time.perf_counter()
    loaded = load_thresholds(path)
    for i in range(entries):
        loaded.line_of("sae", i)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entries in args.entries:
            folder = Path(tmp, str(entries))
            folder.mkdir()
            path = write_release(folder, entries)
            runs = [collect_once(path) for _ in range(args.repeats)]
            loads = [load_once(path, entries) for _ in range(args.repeats)]
            results[entries] = {
                "items": runs[0]["items"],
                "wall_s": median([r["wall_s"] for r in runs]),
                "pytest_collect_s": median([r["pytest_collect_s"] for r in runs]),
                "load_and_locate_s": median(loads),
                "raw": runs,
            }
            row = results[entries]
            print(
                f"{entries:>6} entries, {row['items']} items: pytest --collect-only {row['wall_s']:.2f} s wall "
                f"({row['pytest_collect_s']:.2f} s collecting), load_thresholds + lines {row['load_and_locate_s']:.2f} s"
            )
    if args.json:
        env = {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        args.json.write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
