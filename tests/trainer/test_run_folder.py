"""RunFolder: the one owner of a run's files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from serving.bundle.manifest import MANIFEST_NAME
from trainer.config import RunConfig
from trainer.learn.history import EpochStats
from trainer.outputs.run_folder import RunFolder


@pytest.fixture
def folder(tmp_path) -> RunFolder:
    return RunFolder(tmp_path / "run")


class TestConfig:
    def test_round_trip(self, folder):
        cfg = RunConfig(out=folder.path, size=64, lr=0.01)
        folder.write_config(cfg)
        assert folder.has_config() and folder.read_config() == cfg

    def test_a_folder_without_config_names_the_file(self, folder):
        with pytest.raises(FileNotFoundError, match=r"run/config.json: missing; pass the folder a `trainer run` wrote"):
            folder.read_config()


class TestHistory:
    def test_round_trip_keeps_stage_and_time(self, folder):
        folder.path.mkdir()
        rows = [
            EpochStats(0, math.nan, 0.5, 0.75, "head on precomputed activations", 1.25),
            EpochStats(1, 0.4, 0.3, 0.875, "all layers unfrozen at 224 px", 30.5),
        ]
        folder.write_history(rows)
        back = folder.read_history()
        assert [(h.epoch, h.stage, h.seconds) for h in back] == [(r.epoch, r.stage, r.seconds) for r in rows]
        assert math.isnan(back[0].trn_loss) and back[1].accuracy == 0.875
        assert folder.history_file.read_text().splitlines()[0] == "epoch,stage,trn_loss,val_loss,accuracy,seconds"

    def test_a_history_from_before_stages_reads_with_defaults(self, folder):
        folder.path.mkdir()
        folder.history_file.write_text("epoch,trn_loss,val_loss,accuracy\n0,0.5,0.4,0.9\n")
        (h,) = folder.read_history()
        assert (h.epoch, h.accuracy, h.stage) == (0, 0.9, "") and math.isnan(h.seconds)

    def test_no_history_is_empty(self, folder):
        assert folder.read_history() == []


class TestMetrics:
    @pytest.mark.parametrize("held_out", [True, False])
    def test_round_trip_says_whether_held_out(self, folder, held_out):
        folder.path.mkdir()
        folder.write_metrics({"accuracy": 0.5, "accuracy_tta": 0.75}, held_out=held_out)
        assert json.loads(folder.metrics_file.read_text())["held_out"] is held_out
        assert folder.read_metrics() == ({"accuracy": 0.5, "accuracy_tta": 0.75}, held_out)

    def test_metrics_from_before_the_flag_count_as_held_out(self, folder):
        folder.path.mkdir()
        folder.metrics_file.write_text('{"accuracy": 0.5}')
        assert folder.read_metrics() == ({"accuracy": 0.5}, True)


class TestCheckpoint:
    def test_none_without_a_checkpoint(self, folder):
        assert folder.read_checkpoint(RunConfig(out=folder.path)) is None

    def test_other_settings_are_refused(self, folder):
        folder.path.mkdir()
        cfg = RunConfig(out=folder.path)
        folder.write_checkpoint({"config": cfg.model_dump(mode="json")})
        assert folder.read_checkpoint(cfg) == {"config": cfg.model_dump(mode="json")}
        with pytest.raises(ValueError, match="made with other settings; resume with the same flags"):
            folder.read_checkpoint(cfg.model_copy(update={"size": 128}))

    def test_a_damaged_checkpoint_says_what_to_do(self, folder):
        folder.path.mkdir()
        folder.checkpoint_file.write_bytes(b"not a checkpoint")
        with pytest.raises(ValueError, match=r"cannot read the checkpoint .*delete it to start the run afresh") as e:
            folder.read_checkpoint(RunConfig(out=folder.path))
        assert "weights_only" not in str(e.value)  # torch's advice to unpickle anything is not passed on


def test_snapshots_in_training_order(folder):
    folder.models_dir.mkdir(parents=True)
    for name in ["snapshot_64_cyc_10", "snapshot_64_cyc_2", "snapshot_32_cyc_0", "final", "snapshot_64_cyc_0"]:
        (folder.models_dir / f"{name}.pt").write_bytes(b"")
    assert folder.snapshots() == ["snapshot_32_cyc_0", "snapshot_64_cyc_0", "snapshot_64_cyc_2", "snapshot_64_cyc_10"]


def test_a_learner_needs_final_weights_and_says_how_to_get_them(folder):
    folder.write_config(RunConfig(out=folder.path))
    with pytest.raises(FileNotFoundError, match=r"models/final.pt: missing; .*trainer run --resume --out"):
        folder.learner()


class TestOutdatedNote:
    def _age(self, path: Path, seconds_ago: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        t = path.stat().st_mtime - seconds_ago
        os.utime(path, (t, t))

    def test_after_fit_the_older_bundle_report_and_metrics_are_named_with_their_fixes(self, folder):
        self._age(folder.bundle_dir / MANIFEST_NAME, 60)
        self._age(folder.report_file, 60)
        self._age(folder.metrics_file, 60)
        self._age(folder.final_weights, 0)
        note = folder.outdated_note("trainer fit", metrics_too=True)
        assert note is not None
        assert "metrics.json, bundle/, report.html" in note and "before `trainer fit`" in note
        assert (
            "trainer export --run" in note and "trainer tta --run" in note and "written only by `trainer run`" in note
        )

    def test_nothing_older_than_the_weights_gives_no_note(self, folder):
        self._age(folder.final_weights, 60)
        self._age(folder.bundle_dir / MANIFEST_NAME, 0)
        self._age(folder.report_file, 0)
        assert folder.outdated_note("trainer tta") is None


@pytest.mark.parametrize("full", [False, True])
def test_the_report_summarises_the_data_and_says_when_scores_are_not_held_out(folder, full):
    """write_report reads only these parts of a learner; a --full run's training set includes the
    validation images, and the summary counts them once."""
    folder.path.mkdir()
    val = [Path(f"v{i}.png") for i in range(4)]
    trn = [Path(f"t{i}.png") for i in range(10)] + (val if full else [])
    learn = SimpleNamespace(
        data=SimpleNamespace(
            classes=["a", "b", "c"], trn_files=trn, val_files=val, test_files=None, tfms=SimpleNamespace(sz=32)
        ),
        history=[EpochStats(0, 0.5, 0.4, 0.75, "head on precomputed activations", 2.0)],
    )
    probs = np.eye(3)[[0, 1, 2, 1]]
    y = np.array([0, 1, 2, 2])
    page = folder.write_report(RunConfig(out=folder.path, full=full), learn, {"accuracy": 0.75}, probs, y).read_text()
    assert ("NOT held out" in page) is full
    assert "<td>train images</td><td>10</td>" in page and "head on precomputed activations" in page
    assert "Most confused" in page
