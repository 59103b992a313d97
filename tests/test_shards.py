"""Shards across machines: deterministic shares (groups whole), `eval --shard` in separate
processes merged into the single run's report, and `merge` refusing a missing or cut-short shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_topk_sae
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_acceptance.baseline import load_baseline
from sae_acceptance.cli import main
from sae_acceptance.config import load_thresholds
from sae_acceptance.errors import ConfigError
from sae_acceptance.shard import (
    ORIGINAL_PASS,
    SHARD_SPLIT_BUDGET,
    Shard,
    group_of,
    groups,
    partition,
    shard_members,
    xdist_runs,
)
from sae_acceptance.sources.sae_io import save_sae

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


def write_grid(
    folder: Path, model: Path, tokens: Path, per_hook: int = 3, fail: str | None = "h1-k1", h1_model: Path | None = None
) -> Path:
    """`per_hook` TopK SAEs at each of two hooks (the second of `h1_model` where given); the
    hook is recorded in each cfg.json only."""
    entries = []
    for h, hook in enumerate(HOOKS):
        for i in range(per_hook):
            name = f"h{h}-k{i}"
            save_sae(random_topk_sae(k=4 + 4 * i, seed=10 * h + i, hook=hook), folder / "saes" / name)
            strict = "gate = { ce_rec = { min = 0.999 } }\n" if name == fail else ""  # fails
            other = f'model = "{h1_model}"\n' if h and h1_model else ""
            entries.append(f'[[sae]]\nname = "{name}"\npath = "saes/{name}"\n{other}{strict}')
    text = (
        f'[eval]\nmodel = "{model}"\ndata = "{tokens}"\nn_sequences = 16\ncontext_size = 16\nbatch_size = 8\n'
        "bootstrap_resamples = 200\n\n[gate]\nrel_error = { max = 100.0 }\n\n" + "\n".join(entries)
    )
    (folder / "thresholds.toml").write_text(text)
    return folder / "thresholds.toml"


@pytest.fixture
def grid(tmp_path, tiny_checkpoint, tiny_tokens_file) -> Path:
    return write_grid(tmp_path, tiny_checkpoint, tiny_tokens_file)


def second_model(folder: Path, checkpoint: Path) -> Path:
    """Another model (the same weights, another name): its groups share no pass with the first's."""
    other = folder / "model-b"
    other.symlink_to(checkpoint, target_is_directory=True)
    return other


@pytest.fixture
def two_model_grid(tmp_path, tiny_checkpoint, tiny_tokens_file) -> Path:
    return write_grid(tmp_path, tiny_checkpoint, tiny_tokens_file, h1_model=second_model(tmp_path, tiny_checkpoint))


def test_groups_follow_the_recorded_hook_and_shares_keep_them_whole(grid, tmp_path):
    loaded = load_thresholds(grid)
    found = groups(loaded)
    assert [sorted(names) for names in found.values()] == [["h0-k0", "h0-k1", "h0-k2"], ["h1-k0", "h1-k1", "h1-k2"]]
    assert [key.hook for key in found] == list(HOOKS)  # from cfg.json, not the names
    for count in (1, 2, 3, 5):
        shares = [shard_members(loaded, Shard(i, count)) for i in range(1, count + 1)]
        assert sorted(n for s in shares for n in s) == sorted(n for names in found.values() for n in names)
        for names in found.values():  # a group lies in exactly one share
            assert sum(set(names) <= set(s) for s in shares) == 1
        assert shares == [shard_members(load_thresholds(grid), Shard(i, count)) for i in range(1, count + 1)]
        # one model's two thin groups stay on one shard: a second would repeat its original pass (+20%)
        assert [bool(s) for s in shares] == [True] + [False] * (count - 1)
    # xdist keeps one model's two thin groups together: a second original pass would add 20%
    assert set(xdist_runs(loaded, 2).values()) == {0}
    # A layout whose cfg.json names no hook (sparsify's) is its own group, under its name.
    (tmp_path / "saes" / "h0-k0" / "cfg.json").write_text(json.dumps({"k": 4}))
    entry = next(e for e in load_thresholds(grid).config.sae if e.name == "h0-k0")
    assert group_of(load_thresholds(grid), entry).hook == "h0-k0"


