"""thresholds.toml validation: one clear error naming the file, the line and the field."""

from __future__ import annotations

import json

import pytest

from sae_acceptance.config import json_schema, load_thresholds
from sae_acceptance.errors import ConfigError

GOOD = """\
[eval]
data = "tokens.npy"
n_sequences = 8
context_size = 16

[gate]
ce_rec = { min = 0.8, on = "ci_low" }
cosine = { min = 0.9 }

[[sae]]
path = "sae_a"

[[sae]]
name = "second"
path = "sae_b"
gate = { rel_error = { max = 0.5 } }
"""


@pytest.fixture
def write(tmp_path):
    (tmp_path / "sae_a").mkdir()
    (tmp_path / "sae_b").mkdir()
    (tmp_path / "tokens.npy").write_bytes(b"")

    def _write(text: str):
        path = tmp_path / "thresholds.toml"
        path.write_text(text)
        return path

    return _write


def error_of(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_thresholds(path)
    return str(info.value)


def test_a_good_file_loads_with_defaults_and_overrides(write):
    loaded = load_thresholds(write(GOOD))
    config = loaded.config
    assert config.eval.bootstrap_resamples == 5000 and config.eval.seed == 0 and config.eval.confidence == 0.95
    assert [e.display_name for e in config.sae] == ["sae_a", "second"]
    gate = config.gate_for(config.sae[1])
    assert set(gate) == {"ce_rec", "cosine", "rel_error"} and gate["ce_rec"].on == "ci_low"
    assert loaded.line_of("sae", 1) == 13


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("n_sequences = 8", "n_sequences = 8\nbatchsize = 4"), ":4: eval.batchsize: Extra inputs are not permitted"),
        (("n_sequences = 8", 'n_sequences = "many"'), ":3: eval.n_sequences: Input should be a valid integer"),
        (("cosine = { min = 0.9 }", "cosine = { min = 1.5 }"), ":8: gate.cosine: min = 1.5 is outside the range"),
        (("cosine = { min = 0.9 }", "r2 = { min = 0.9 }"), ":8: gate.r2: r2 is never an acceptance test"),
        (("cosine = { min = 0.9 }", "cosnie = { min = 0.9 }"), ":8: gate.cosnie: unknown metric"),
        (('on = "ci_low"', 'on = "lower"'), ":7: gate.ce_rec.on: Input should be 'point', 'ci_low' or 'ci_high'"),
        (("rel_error = { max = 0.5 }", "rel_error = { }"), ":16: sae.1.gate.rel_error: a bound needs `min` or `max`"),
        (('path = "sae_b"', 'path = "missing_sae"'), ":15: sae.1.path: no such SAE directory 'missing_sae'"),
        (('name = "second"', 'name = "sae_a"'), "two [[sae]] entries are named 'sae_a'"),
        (('data = "tokens.npy"', 'data = "nope.npy"'), ":2: eval.data: no such file or directory 'nope.npy'"),
        (
            ("n_sequences = 8", "n_sequences = 8\nseed = -1"),
            ":4: eval.seed: Input should be greater than or equal to 0",
        ),
        (("n_sequences = 8", 'n_sequences = 8\ndevice = "gpu"'), ":4: eval.device: String should match pattern"),
        (("cosine = { min = 0.9 }", "rel_error = { max = inf }"), ":8: gate.rel_error: max must be a finite number"),
        (('name = "second"', 'name = "sae_a"'), ":1: (top level): two [[sae]] entries"),
        (('path = "sae_b"', 'path = "hf://acme"'), ":15: sae.1.path: hf://acme: expected hf://<owner>/<repo>"),
        (('path = "sae_a"', 'path = "sae-lens://release-only"'), ":11: sae.0.path: sae-lens://release-only: expected"),
    ],
)
def test_each_mistake_gets_one_clear_error(write, edit, expected):
    path = write(GOOD.replace(*edit))
    message = error_of(path)
    assert message.startswith(str(path))
    assert expected in message


def test_invalid_toml_names_the_file(write):
    assert "not valid TOML" in error_of(write("[eval\n"))


def test_missing_eval_table(write):
    assert "eval: Field required" in error_of(write(GOOD.split("[gate]")[0].replace("[eval]", "[evaluation]")))


def test_negative_control_needs_a_bound(write):
    path = write(GOOD.replace('path = "sae_a"', 'path = "sae_a"\nexpect_fail = ["kl_div"]'))
    assert "expect_fail names metrics without a bound: kl_div" in error_of(path)


def test_json_schema_describes_every_table():
    schema = json_schema()
    assert {"eval", "gate", "sae", "canyon", "regression"} <= set(schema["properties"])
    json.dumps(schema)  # serialisable for editors


def test_the_shipped_schema_is_current():
    from conftest import REPO

    shipped = json.loads((REPO / "thresholds.schema.json").read_text())
    assert shipped == json_schema(), "regenerate with: sae-acceptance schema --out thresholds.schema.json"


def test_the_embedded_default_is_valid_and_gates_behaviour_first():
    from conftest import REPO

    config = load_thresholds(REPO / "thresholds.toml").config
    assert "ce_rec" in config.gate and "r2" not in config.gate
    assert config.baseline == "thresholds.baseline.json"


def test_regression_items_cover_directed_gated_metrics_and_every_tolerance(write):
    text = GOOD.replace("cosine = { min = 0.9 }", "cosine = { min = 0.9 }\nl0 = { max = 64 }")
    text = text.replace("[[sae]]", "[regression]\nkl_div = { tolerance = 0.02 }\n\n[[sae]]", 1)
    config = load_thresholds(write(text)).config
    # l0 is gated but has no better direction: nothing to regress on; kl_div has a tolerance
    assert config.regressed_for(config.sae[0]) == ["ce_rec", "cosine", "kl_div"]
    assert config.regressed_for(config.sae[1]) == ["ce_rec", "cosine", "rel_error", "kl_div"]
