"""SAEs named on the Hugging Face Hub (``hf://``, ``sae-lens://``), loaded through its cache.

The cache is built here in huggingface_hub's own layout (``models--owner--repo``
with ``refs/main`` and ``snapshots/<commit>``) and the hub is offline (conftest),
so `snapshot_download` takes the path it takes on a machine that downloaded the
repository before: the same code as with a network, from local inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import random_topk_sae

from sae_acceptance.config import load_thresholds
from sae_acceptance.errors import SAEFormatError
from sae_acceptance.evaluate import evaluate
from sae_acceptance.sources.hub import locate_sae
from sae_acceptance.sources.model import ModelCache
from sae_acceptance.sources.sae_io import load_sae, save_sae
from sae_acceptance.sources.spec import is_remote

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SAELENS_REPO = "ctigges/pythia-70m-deduped__res-sm_processed"  # release pythia-70m-deduped-res-sm


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache in use; `put(repo_id, folder, sae)` adds an SAE to it."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))

    def put(repo_id: str, folder: str, sae) -> Path:
        repo = root / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        return save_sae(sae, repo / "snapshots" / COMMIT / folder)

    return put


def assert_same_sae(a, b) -> None:
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.architecture, a.k, a.hook_name) == (b.architecture, b.k, b.hook_name)


def test_hf_folder_loads_like_the_local_directory(hub_cache):
    local = hub_cache("acme/topk-saes", "layers/3", random_topk_sae(hook="blocks.1.hook_resid_post"))
    expected = load_sae(local)
    for spec in ("hf://acme/topk-saes/layers/3", f"hf://acme/topk-saes@{COMMIT}/layers/3/"):
        assert is_remote(spec)
        assert locate_sae(spec) == local
        assert_same_sae(load_sae(spec), expected)
    assert not is_remote(local) and locate_sae(local) == local


def test_hub_errors_name_the_spec_and_what_is_missing(hub_cache):
    local = hub_cache("acme/topk-saes", "layers/3", random_topk_sae())
    with pytest.raises(
        SAEFormatError, match=r"^hf://acme/absent/x: cannot fetch acme/absent from the Hugging Face Hub"
    ):
        load_sae("hf://acme/absent/x")
    with pytest.raises(SAEFormatError, match=r"cannot fetch acme/topk-saes@v2 "):
        load_sae("hf://acme/topk-saes@v2/layers/3")
    with pytest.raises(
        SAEFormatError,
        match=r"cached copy of acme/topk-saes has no SAE files at its folder 'layers/4' \(HF_HUB_OFFLINE",
    ):
        load_sae("hf://acme/topk-saes/layers/4")
    for bad in ("hf://acme", "hf://acme/topk-saes@/layers/3", "hf://acme/topk-saes/../other/x", "hf://acme//x"):
        with pytest.raises(SAEFormatError, match=r"expected hf://<owner>/<repo>\[@<revision>\]"):
            load_sae(bad)
    with pytest.raises(SAEFormatError, match=r"SAEs are read from model repositories, not datasets"):
        load_sae("hf://datasets/acme/tokens/x")
    (local / "cfg.json").write_text("{broken")  # a problem inside the fetched folder names the spec
    with pytest.raises(SAEFormatError, match=r"^hf://acme/topk-saes/layers/3: .*cfg.json:1: not valid JSON"):
        load_sae("hf://acme/topk-saes/layers/3")


def test_revisions_with_a_slash_are_percent_encoded_and_names_come_from_the_spec():
    from sae_acceptance.sources.spec import default_name, parse_hf

    assert parse_hf("hf://acme/saes@refs%2Fpr%2F3/layers.3") == ("acme/saes", "refs/pr/3", "layers.3")
    assert parse_hf("hf://acme/saes") == ("acme/saes", None, "")
    assert default_name("hf://EleutherAI/sae-pythia-70m-32k@main/layers.3") == "sae-pythia-70m-32k-layers.3"
    assert default_name("sae-lens://gemma-scope-2b-pt-res/layer_3/width_16k/canonical") == (
        "gemma-scope-2b-pt-res-layer_3-width_16k-canonical"
    )


@pytest.mark.parametrize(
    "spec",
    [
        "hf://acme/saes@..%2F..%2F..%2Fevilref/sae",  # the revision steps out of the cache's refs
        "hf://acme/saes@refs%2F..%2F..%2Fx/sae",
        "hf://acme/saes/%2E%2E/other",
        "hf://acme/saes/layers%2F..%2F..%2Fx",
        "hf://acme/saes/a%00b",
        "hf://acme/saes/a%5Cb",
        "hf://%2E%2E/saes/x",
        "hf://acme/sa%2Fes/x",
        "sae-lens://release/..%2F..%2Fx",
        "sae-lens://re%0Alease/x",
    ],
)
def test_every_part_of_a_hub_name_is_checked_percent_decoded(spec):
    from sae_acceptance.sources.spec import check_spec

    with pytest.raises(SAEFormatError, match=r"^(hf|sae-lens)://\S+: its .*; refused$"):
        check_spec(spec)


def test_a_ref_that_leads_out_of_the_cache_is_refused(hub_cache, tmp_path):
    """huggingface_hub follows a ref file wherever the revision points; what it resolves must
    still be inside the cache, whatever reached it."""
    from sae_acceptance.sources.hub import fetch_folder

    hub_cache("acme/saes", "sae", random_topk_sae())
    outside = save_sae(random_topk_sae(), tmp_path / "elsewhere" / "sae")
    (tmp_path / "evilref").write_text("../../../elsewhere")  # read as refs/../../../evilref
    with pytest.raises(SAEFormatError, match=r"outside the Hugging Face cache"):
        fetch_folder("hf://acme/saes@x/sae", "acme/saes", "../../../evilref", "sae")
    assert outside.is_dir()


def test_saelens_release_ids_resolve_through_saelens_directory(hub_cache):
    local = hub_cache(SAELENS_REPO, "0-res-sm", random_topk_sae(hook="blocks.0.hook_resid_post"))
    sae = load_sae("sae-lens://pythia-70m-deduped-res-sm/blocks.0.hook_resid_post")
    assert_same_sae(sae, load_sae(local))
    with pytest.raises(
        SAEFormatError, match=r"no SAELens release 'pythia-70m-dedup-res-sm' \(did you mean 'pythia-70m-deduped-res-sm'"
    ):
        load_sae("sae-lens://pythia-70m-dedup-res-sm/blocks.0.hook_resid_post")
    with pytest.raises(
        SAEFormatError, match=r"has no SAE 'blocks.0.hook_resid_pots' \(did you mean 'blocks.0.hook_resid_post'"
    ):
        load_sae("sae-lens://pythia-70m-deduped-res-sm/blocks.0.hook_resid_pots")
    with pytest.raises(
        SAEFormatError,
        match=r"^sae-lens://gemma-scope-2-4b-pt-res-all/layer_0_width_16k_l0_small: SAELens's 'gemma_3' loader failed \(LocalEntryNotFoundError",
    ):
        load_sae("sae-lens://gemma-scope-2-4b-pt-res-all/layer_0_width_16k_l0_small")  # not in the offline cache
    with pytest.raises(
        SAEFormatError,
        match=r"conversion function 'mntss_clt_layer_transcoder' is refused: SAELens loads one layer of a cross-layer transcoder",
    ):
        load_sae("sae-lens://mntss-gemma-2-2b-2.5m-clt-as-per-layer/layer_0")
    with pytest.raises(SAEFormatError, match=r"expected sae-lens://<release>/<sae_id>"):
        load_sae("sae-lens://pythia-70m-deduped-res-sm")


def test_a_thresholds_file_gates_a_hub_sae_as_it_gates_the_local_copy(
    hub_cache, tmp_path, tiny_checkpoint, tiny_tokens_file
):
    local = hub_cache("acme/topk-saes", "layers/1", random_topk_sae(hook="blocks.1.hook_resid_post"))
    path = tmp_path / "thresholds.toml"
    path.write_text(
        f"""\
