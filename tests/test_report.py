"""trainer.report: one self-contained, escaped HTML page with metrics, epochs, images and config."""

from __future__ import annotations

import base64
import math
import re

import pytest
from PIL import Image

from trainer.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "plots").mkdir(parents=True)
    Image.new("RGB", (120, 110), "navy").save(run / "plots" / "losses.png")
    Image.new("RGB", (130, 120), "teal").save(tmp_path / "elsewhere.png")
    return run


def report(run_dir, **overrides):
    kwargs = dict(
        title="ants vs bees <run 1>",
        config={"arch": "efficientnet_lite0", "lr": 0.01, "note": "<script>alert(1)</script>"},
        metrics={"accuracy": 0.9473684, "log_loss": 0.1234567, "images": 153},
        history=[
            dict(epoch=0, trn_loss=0.61234, val_loss=0.45678, accuracy=0.8),
            dict(epoch=1, trn_loss=math.nan, val_loss=0.31, accuracy=0.91),
        ],
        images=[("losses", "plots/losses.png"), ("absolute", str(run_dir.parent / "elsewhere.png"))],
        tables={"most incorrect": [["file", "p"], ["bees/1.jpg", 0.93]]},
    )
    kwargs.update(overrides)
    path = write_report(run_dir, **kwargs)
    assert path == run_dir / "report.html"
    return path.read_text(encoding="utf-8")


class TestReport:
    def test_metrics_and_epochs(self, run_dir):
        page = report(run_dir)
        assert "<td>accuracy</td><td>0.94737</td>" in page
        assert "<td>images</td><td>153</td>" in page
        assert "<td>0</td><td>0.61234</td><td>0.45678</td><td>0.80000</td>" in page
        assert "<td>1</td><td>nan</td><td>0.31000</td><td>0.91000</td>" in page

    def test_images_embedded_as_png(self, run_dir):
        page = report(run_dir)
        uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
        assert len(uris) == 2
        for uri in uris:
            assert base64.b64decode(uri).startswith(PNG_MAGIC)

    def test_escaped(self, run_dir):
        page = report(run_dir)
        assert "<script>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "ants vs bees &lt;run 1&gt;" in page

    def test_self_contained(self, run_dir):
        page = report(run_dir)
        for attr in ("src", "href"):
            assert not re.search(rf'{attr}\s*=\s*["\']?(https?:|//)', page, re.IGNORECASE)
        assert "<script" not in page.lower() and "<link" not in page.lower()

    def test_missing_image_named(self, run_dir):
        page = report(run_dir, images=[("confusion", "plots/confusion.png"), ("losses", "plots/losses.png")])
        assert "missing: plots/confusion.png" in page
        assert page.count("data:image/png;base64,") == 1

    def test_extra_tables(self, run_dir):
        page = report(run_dir)
        assert "<h2>most incorrect</h2>" in page
        assert "<th>file</th><th>p</th>" in page and "<td>bees/1.jpg</td><td>0.93000</td>" in page

    def test_empty_inputs_and_new_folder(self, tmp_path):
        run = tmp_path / "new" / "run"
        path = write_report(run, title="t", config={}, metrics={}, history=[], images=[])
        assert path.is_file() and "(no epochs)" in path.read_text()

    def test_rewrite_leaves_no_temporary_files(self, run_dir):
        report(run_dir)
        report(run_dir)
        assert sorted(p.name for p in run_dir.iterdir()) == ["plots", "report.html"]
