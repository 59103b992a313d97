"""The tiny sweep profile end to end: train (cached), gate, tables; the built-in profiles parse."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sae_acceptance.errors import ConfigError
from sae_acceptance.train.sweep import BUILTIN_PROFILES, cache_key, load_profile


@pytest.mark.parametrize("name", BUILTIN_PROFILES)
def test_builtin_profiles_parse(name):
    profile = load_profile(name)
    assert profile.ks == sorted(profile.ks) and profile.data.train_tokens > 0
    if name == "fast2":
        assert profile.ks == [8, 16, 32, 64, 128, 256] and profile.data.train_tokens == 10_000_000
        assert {m.name: m.layers for m in profile.model} == {
            "pythia-70m": {"early": 1, "mid": 3, "late": 5},
            "pythia-410m": {"early": 4, "mid": 12, "late": 20},
        }


def test_a_bad_profile_is_one_clear_error(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "x"\nks = []\n')
    with pytest.raises(ConfigError, match=str(path)):
        load_profile(str(path))
    with pytest.raises(ConfigError, match="no such profile"):
        load_profile("fast9")
    tiny = (Path(__file__).parents[1] / "sae_acceptance/train/profiles/tiny.toml").read_text()
    path.write_text(tiny.replace("[train]\n", '[train]\noptimizer = "sgd"\n'))
    line = tiny.splitlines().index("[train]") + 2
    with pytest.raises(
        ConfigError, match=rf"p.toml:{line}: train\.optimizer: Input should be 'adam' or 'signum' \(got 'sgd'\)$"
    ):
        load_profile(str(path))


def test_cache_key_covers_the_training_inputs():
    profile = load_profile("tiny")
    base = cache_key("m", "blocks.0.hook_resid_post", profile, "abc")
    assert base == cache_key("m", "blocks.0.hook_resid_post", profile, "abc")
    assert base != cache_key("m", "blocks.1.hook_resid_post", profile, "abc")
    assert base != cache_key("m", "blocks.0.hook_resid_post", profile, "abd")
    other = profile.model_copy(update={"ks": [8, 16]})
    assert base != cache_key("m", "blocks.0.hook_resid_post", other, "abc")
    signum = profile.model_copy(update={"train": profile.train.model_copy(update={"optimizer": "signum"})})
    assert base != cache_key("m", "blocks.0.hook_resid_post", signum, "abc")


def test_tiny_sweep_end_to_end(pytester, monkeypatch, tmp_path):
    """Runs the `sae_sweep` fixture twice in one cache: trains once, then loads."""
    from conftest import REPO

    monkeypatch.chdir(REPO)  # the tiny profile's paths are relative to the repository
    cache = tmp_path / "cache"
    pytester.makepyfile(
        test_tiny="""
        import json

        def test_sweep(sae_sweep):
            report, points, out = sae_sweep
            largest = {p["depth"]: p["alive_frac"] for p in points if p["k"] == 32}
            assert set(largest) == {"early", "mid", "late"}
            assert min(largest.values()) >= 0.8
            assert [r.geometry.canyon for r in report.saes.values()] == [False, False, True, True, True, True]
            assert all(r.r2_warning for r in report.saes.values() if r.geometry.canyon)
            for name in ("analysis.json", "analysis.md", "report.json", "points.json"):
                assert (out / name).stat().st_size > 0
            assert len(json.loads((out / "points.json").read_text())) == 6
        """
    )
    start = time.perf_counter()
    args = [
        "--sae-sweep",
        "tiny",
        "--sae-sweep-cache",
        str(cache),
        "--sae-no-progress",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(pytester.path),
    ]
    first = pytester.runpytest(str(pytester.path / "test_tiny.py"), *args)
    first.assert_outcomes(passed=1)
    trained_s = time.perf_counter() - start
    weights = sorted(cache.rglob("sae_weights.safetensors"))
    assert len(weights) == 6
    stamps = [w.stat().st_mtime_ns for w in weights]
    second = pytester.runpytest(str(pytester.path / "test_tiny.py"), *args)
    second.assert_outcomes(passed=1)
    assert [w.stat().st_mtime_ns for w in weights] == stamps  # loaded, not retrained
    print(f"tiny sweep: {trained_s:.0f} s with training")
    json.dumps(stamps)


def test_sweep_shards_merged_are_the_single_run(monkeypatch, tmp_path, capsys):
    """Under xdist, worker i of n starts training on its own share of the grids; `sweep --shard
    I/N` gates a share; `merge --sweep-out` writes the single run's report and tables from the
    shards; a share with no grid passes and says so."""
    from conftest import REPO

    import sae_acceptance.train.sweep as sweeps
    from sae_acceptance.cli import main

    monkeypatch.chdir(REPO)
    profile = load_profile("tiny")
    trained, real = [], sweeps.train_at_hook

    def counting(model, name, tokens, hook, *args, **kwargs):
        trained.append(hook)
        return real(model, name, tokens, hook, *args, **kwargs)

    monkeypatch.setattr(sweeps, "train_at_hook", counting)
    sweeps.run_sweep(profile, tmp_path / "worker1", tmp_path / "cache", "cpu", False, worker=(1, 2))
    hooks = [f"blocks.{layer}.hook_resid_post" for _, _, layer in sweeps.grids(profile)]
    first = sweeps.grid_runs(profile, 2)[1][0]
    assert trained == hooks[first:] + hooks[:first]  # its own share first, then the others', each once

    def sweep(out: str, *extra: str) -> int:
        return main(
            [
                "sweep",
                "--profile",
                "tiny",
                "--cache",
                str(tmp_path / "cache"),
                "--no-progress",
                "--out",
                str(tmp_path / out),
                *extra,
            ]
        )

    codes = [sweep(f"s{i}", "--shard", f"{i}/2") for i in (1, 2)]  # from the cache, as the single run
    assert len(trained) == len(hooks)
    shares = [list(json.loads((tmp_path / f"s{i}" / "report.json").read_text())["shard"]["saes"]) for i in (1, 2)]
    assert all(shares) and not set(shares[0]) & set(shares[1])
    assert sweep("empty", "--shard", "4/4") == 0  # three grids, four shards
    assert "shard 4/4: no SAEs in this shard" in capsys.readouterr().out
    empty = json.loads((tmp_path / "empty" / "report.json").read_text())
    assert empty["saes"] == {} and {k: empty["shard"][k] for k in ("index", "count", "saes")} == {
        "index": 4,
        "count": 4,
        "saes": [],
    }
    single = sweep("single")
    merged = main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--sweep-out", str(tmp_path / "merged")])
    assert merged == single == max(codes)
    one, both = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("single", "merged"))
    assert list(both["saes"]) == list(one["saes"]) == shares[0] + shares[1]
    assert both["saes"] == one["saes"]
    for name in ("analysis.md", "points.json"):
        assert (tmp_path / "merged" / name).read_text() == (tmp_path / "single" / name).read_text(), name


def test_train_table_is_the_trainer_settings(tmp_path):
    """A profile's [train] table is `TrainSettings`: its fields, checks and descriptions."""
    from sae_acceptance.train.settings import TrainSettings

    assert load_profile("tiny").train == TrainSettings(
        expansion_factor=8, batch_size=1024, warmup_steps=50, dead_tokens=100_000
    )
    assert all(field.description for field in TrainSettings.model_fields.values())
    tiny = (Path(__file__).parents[1] / "sae_acceptance/train/profiles/tiny.toml").read_text()
    path = tmp_path / "p.toml"
    for line, message in [
        ("auxk_alpha = -1", r"train\.auxk_alpha: Input should be greater than or equal to 0"),
        ("k = 4", r"train: k is not a \[train\] setting"),
    ]:
        path.write_text(tiny.replace("[train]\n", f"[train]\n{line}\n"))
        with pytest.raises(ConfigError, match=message):
            load_profile(str(path))