[eval]
model = "{tiny_checkpoint}"
data = "{tiny_tokens_file}"
n_sequences = 16
context_size = 16
bootstrap_resamples = 200

[gate]
cosine = {{ min = 0.0 }}

[[sae]]
name = "local"
path = "{local}"

[[sae]]
name = "hub"
path = "hf://acme/topk-saes/layers/1"
"""
    )
    models = ModelCache()
    report = evaluate(load_thresholds(path), progress=False, models=models)
    hub, local_result = report.saes["hub"], report.saes["local"]
    assert hub.error is None and hub.path == "hf://acme/topk-saes/layers/1"
    seeded_by_name = {"ce_random", "kl_random", "error_kl_ratio"}  # the random control's draws follow the name
    assert {m: v for m, v in hub.metrics.items() if m not in seeded_by_name} == {
        m: v for m, v in local_result.metrics.items() if m not in seeded_by_name
    }
    assert hub.metrics and seeded_by_name <= set(hub.metrics)

    # a hub SAE that cannot be fetched is that SAE's error, not the file's
    path.write_text(path.read_text().replace("hf://acme/topk-saes/layers/1", "hf://acme/topk-saes/layers/9"))
    report = evaluate(load_thresholds(path), progress=False, models=models)
    assert report.saes["local"].error is None
    assert report.saes["hub"].error.startswith("hf://acme/topk-saes/layers/9: the cached copy")
