"""Cross-layer transcoders: circuit-tracer's on-disk formats read as circuit-tracer reads them, and
the replacement model's CE and KL against a forward that patches every MLP output with
circuit-tracer's own transcoder classes (its encode and decode), layer by layer in one pass."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import D_MODEL, N_LAYERS, REPO

from sae_acceptance.config import load_thresholds
from sae_acceptance.engine import run_model
from sae_acceptance.errors import ConfigError, SAEFormatError
from sae_acceptance.evaluate import evaluate
from sae_acceptance.sources.formats.circuit_tracer import load_clt
from sae_acceptance.sources.tokens import counted_mask

ct_clt = pytest.importorskip("circuit_tracer.transcoder.cross_layer_transcoder")
ct_plt = pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder")
from circuit_tracer.transcoder.activation_functions import JumpReLU  # noqa: E402

IN_HOOK, OUT_HOOK = "ln2.hook_normalized", "hook_mlp_out"  # GPT-NeoX is parallel: the MLP reads ln2
D_LATENT = 48


def _config(path: Path, kind: str, **extra: object) -> None:
    lines = [f"model_kind: {kind}", f"feature_input_hook: {IN_HOOK}", f"feature_output_hook: {OUT_HOOK}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    (path / "config.yaml").write_text("\n".join(lines) + "\n")


def random_ct_clt(jump: bool, seed: int = 0):
    """circuit-tracer's CrossLayerTranscoder with random float32 weights (decoders to every later layer)."""
    g = torch.Generator().manual_seed(seed)
    clt = ct_clt.CrossLayerTranscoder(
        N_LAYERS,
        D_LATENT,
        D_MODEL,
        activation_function="jump_relu" if jump else "relu",
        lazy_decoder=False,
        feature_input_hook=IN_HOOK,
        feature_output_hook=OUT_HOOK,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(clt.W_enc.shape, generator=g) / math.sqrt(D_MODEL))
        clt.b_enc.copy_(torch.randn(clt.b_enc.shape, generator=g) * 0.1)
        clt.b_dec.copy_(torch.randn(clt.b_dec.shape, generator=g) * 0.05)
        for w in clt.W_dec:
            w.copy_(torch.randn(w.shape, generator=g) * 0.3 / math.sqrt(D_LATENT))
        if jump:
            clt.activation_function.threshold.copy_(torch.rand(N_LAYERS, 1, D_LATENT, generator=g) * 0.3)
    return clt


def random_ct_set(skip: bool, seed: int = 1):
    """circuit-tracer's TranscoderSet of JumpReLU SingleLayerTranscoders (with W_skip when asked)."""
    g = torch.Generator().manual_seed(seed)
    transcoders = {}
    for layer in range(N_LAYERS):
        act = JumpReLU(torch.rand(D_LATENT, generator=g) * 0.2, 0.1)
        tc = ct_plt.SingleLayerTranscoder(
            D_MODEL, D_LATENT, act, layer, skip_connection=skip, device=torch.device("cpu"), dtype=torch.float32
        )
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(tc.W_enc.shape, generator=g) / math.sqrt(D_MODEL))
            tc.W_dec.copy_(torch.randn(tc.W_dec.shape, generator=g) * 0.3 / math.sqrt(D_LATENT))
            tc.b_enc.copy_(torch.randn(tc.b_enc.shape, generator=g) * 0.1)
            tc.b_dec.copy_(torch.randn(tc.b_dec.shape, generator=g) * 0.05)
            if skip:
                tc.W_skip.copy_(torch.randn(tc.W_skip.shape, generator=g) * 0.1 / math.sqrt(D_MODEL))
        transcoders[layer] = tc
    return ct_plt.TranscoderSet(transcoders, feature_input_hook=IN_HOOK, feature_output_hook=OUT_HOOK)


def _ct_output(ct, layer: int, inputs: dict[int, torch.Tensor]) -> torch.Tensor:
    """What circuit-tracer's classes write to `layer`'s MLP output, from each layer's input so far."""
    if isinstance(ct, ct_plt.TranscoderSet):
        return ct[layer](inputs[layer])
    n_pos = inputs[layer].shape[0]
    feats = torch.zeros(ct.n_layers, n_pos, ct.d_transcoder)
    for s in range(layer + 1):
        feats[s] = ct.encode_layer(inputs[s], s)
    return ct.decode(feats.to_sparse())[layer]