def test_shards_split_a_model_only_where_the_repeated_pass_is_cheap(two_model_grid):
    loaded = load_thresholds(two_model_grid)
    for count in (2, 3, 5):  # two models: a shard each, nothing repeated; the rest empty
        shares = [shard_members(loaded, Shard(i, count)) for i in range(1, count + 1)]
        assert shares[:2] == [[f"h{h}-k{i}" for i in range(3)] for h in (0, 1)] and not any(shares[2:])
    thin, release = [4] * 6, [7] * 12  # thin: 3 SAEs a hook; release: 6 (one model per half)
    assert partition(thin, [{"a"}] * 3 + [{"b"}] * 3, 3, budget=SHARD_SPLIT_BUDGET) == [[0, 1, 2], [3, 4, 5], []]
    assert all(partition(release, [{"a"}] * 6 + [{"b"}] * 6, 3, budget=SHARD_SPLIT_BUDGET))  # +2 on 88


@pytest.mark.parametrize(
    ("costs", "models"),
    [([4, 2, 7, 1, 3, 5], "aaabbc"), ([4, 4, 4, 4, 4, 4], "aaabbb"), ([3, 9, 3, 3, 1, 8, 2], "abababa")],
)
def test_partition_is_exact_on_small_cases(costs, models):
    """Brute force over every contiguous cut: the least largest run cost and, of those, the least work."""
    import itertools

    models = [{m} for m in models]

    def run_cost(run):
        return sum(costs[i] for i in run) + ORIGINAL_PASS * len(set().union(*(models[i] for i in run))) if run else 0

    for count in (1, 2, 3, 4):
        cuts = [
            [range(a, b) for a, b in zip((0, *points), (*points, len(costs)), strict=True)]
            for points in itertools.combinations_with_replacement(range(len(costs) + 1), count - 1)
        ]
        largest = min(max(map(run_cost, cut)) for cut in cuts)
        work = min(sum(map(run_cost, cut)) for cut in cuts if max(map(run_cost, cut)) == largest)
        runs = partition(costs, models, count)
        assert [i for run in runs for i in run] == list(range(len(costs)))
        assert max(map(run_cost, runs)) == largest and sum(map(run_cost, runs)) == work


def test_a_budget_spreads_only_where_the_repeated_original_passes_cost_little():
    thin, wide = [4, 4], [60, 60]
    assert partition(thin, [{"a"}, {"a"}], 2) == [[0], [1]]  # no budget: the count given
    assert partition(thin, [{"a"}, {"a"}], 2, budget=0.1) == [[0, 1], []]  # +2 on 10: 20%
    assert partition(wide, [{"a"}, {"a"}], 2, budget=0.1) == [[0], [1]]  # +2 on 122: 1.6%
    assert partition(thin, [{"a"}, {"b"}], 2, budget=0.0) == [[0], [1]]  # two models: nothing repeated
    # three workers over one model of six groups: two runs fit the budget, three do not
    assert partition([5] * 6, [{"a"}] * 6, 3, budget=0.1) == [[0, 1, 2], [3, 4, 5], []]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 40), st.sampled_from("abc")), min_size=1, max_size=9),
    st.integers(1, 5),
    st.sampled_from([0.0, 0.05, 0.1, 0.5]),
)
def test_a_budgeted_cut_covers_every_unit_once_within_its_budget(units, count, budget):
    costs, models = [c for c, _ in units], [{m} for _, m in units]

    def total(runs):
        return sum(sum(costs[i] for i in r) + ORIGINAL_PASS * len({m for i in r for m in models[i]}) for r in runs if r)

    runs = partition(costs, models, count, budget=budget)
    assert len(runs) == count and [i for run in runs for i in run] == list(range(len(costs)))
    assert total(runs) <= (1 + budget) * total([range(len(costs))])
    used = sum(bool(r) for r in runs)
    assert all(runs[:used]) and not any(runs[used:])  # empty runs last
    for more in range(used + 1, count + 1):  # no best cut into more runs that spreads wider fits the budget
        wider = partition(costs, models, more)
        if sum(bool(r) for r in wider) > used:
            assert total(wider) > (1 + budget) * total([range(len(costs))])


