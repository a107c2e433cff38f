"""bench/training.py works: its quick path on a tiny subset, the fastai section's skip, and the
memory poller against a process of known size (its figures are in bench/README.md)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import bench_module, hymenoptera_or_skip

training = bench_module("training")


def test_quick_sections_print_a_table_then_the_ratios(tmp_path, capsys, monkeypatch):
    data = hymenoptera_or_skip()
    monkeypatch.setattr(training, "PAUSE_S", 0.0)
    out = tmp_path / "figures.json"
    argv = ["--quick", "--data", str(data), "--sections", "fit,precompute,pipeline,fastai", "--reps", "1"]
    assert training.main([*argv, "--fastai-python", str(tmp_path / "absent"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fastai: skipped" in printed and "absent" in printed
    last = printed.strip().splitlines()[-4:]
    assert last[0].startswith("fit epoch / hand-written epoch: ") and "target <= 1.05" in last[0]
    assert last[1].startswith("backbone epoch / cached epoch: ")
    figures = json.loads(out.read_text())
    measures = {r["measure"]: r for r in figures["rows"]}
    assert measures["ConvLearner.fit, one epoch"]["value"] > 0
    assert measures["decode + augment (training loader)"]["unit"] == "img/s"
    assert len(figures["ratios"]) == 4
    assert all(r["value"] > 0 for r in figures["ratios"])
    assert figures["skipped"]


def test_peak_memory_sees_a_child_of_known_size():
    grab = "import time; b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096]); print('held'); time.sleep(1)"
    peak = training.peak_memory([sys.executable, "-c", grab], interval=0.05)
    assert peak.returncode == 0 and peak.output.strip() == "held"
    assert 0.3e9 <= peak.main_rss < 0.5e9
    assert 0.3e9 <= peak.tree_pss < 0.5e9
    assert peak.processes == 1


@pytest.mark.parametrize(
    "value, target, verdict", [(1.01, "<= 1.05", "met"), (1.2, "<= 1.05", "NOT met"), (40, ">= 50", "NOT met")]
)
def test_ratio_line_says_whether_the_target_is_met(value, target, verdict):
    line = training.ratio_line(training.Ratio("x / y", value, target))
    assert line.endswith(f"(target {target}: {verdict})")