def _replaced_logits(model, seq: torch.Tensor, keep: torch.Tensor, ct) -> torch.Tensor:
    """One sequence's logits with every MLP output replaced by circuit-tracer's transcoder output."""
    inputs: dict[int, torch.Tensor] = {}

    def read(act, hook):
        inputs[int(hook.name.split(".")[1])] = act[0]
        return act

    def write(act, hook):
        out = _ct_output(ct, int(hook.name.split(".")[1]), inputs)[None]
        return torch.where(keep[..., None], out.to(act.dtype), act)

    hooks = []
    for layer in range(N_LAYERS):
        hooks += [(f"blocks.{layer}.{IN_HOOK}", read), (f"blocks.{layer}.{OUT_HOOK}", write)]
    return model.run_with_hooks(seq, fwd_hooks=hooks)


def _reference(model, tokens: torch.Tensor, counted: torch.Tensor, ct) -> tuple[float, float, float]:
    """Pooled (ce_orig, ce_recon, kl_recon) with every MLP output replaced, sequence by sequence,
    log-softmax in float64."""
    ce_o, ce_r, kl, n_loss, n_tok = 0.0, 0.0, 0.0, 0, 0
    with torch.no_grad():
        for seq, keep in zip(tokens, counted, strict=True):
            seq, keep = seq[None], keep[None]
            orig = model(seq).double().log_softmax(-1)
            patched = _replaced_logits(model, seq, keep, ct).double().log_softmax(-1)
            mask = keep[:, :-1]
            targets = seq[:, 1:, None]
            ce_o += float(-orig[:, :-1].gather(-1, targets).squeeze(-1)[mask].sum())
            ce_r += float(-patched[:, :-1].gather(-1, targets).squeeze(-1)[mask].sum())
            kl += float((orig.exp() * (orig - patched)).sum(-1)[keep].sum())
            n_loss += int(mask.sum())
            n_tok += int(keep.sum())
    return ce_o / n_loss, ce_r / n_loss, kl / n_tok


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A ReLU CLT and a JumpReLU CLT in circuit-tracer's lazy layout, and a JumpReLU skip
    transcoder set in its layer_{i} layout, each written by circuit-tracer's to_safetensors."""
    root = tmp_path_factory.mktemp("clt")
    out = {}
    for name, ct in {
        "relu": random_ct_clt(jump=False),
        "jump": random_ct_clt(jump=True, seed=2),
        "set": random_ct_set(skip=True),
    }.items():
        ct.to_safetensors(str(root / name))
        _config(root / name, "transcoder_set" if name == "set" else "cross_layer_transcoder", model_name="tiny")
        out[name] = (root / name, ct)
    return out


