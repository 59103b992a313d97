"""The HTML report: parses, one section per SAE and splice with its verdicts, images that decode,
nothing fetched, and rendered by headless Chromium without console errors into a non-blank PNG."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from conftest import identity_sae, random_topk_sae
from PIL import Image

from sae_acceptance.config import thresholds_from_mapping
from sae_acceptance.evaluate import evaluate
from sae_acceptance.html_report import write_html
from sae_acceptance.sources.sae_io import save_sae
from sae_acceptance.verdict import RegressionCheck, Status

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections: dict[str, str] = {}  # h2 id -> its text
        self.images: list[str] = []
        self.urls: list[str] = []
        self.scripts = 0
        self._h2: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2" and "id" in attrs:
            self._h2 = attrs["id"]
            self.sections[self._h2] = ""
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith(("data:", "#")):
                self.urls.append(attrs[key])

    def handle_endtag(self, tag):
        if tag == "h2":
            self._h2 = None

    def handle_data(self, data):
        if self._h2 is not None:
            self.sections[self._h2] += data


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_checkpoint, tiny_tokens_file):
    root = tmp_path_factory.mktemp("html")
    save_sae(identity_sae(hook=HOOKS[0]), root / "good")
    save_sae(random_topk_sae(k=2, hook=HOOKS[1], scale=3.0), root / "bad")
    save_sae(random_topk_sae(k=4, hook=HOOKS[1], seed=1), root / "control")
    loaded = thresholds_from_mapping(
        {
            "eval": {
                "data": str(tiny_tokens_file),
                "model": str(tiny_checkpoint),
                "n_sequences": 16,
                "context_size": 16,
                "bootstrap_resamples": 200,
            },
            "gate": {"ce_rec": {"min": 0.99}, "cosine": {"min": 0.5}},
            "sae": [
                {"path": str(root / "good")},
                {"path": str(root / "bad"), "gate": {"dense_frac": {"max": 0.5}}},
                {"path": str(root / "control"), "expect_fail": ["ce_rec"]},
            ],
            "splice": [{"name": "pair", "saes": ["good", "bad"], "gate": {"ce_rec": {"min": 0.999}}}],
        },
        source="test",
        base=root,
    )
    report = evaluate(loaded, progress=False)
    message = "ce_rec 1.0000 -> 1.0000: change +0.0000"
    report.saes["good"].regressions = {"ce_rec": RegressionCheck("ce_rec", Status.OK, message, 0.0, (0.0, 0.0))}
    path = write_html(root / "report.html", report)
    return path, report


def test_the_page_parses_with_a_section_per_sae_and_splice(page):
    path, report = page
    text = path.read_text()
    parser = _Page()
    parser.feed(text)
    assert set(parser.sections) == {"sae-good", "sae-bad", "sae-control", "splice-pair"}
    assert "PASS" in parser.sections["sae-good"] and "FAIL" in parser.sections["sae-bad"]
    assert "CAUGHT (control)" in parser.sections["sae-control"]
    assert "FAIL" in parser.sections["splice-pair"]
    assert "caught (control)" in text and "FAILED" in text  # each verdict, controls labelled as such
    for metric in ("ce_rec", "cosine", "dense_frac"):
        assert f">{metric}<" in text
    assert "Against the baseline" in text and "paired interval" in text
    assert parser.scripts == 0 and parser.urls == []  # nothing to run, nothing fetched
    # per SAE: a figure per gated metric (2, 3, 2), the density histogram, the PR profile, the error's
    # propagation; the overview and the R² scatter; the splice's gated metric
    assert len(parser.images) == 2 + (2 + 3 + 2) + 3 * 3 + 1
    assert "<h3>Why</h3>" in text and "error_kl_ratio" in text and "The contexts the reconstruction hurts most" in text
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        image.load()
        assert image.size[0] > 100 and image.size[1] > 100


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian's `chromium` package; .ci/run installs it)")
def test_headless_chromium_renders_it_without_console_errors(page, tmp_path):
    path, _ = page
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--hide-scrollbars",
            "--window-size=1200,1600",
            f"--screenshot={shot}",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 1600)
    low, high = image.getextrema()
    assert high - low > 100  # not blank: text and figures on the page
    assert sum(image.histogram()[:128]) > 5000  # dark pixels: the text and the figures