@pytest.mark.parametrize("text", ["0/3", "4/3", "x", "1/0", "2"])
def test_a_bad_shard_is_one_line(text):
    with pytest.raises(ConfigError, match="expected I/N with 1 <= I <= N"):
        Shard.parse(text)


def _eval(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sae_acceptance.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_three_shards_merged_are_the_single_run_bit_for_bit(two_model_grid, tmp_path, capsys, monkeypatch):
    grid = two_model_grid  # two models: shards 1 and 2 take one each, shard 3 is empty
    monkeypatch.chdir(tmp_path)  # every run from one workspace, as CI jobs are (entries record their file from it)
    shards = [
        _eval(
            [
                "eval",
                "--config",
                str(grid),
                "--shard",
                f"{i}/3",
                "--json",
                f"s{i}.json",
                "--baseline-part",
                f"part{i}.json",
                "--no-progress",
            ],
            tmp_path,
        )
        for i in (1, 2, 3)
    ]
    single = main(
        [
            "eval",
            "--config",
            str(grid),
            "--json",
            str(tmp_path / "single.json"),
            "--baseline-part",
            str(tmp_path / "single.baseline.json"),
            "--no-progress",
        ]
    )
    codes = [p.wait(timeout=600) for p in shards]
    assert single == 1 and codes == [1 if any("h1-k1" in s for s in share_names(grid, i)) else 0 for i in (1, 2, 3)], [
        p.stderr.read() for p in shards
    ]
    merged_code = main(
        [
            "merge",
            *(str(tmp_path / f"s{i}.json") for i in (1, 2, 3)),
            "--json",
            str(tmp_path / "m.json"),
            "--baseline-part",
            *(str(tmp_path / f"part{i}.json") for i in (1, 2, 3)),
            "--update-baseline",
            str(tmp_path / "merged.baseline.json"),
        ]
    )
    assert merged_code == single == 1
    assert "FAIL  h1-k1: ce_rec" in capsys.readouterr().out
    one, merged = (json.loads((tmp_path / f).read_text()) for f in ("single.json", "m.json"))
    assert list(merged["saes"]) == list(one["saes"])  # file order
    for name, sae in one["saes"].items():
        assert merged["saes"][name] == sae, name  # metrics, intervals, verdicts, geometry: bit for bit
    assert merged["eval"]["tokens"] == one["eval"]["tokens"] and "shard" not in merged
    assert {json.loads((tmp_path / f"s{i}.json").read_text())["shard"]["count"] for i in (1, 2, 3)} == {3}
    empty = json.loads((tmp_path / "s3.json").read_text())
    assert empty["saes"] == {} and empty["shard"] | {"fingerprint": None} == {
        "index": 3,
        "count": 3,
        "saes": [],
        "run": None,
        "fingerprint": None,
    }
    assert len({json.loads((tmp_path / f"s{i}.json").read_text())["shard"]["fingerprint"] for i in (1, 2, 3)}) == 1
    assert load_baseline(tmp_path / "part3.json").entries == {}
    assert "shard 3/3: no SAEs in this shard" in shards[2].stdout.read()
    # the folded baseline parts hold the single run's sums
    a = load_baseline(tmp_path / "single.baseline.json").entries
    b = load_baseline(tmp_path / "merged.baseline.json").entries
    assert set(a) == set(b) == set(one["saes"])
    for name in a:
        assert np.array_equal(a[name].sums.fired, b[name].sums.fired)
        assert all(np.array_equal(v, b[name].sums.scalars[k]) for k, v in a[name].sums.scalars.items())

    # a missing shard, and one that was cut short: one line naming it, exit 2
    assert main(["merge", str(tmp_path / "s1.json"), str(tmp_path / "s3.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard 2/3 missing" in err[0], err
    cut = json.loads((tmp_path / "s2.json").read_text())
    dropped = cut["shard"]["saes"][0]
    del cut["saes"][dropped]
    (tmp_path / "s2.json").write_text(json.dumps(cut))
    assert main(["merge", *(str(tmp_path / f"s{i}.json") for i in (1, 2, 3))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s2.json: shard 2/3 failed or was cut short: no result for " + dropped in err[0], err
    assert main(["merge", str(tmp_path / "s1.json"), str(tmp_path / "absent.json")]) == 2
    assert "absent.json: no such file, expected a shard's JSON report" in capsys.readouterr().err


def share_names(grid: Path, index: int) -> list[str]:
    return shard_members(load_thresholds(grid), Shard(index, 3))


def test_pytest_shards_deselect_the_rest(pytester, tiny_checkpoint, tiny_tokens_file):
    grid = write_grid(
        pytester.path, tiny_checkpoint, tiny_tokens_file, h1_model=second_model(pytester.path, tiny_checkpoint)
    )
    mine = share_names(grid, 1)
    result = pytester.runpytest(
        "thresholds.toml",
        "-p",
        "no:cacheprovider",
        "--sae-no-progress",
        "--sae-shard",
        "1/3",
        "--sae-json",
        "s1.json",
        "-v",
    )
    outcomes = result.parseoutcomes()
    others = [n for n in groups(load_thresholds(grid)) for n in groups(load_thresholds(grid))[n] if n not in mine]
    assert mine and others
    assert outcomes["deselected"] == 2 * len(others) + ("h1-k1" in others)  # rel_error and r2 (and one ce_rec)
    report = json.loads((pytester.path / "s1.json").read_text())
    assert list(report["saes"]) == mine and report["shard"]["saes"] == mine
    assert (report["shard"]["index"], report["shard"]["count"]) == (1, 3) and report["shard"]["fingerprint"]
    # the empty third share passes and still writes its report and baseline part, under xdist too
    assert share_names(grid, 3) == []
    for workers in ("0", "2"):
        empty = pytester.runpytest_subprocess(
            "thresholds.toml",
            "-p",
            "no:cacheprovider",
            "--sae-no-progress",
            "-n",
            workers,
            "--sae-shard",
            "3/3",
            "--sae-json",
            f"s3-{workers}.json",
            "--sae-update-baseline",
            "--sae-baseline",
            f"part3-{workers}.json",
        )
        assert empty.ret == 0, empty.stdout.str()[-2000:]
        empty.stdout.fnmatch_lines(
            ["*sae-acceptance: shard 3/3: no SAEs in this shard*beyond the 5% budget); nothing to do*"]
        )
        report = json.loads((pytester.path / f"s3-{workers}.json").read_text())
        assert report["shard"].pop("fingerprint")
        assert report == {
            "eval": {},
            "timing": {},
            "saes": {},
            "splices": {},
            "shard": {"index": 3, "count": 3, "saes": [], "run": None},
        }
        assert load_baseline(pytester.path / f"part3-{workers}.json").entries == {}
    bad = pytester.runpytest("thresholds.toml", "-p", "no:cacheprovider", "--sae-shard", "4/3")
    assert bad.ret == 4
    bad.stderr.fnmatch_lines(["*--sae-shard: shard '4/3': expected I/N with 1 <= I <= N*"])


def write_spliced_grid(folder: Path, model: Path, tokens: Path, h2_model: Path | None = None) -> Path:
    """The grid plus a group at a third hook (of `h2_model` where given), and a splice joining
    the first two hooks' groups: two units, {h0, h1, splice:pair} and {h2}."""
    path = write_grid(folder, model, tokens, fail=None)
    extra = []
    for i in range(2):
        save_sae(random_topk_sae(k=4, seed=90 + i, hook="blocks.2.hook_resid_post"), folder / "saes" / f"h2-k{i}")
        extra.append(
            f'[[sae]]\nname = "h2-k{i}"\npath = "saes/h2-k{i}"\n' + (f'model = "{h2_model}"\n' if h2_model else "")
        )
    splice = '[[splice]]\nname = "pair"\nsaes = ["h0-k0", "h1-k0"]\ngate = { kl_div = { max = 100.0 } }\n'
    path.write_text(path.read_text() + "\n" + "\n".join(extra) + "\n" + splice)
    return path


def test_pytest_shards_evaluate_a_splice_once_with_its_members(pytester, tiny_checkpoint, tiny_tokens_file):
    from test_xdist_groups import COUNTING, model_runs

    grid = write_spliced_grid(
        pytester.path, tiny_checkpoint, tiny_tokens_file, h2_model=second_model(pytester.path, tiny_checkpoint)
    )
    pytester.makeconftest(COUNTING)
    loaded = load_thresholds(grid)
    shares = [shard_members(loaded, Shard(i, 2)) for i in (1, 2)]
    assert sorted(map(sorted, shares)) == [["h0-k0", "h0-k1", "h0-k2", "h1-k0", "h1-k1", "h1-k2"], ["h2-k0", "h2-k1"]]
    runs, splices = [], []
    for i in (1, 2):  # each shard writes its own files: its report and its baseline part
        result = pytester.runpytest_subprocess(
            "thresholds.toml",
            "-p",
            "no:cacheprovider",
            "--sae-no-progress",
            "--sae-shard",
            f"{i}/2",
            "--sae-json",
            f"s{i}.json",
            "-v",
            "--sae-update-baseline",
            "--sae-baseline",
            f"part{i}.json",
        )
        assert result.ret == 0, result.stdout.str()[-3000:]
        ran = [line for line in result.stdout.lines if "thresholds.toml::splice:pair::" in line]
        splices.append(len(ran))
        runs += model_runs(pytester)
        report = json.loads((pytester.path / f"s{i}.json").read_text())
        assert sorted(report["splices"]) == (["pair"] if "h0-k0" in shares[i - 1] else [])
    assert sorted(splices) == [0, 1]  # the splice's one item (kl_div), in the shard of its members
    # every hook evaluated once over both shards, the splice in its members' run
    assert sorted(sorted(run) for run in runs) == [
        ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
        ["blocks.2.hook_resid_post"],
    ]

    # merged, the reports and the baseline parts are the single run's, the splice's entry included
    single = pytester.runpytest_subprocess(
        "thresholds.toml",
        "-p",
        "no:cacheprovider",
        "--sae-no-progress",
        "--sae-json",
        "single.json",
        "--sae-update-baseline",
        "--sae-baseline",
        "single.baseline.json",
    )
    assert single.ret == 0 and len(model_runs(pytester)) == 2  # one per model
    assert (
        main(
            [
                "merge",
                str(pytester.path / "s1.json"),
                str(pytester.path / "s2.json"),
                "--json",
                str(pytester.path / "merged.json"),
                "--baseline-part",
                str(pytester.path / "part1.json"),
                str(pytester.path / "part2.json"),
                "--update-baseline",
                str(pytester.path / "merged.baseline.json"),
            ]
        )
        == 0
    )
    one, merged = (json.loads((pytester.path / f).read_text()) for f in ("single.json", "merged.json"))
    assert merged["saes"] == one["saes"] and merged["splices"] == one["splices"]
    a, b = (load_baseline(pytester.path / f).entries for f in ("single.baseline.json", "merged.baseline.json"))
    assert sorted(a) == sorted(b) and "splice:pair" in a
    for name in a:
        assert all(np.array_equal(v, b[name].sums.scalars[k]) for k, v in a[name].sums.scalars.items())