@pytest.mark.parametrize("name", ["relu", "jump", "set"])
def test_reader_matches_circuit_tracer_loaders(written, name):
    """Every layer's output from one input, through the project's CLT and circuit-tracer's own
    loader (load_clt / load_transcoder_set), agrees exactly in float32."""
    path, _ = written[name]
    ours = load_clt(path)
    if name == "set":
        theirs = ct_plt.load_transcoder_set(
            {i: str(path / f"layer_{i}.safetensors") for i in range(N_LAYERS)},
            scan="t",
            feature_input_hook=IN_HOOK,
            feature_output_hook=OUT_HOOK,
            device=torch.device("cpu"),
            lazy_encoder=False,
            lazy_decoder=False,
        )
    else:
        theirs = ct_clt.load_clt(str(path), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    assert (ours.kind, ours.input_hook, ours.output_hook, ours.model_name) == (
        "transcoder_set" if name == "set" else "cross_layer_transcoder",
        IN_HOOK,
        OUT_HOOK,
        "tiny",
    )
    x = {i: torch.randn(5, D_MODEL, generator=torch.Generator().manual_seed(i)) for i in range(N_LAYERS)}
    feats = {i: ours.encode(i, x[i]) for i in range(N_LAYERS)}
    for layer in range(N_LAYERS):
        torch.testing.assert_close(
            ours.reconstruct_layer(layer, feats, x[layer]), _ct_output(theirs, layer, x), rtol=1e-6, atol=1e-6
        )


def test_replacement_forward_matches_circuit_tracer(written, tiny_model, tiny_tokens):
    """The engine's replacement pass (float32) against circuit-tracer's classes patched into a
    TransformerLens forward, sequence by sequence, with float64 log-softmax: CE and KL agree to
    1e-6 relative; ablation and per-layer numbers are sane."""
    counted = counted_mask(tiny_tokens, [0, 1, 2])
    clts = {name: load_clt(path) for name, (path, _) in written.items()}
    run = run_model(tiny_model, {}, tiny_tokens, counted, batch_size=8, progress=False, clts=clts)
    for name, (_, ct) in written.items():
        ce_orig, ce_recon, kl_recon = _reference(tiny_model, tiny_tokens, counted, ct)
        got = run.clts[name].sums.metrics()
        assert got["ce_orig"] == pytest.approx(ce_orig, rel=1e-6)
        assert got["ce_recon"] == pytest.approx(ce_recon, rel=1e-6)
        assert got["kl_div"] == pytest.approx(kl_recon, rel=1e-6)
        assert got["kl_div"] > 1e-3  # the replacement changes the model: the comparison has teeth
        assert [row["layer"] for row in run.clts[name].layers] == list(range(N_LAYERS))
        assert all(row["nmse"] > 0 and -1 <= row["cosine"] <= 1 for row in run.clts[name].layers)


def test_one_layer_set_equals_a_transcoder(written, tiny_model, tiny_tokens, tmp_path):
    """A set of one layer's transcoder is that transcoder: the same CE as the layer's transcoder
    evaluated by the engine as an [[sae]] reading ln2 and writing hook_mlp_out."""
    _, ct = written["set"]
    one = ct_plt.TranscoderSet({0: ct[0]}, feature_input_hook=IN_HOOK, feature_output_hook=OUT_HOOK)
    one.to_safetensors(str(tmp_path / "one"))
    _config(tmp_path / "one", "transcoder_set")
    clt = load_clt(tmp_path / "one")
    counted = counted_mask(tiny_tokens, [0, 1, 2])
    run = run_model(tiny_model, {}, tiny_tokens, counted, batch_size=8, progress=False, clts={"one": clt})
    ce_orig, ce_recon, _ = _reference_one(tiny_model, tiny_tokens, counted, ct[0])
    got = run.clts["one"].sums.metrics()
    assert got["ce_recon"] == pytest.approx(ce_recon, rel=1e-6)
    assert got["ce_orig"] == pytest.approx(ce_orig, rel=1e-6)


def _reference_one(model, tokens, counted, tc):
    inputs: dict[str, torch.Tensor] = {}

    def read(act, hook):
        inputs["x"] = act
        return act

    def write(act, hook):
        return torch.where(counted[..., None], tc(inputs["x"]).to(act.dtype), act)

    with torch.no_grad():
        orig = model(tokens).double().log_softmax(-1)
        hooks = [(f"blocks.0.{IN_HOOK}", read), (f"blocks.0.{OUT_HOOK}", write)]
        patched = model.run_with_hooks(tokens, fwd_hooks=hooks).double().log_softmax(-1)
    mask = counted[:, :-1]
    targets = tokens[:, 1:, None]
    ce_o = -orig[:, :-1].gather(-1, targets).squeeze(-1)[mask].mean()
    ce_r = -patched[:, :-1].gather(-1, targets).squeeze(-1)[mask].mean()
    return float(ce_o), float(ce_r), 0.0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: (p / "W_dec_1.safetensors").unlink(), "W_dec_1.safetensors is missing"),
        (lambda p: (p / "config.yaml").write_text("model_kind: mystery\n"), "model_kind 'mystery'"),
        (lambda p: (p / "config.yaml").write_text("feature_input_hook: blocks.0.x\n"), "feature_input_hook"),
        (lambda p: (p / "config.yaml").write_text(": : :\n"), "not valid YAML"),
    ],
)
def test_bad_clt_directories_are_one_line(written, tmp_path, mutate, message):
    import shutil

    path = tmp_path / "c"
    shutil.copytree(written["relu"][0], path)
    mutate(path)
    with pytest.raises(SAEFormatError, match=message) as err:
        load_clt(path)
    assert "\n" not in str(err.value)


