"""trainer.outputs.report: one self-contained, escaped HTML page with metrics, epochs, images and config."""

from __future__ import annotations

import base64
import math
import re

import pytest
from PIL import Image

from trainer.outputs.report import write_report

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


SUMMARY = {"classes": ["ants", "bees"], "images": {"valid": 78, "train": 320}, "held_out": True}


def headers(page: str) -> list[list[str]]:
    """The header cells of every table, in page order."""
    return [re.findall(r"<th>(.*?)</th>", head) for head in re.findall(r"<thead>(.*?)</thead>", page)]


class TestDataSummary:
    def test_shown_first(self, run_dir):
        page = report(run_dir, data_summary=SUMMARY)
        assert page.index("<h2>Data</h2>") < page.index("<h2>Metrics</h2>") < page.index("<h2>Epochs</h2>")
        assert "<td>classes</td><td>2</td>" in page
        assert "<td>class names</td><td>ants, bees</td>" in page
        assert "<td>validation held out</td><td>yes</td>" in page

    def test_splits_in_order(self, run_dir):
        page = report(run_dir, data_summary={"images": {"test": 5, "valid": 78, "train": 320}})
        rows = re.findall(r"<td>(\w+) images</td><td>(\d+)</td>", page)
        assert rows == [("train", "320"), ("valid", "78"), ("test", "5")]

    @pytest.mark.parametrize("n", [20, 21])
    def test_class_names_listed_up_to_twenty(self, run_dir, n):
        names = [f"class_{i}" for i in range(n)]
        page = report(run_dir, data_summary={"classes": names})
        assert f"<td>classes</td><td>{n}</td>" in page
        assert ("class_19" in page) == (n <= 20)

    def test_not_held_out_said_plainly_near_the_metrics(self, run_dir):
        page = report(run_dir, data_summary={**SUMMARY, "held_out": False})
        warning = page.index('<p class="warning">')
        assert page.index("<h2>Metrics</h2>") < warning < page.index("<td>accuracy</td>")
        text = re.sub(r"<[^>]+>", "", page[warning : page.index("</p>", warning)])
        assert "validation scores are NOT held out" in text and "trained on its validation images" in text
        assert "--full" in text
        assert "<td>validation held out</td><td>no: the model trained on these images too</td>" in page

    @pytest.mark.parametrize("summary", [None, SUMMARY, {"classes": ["a", "b"]}])
    def test_no_warning_when_held_out_or_unknown(self, run_dir, summary):
        page = report(run_dir, data_summary=summary)
        assert 'class="warning"' not in page and "NOT held out" not in page
        assert ("<h2>Data</h2>" in page) == (summary is not None)


class TestMostConfused:
    def test_table(self, run_dir):
        page = report(run_dir, most_confused=[("bees", "ants", 4), ("ants", "<bees>", 1)])
        assert "<h2>Most confused pairs (actual, predicted, count)</h2>" in page
        assert ["actual", "predicted", "count"] in headers(page)
        assert "<tr><td>bees</td><td>ants</td><td>4</td></tr>" in page
        assert "<tr><td>ants</td><td>&lt;bees&gt;</td><td>1</td></tr>" in page

    def test_empty_and_absent(self, run_dir):
        assert "(no confused pairs)" in report(run_dir, most_confused=[])
        assert "Most confused" not in report(run_dir)


STAGED = [
    dict(epoch=0, stage="head (precomputed)", trn_loss=0.9, val_loss=0.5, accuracy=0.8, seconds=1.234),
    dict(epoch=1, stage="head + augmentation", trn_loss=0.4, val_loss=0.3, accuracy=0.9, seconds=12.06),
    dict(epoch=2, stage="unfrozen at 224 px", trn_loss=0.2, val_loss=0.25, accuracy=0.93, seconds=30),
]


class TestEpochColumns:
    def test_all_columns_in_order_header_once(self, run_dir):
        # Keys given in another order come out in EPOCH_COLUMNS' order.
        history = [dict(reversed(list(row.items()))) for row in STAGED]
        page = report(run_dir, history=history)
        assert headers(page).count(["epoch", "stage", "trn_loss", "val_loss", "accuracy", "seconds"]) == 1
        assert (
            "<td>1</td><td>head + augmentation</td><td>0.40000</td><td>0.30000</td><td>0.90000</td><td>12.1</td>"
            in page
        )
        assert "<td>unfrozen at 224 px</td>" in page and "<td>30.0</td>" in page

    def test_old_four_key_rows(self, run_dir):
        assert ["epoch", "trn_loss", "val_loss", "accuracy"] in headers(report(run_dir))

    def test_row_lacking_a_key_has_an_empty_cell_and_extra_keys_come_last(self, run_dir):
        history = [*STAGED[:1], dict(epoch=1, trn_loss=0.4, val_loss=0.3, accuracy=0.9, lr=0.01)]
        page = report(run_dir, history=history)
        assert ["epoch", "stage", "trn_loss", "val_loss", "accuracy", "seconds", "lr"] in headers(page)
        assert "<td>1</td><td></td><td>0.40000</td><td>0.30000</td><td>0.90000</td><td></td><td>0.01000</td>" in page