def _thresholds_text(model: Path, data: Path, clt: Path, gate: str = "ce_rec = { min = -1000.0 }") -> str:
    return f"""[eval]
model = "{model}"
data = "{data}"
n_sequences = 16
context_size = 16
batch_size = 8
bootstrap_resamples = 100

[gate]
ce_rec = {{ min = 0.5 }}

[[clt]]
name = "whole"
path = "{clt}"
gate = {{ {gate}, kl_div = {{ max = 100.0 }} }}
"""


@pytest.fixture(scope="module")
def clt_report(written, tiny_checkpoint, tiny_tokens_file, tmp_path_factory):
    """A thresholds file with only a [[clt]], evaluated."""
    root = tmp_path_factory.mktemp("cltfile")
    path = root / "thresholds.toml"
    path.write_text(_thresholds_text(tiny_checkpoint, tiny_tokens_file, written["jump"][0]))
    return evaluate(load_thresholds(path), progress=False), load_thresholds(path)


def test_evaluate_reports_a_clt_like_a_splice(clt_report, tiny_model, tiny_tokens_file, written):
    """`[[clt]]` -> a `clt:<name>` result with the joint metrics, intervals, verdicts and per-layer
    rows; its CE equals the reference forward on the same tokens; the JSON report reads back."""
    report, loaded = clt_report
    result = report.clts["whole"]
    assert result.error is None, result.error
    assert result.key == "clt:whole" and loaded.config.by_key["clt:whole"].name == "whole"
    assert set(result.verdicts) == {"ce_rec", "kl_div"} and result.passed
    assert result.metrics["ce_rec"].ci is not None
    assert result.metrics["ce_rec"].ci[0] <= result.metrics["ce_rec"].value <= result.metrics["ce_rec"].ci[1]
    assert [row["layer"] for row in result.layers] == list(range(N_LAYERS))
    tokens = torch.from_numpy(np.load(tiny_tokens_file)[:16, :16])
    counted = counted_mask(tokens, report.settings["tokens"]["excluded_ids"])
    _, ce_recon, kl = _reference(tiny_model, tokens, counted, written["jump"][1])
    assert result.metrics["ce_recon"].value == pytest.approx(ce_recon, rel=1e-6)
    assert result.metrics["kl_div"].value == pytest.approx(kl, rel=1e-6)
    back = type(report).from_dict(json.loads(report.to_json()))
    assert back.clts["whole"].metrics["ce_rec"].value == result.metrics["ce_rec"].value
    assert back.clts["whole"].layers == result.layers and back.clts["whole"].status == result.status


def test_clt_gate_can_fail(written, tiny_checkpoint, tiny_tokens_file, tmp_path):
    """A random CLT does not reach ce_rec 0.99: the gate says so (the metric is gated, not just shown)."""
    path = tmp_path / "thresholds.toml"
    path.write_text(_thresholds_text(tiny_checkpoint, tiny_tokens_file, written["relu"][0], "ce_rec = { min = 0.99 }"))
    result = evaluate(load_thresholds(path), progress=False).clts["whole"]
    assert result.error is None and not result.passed and not result.verdicts["ce_rec"].passed


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('name = "whole"', 'name = "a::b"'), r"toml:13: clt\.0\.name: name 'a::b'"),
        (
            lambda t: t.replace("kl_div = { max = 100.0 }", "cosine = { min = 0.5 }"),
            r"toml:15: clt\.0\.gate\.cosine: a splice or CLT gates its joint",
        ),
        (lambda t: t.replace('path = "', 'path = "nowhere/'), r"toml:14: clt\.0\.path: no such transcoder directory"),
        (lambda t: t + 'colour = "red"\n', r"clt\.0\.colour"),
        (lambda t: t + t[t.index("[[clt]]") :], r"toml:17: clt\.1\.name: two \[\[clt\]\] entries are named 'whole'"),
        (
            lambda t: t.replace('name = "whole"', 'name = "whole"\nexpect_fail = ["ce_loss_score"]'),
            r"toml:14: clt\.0\.expect_fail: names metrics without a bound: ce_loss_score",
        ),
    ],
)
def test_bad_clt_field_is_one_line_exit_2(written, tiny_checkpoint, tiny_tokens_file, tmp_path, edit, message):
    """A bad [[clt]] field: one line naming the file, line and field, exit status 2."""
    path = tmp_path / "thresholds.toml"
    path.write_text(edit(_thresholds_text(tiny_checkpoint, tiny_tokens_file, written["relu"][0])))
    with pytest.raises(ConfigError, match=message):
        load_thresholds(path)
    proc = subprocess.run(
        [sys.executable, "-m", "sae_acceptance.cli", "eval", "--config", str(path), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])},
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "thresholds.toml:" in lines[0] and "Traceback" not in proc.stderr


def test_cli_runs_a_clt(written, tiny_checkpoint, tiny_tokens_file, tmp_path):
    """`sae-acceptance eval --config` with a [[clt]]: the CLI table has the CLT and its layers, the
    JSON report its result, the HTML report its name; exit 0 when its gate passes."""
    path = tmp_path / "thresholds.toml"
    path.write_text(_thresholds_text(tiny_checkpoint, tiny_tokens_file, written["set"][0]))
    out, html = tmp_path / "report.json", tmp_path / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "sae_acceptance.cli", "eval", "--config", str(path), "--no-progress"]
        + ["--json", str(out), "--html", str(html)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "transcoder_set, 3 layers" in proc.stdout and "PASS" in proc.stdout
    assert "blocks.2.ln2.hook_normalized  blocks.2.hook_mlp_out" in proc.stdout  # the per-layer table
    data = json.loads(out.read_text())
    assert data["clts"]["whole"]["verdicts"]["ce_rec"]["passed"] is True
    assert len(data["clts"]["whole"]["layers"]) == N_LAYERS
    assert "clt whole" in html.read_text()


def test_pytest_items_of_a_clt(pytester, written, tiny_checkpoint, tiny_tokens_file):
    """`pytest thresholds.toml`: one item per gated metric as `clt:<name>::<metric>`, a failing
    gate fails its item, and the run's JSON report holds the CLT."""
    text = _thresholds_text(tiny_checkpoint, tiny_tokens_file, written["relu"][0], "ce_rec = { min = 0.99 }")
    pytester.path.joinpath("thresholds.toml").write_text(text)
    result = pytester.runpytest("thresholds.toml", "-v", "-p", "no:cacheprovider", "--sae-json", "report.json")
    result.stdout.fnmatch_lines(
        ["*thresholds.toml::clt:whole::ce_rec FAILED*", "*thresholds.toml::clt:whole::kl_div PASSED*"]
    )
    assert result.ret == 1
    data = json.loads((pytester.path / "report.json").read_text())
    assert data["clts"]["whole"]["verdicts"]["ce_rec"]["passed"] is False


def test_baseline_holds_a_clt_and_compares_it(written, tiny_checkpoint, tiny_tokens_file, tmp_path):
    """`--update-baseline` writes the CLT's entry under `clt:<name>`; the next run compares its
    joint metrics with it (same tokens, same CLT: no regression, exit 0)."""
    path = tmp_path / "thresholds.toml"
    path.write_text(_thresholds_text(tiny_checkpoint, tiny_tokens_file, written["jump"][0]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}
    command = [sys.executable, "-m", "sae_acceptance.cli", "eval", "--config", str(path), "--no-progress"]
    first = subprocess.run([*command, "--update-baseline"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    baseline = json.loads((tmp_path / "thresholds.baseline.json").read_text())
    assert list(baseline["saes"]) == ["clt:whole"]
    compared = [*command, "--json", "r.json", "--baseline", "thresholds.baseline.json"]
    second = subprocess.run(compared, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    regressions = json.loads((tmp_path / "r.json").read_text())["clts"]["whole"]["regressions"]
    assert set(regressions) == {"ce_rec", "kl_div"} and all(
        r["status"] == "OK" and r["change"] == 0.0 for r in regressions.values()
    )


def test_shards_and_xdist_runs_place_a_clt_once(written, tiny_checkpoint, tiny_tokens_file, tmp_path):
    """A CLT is evaluated by shard 1 only and by the first xdist run (a CLT-only file included)."""
    from sae_acceptance.shard import Shard, shard_members, xdist_runs

    path = tmp_path / "thresholds.toml"
    path.write_text(_thresholds_text(tiny_checkpoint, tiny_tokens_file, written["relu"][0]))
    loaded = load_thresholds(path)
    assert [shard_members(loaded, Shard(i, 3)) for i in (1, 2, 3)] == [["clt:whole"], [], []]
    assert xdist_runs(loaded, 4) == {"clt:whole": 0}


def test_a_failing_clt_fails_alike_on_every_path(written, tiny_checkpoint, tiny_tokens_file, tmp_path):
    """One failing CLT gate through the CLI, pytest, pytest -n 2, and two shards + merge: exit 1
    everywhere, and every JSON report holds the same CLT verdicts and numbers."""
    pytest.importorskip("xdist", reason="the -n 2 path needs pytest-xdist (the dev extra; not in the TL4 environment)")
    path = tmp_path / "thresholds.toml"
    path.write_text(_thresholds_text(tiny_checkpoint, tiny_tokens_file, written["relu"][0], "ce_rec = { min = 0.99 }"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}

    def run(*args: str) -> int:
        return subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env).returncode

    cli = [sys.executable, "-m", "sae_acceptance.cli"]
    pytest_run = [sys.executable, "-m", "pytest", "thresholds.toml", "-q", "-p", "no:cacheprovider"]
    statuses = {
        "cli": run(*cli, "eval", "--config", str(path), "--no-progress", "--json", "cli.json"),
        "pytest": run(*pytest_run, "--sae-json", "pytest.json"),
        "xdist": run(*pytest_run, "-n", "2", "--sae-json", "xdist.json"),
        "shard 1": run(*cli, "eval", "--config", str(path), "--no-progress", "--shard", "1/2", "--json", "s1.json"),
        "shard 2": run(*cli, "eval", "--config", str(path), "--no-progress", "--shard", "2/2", "--json", "s2.json"),
    }
    statuses["merge"] = run(*cli, "merge", "s1.json", "s2.json", "--json", "merged.json")
    assert {k: v for k, v in statuses.items() if k != "shard 2"} == dict.fromkeys(
        ["cli", "pytest", "xdist", "shard 1", "merge"], 1
    ), statuses
    reports = {
        name: json.loads((tmp_path / f"{name}.json").read_text())["clts"]["whole"]
        for name in ("cli", "pytest", "xdist", "merged")
    }
    for name, clt in reports.items():
        assert clt["verdicts"] == reports["cli"]["verdicts"], name
        assert clt["metrics"] == reports["cli"]["metrics"], name
        assert clt["verdicts"]["ce_rec"]["passed"] is False


def _cached_repo(cache: Path, repo_id: str, files: Path) -> None:
    """`files` as huggingface_hub's cached snapshot of `repo_id` (offline loads find it there)."""
    import shutil

    root = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(files, root / "snapshots" / commit)


def test_a_mntss_release_loads_whole_from_the_hub_cache(written, tmp_path, monkeypatch):
    """`sae-lens://<mntss release>` -> SAELens's directory names the repository, whose top level is
    circuit-tracer's CLT layout: read whole (all layers, every decoder), offline from the cache.
    Another release is refused naming its converter; an uncached one is one line."""
    pytest.importorskip("sae_lens")
    from huggingface_hub import constants

    release = "mntss-gemma-2-2b-2.5m-clt-as-per-layer"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SAEFormatError, match="cannot fetch mntss/clt-gemma-2-2b-2.5M"):
        load_clt(f"sae-lens://{release}")
    _cached_repo(tmp_path / "hub", "mntss/clt-gemma-2-2b-2.5M", written["jump"][0])
    clt = load_clt(f"sae-lens://{release}")
    direct = load_clt(written["jump"][0])
    assert clt.n_layers == N_LAYERS and clt.threshold is not None
    for ours, theirs in zip(clt.W_dec, direct.W_dec, strict=True):
        assert torch.equal(ours, theirs)
    with pytest.raises(SAEFormatError, match="read by 'gemma_2'"):
        load_clt("sae-lens://gemma-scope-2b-pt-res")
