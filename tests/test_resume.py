"""`run(resume=True)`: a run interrupted after any epoch and resumed trains exactly the epochs an
uninterrupted run trains, and resuming a finished run trains nothing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import write_colour_dataset

from trainer.cli import main as trainer_main
from trainer.learner import ConvLearner
from trainer.recipe import RunConfig, run

# 16 training images in batches of 4 at 32 px. A fixed lr skips both lr_finds; epochs: 0 the head on
# precomputed activations, 1-2 the head with augmentation, 3 all layers (one cycle of 1 epoch).
SMALL = {
    "size": 32,
    "bs": 4,
    "lr": 1e-2,
    "head_epochs": 1,
    "aug_cycles": 2,
    "unfreeze_cycles": 1,
    "num_workers": 0,
    "seed": 3,
}


class Interrupted(Exception):
    """Stands in for Ctrl-C or a kill: raised right after an epoch's checkpoint is written."""


def interrupt_after(monkeypatch, n_epochs: int) -> None:
    """Stop the next run once n_epochs epochs are trained and checkpointed: the same point a kill
    between two epochs leaves, without racing a process on a fast machine."""
    fit = ConvLearner.fit

    def fit_then_stop(self, *args, on_epoch_end, **kwargs):
        def end(epochs: int) -> None:
            on_epoch_end(epochs)  # the recipe's checkpoint
            if len(self.history) == n_epochs:
                raise Interrupted

        return fit(self, *args, on_epoch_end=end, **kwargs)

    monkeypatch.setattr(ConvLearner, "fit", fit_then_stop)


def history_rows(out: Path) -> list[list[str]]:
    with open(out / "history.csv", newline="") as f:
        return list(csv.reader(f))


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_colour_dataset(tmp_path_factory.mktemp("resume") / "colours", {"train": 8, "valid": 4})


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """(run folder, learner, metrics) of the run to reproduce, trained in one go."""
    out = tmp_path_factory.mktemp("whole") / "run"
    learn, metrics = run(RunConfig(data=data, out=out, **SMALL), log=quiet)
    return out, learn, metrics


class TestResumeReproducesTheRun:
    @pytest.mark.parametrize(
        ("stop_after", "num_workers"),
        [
            (2, 0),  # after the first augmented epoch, in the middle of its stage (issue 12's case)
            (3, 0),  # after the last augmented epoch: the next stage unfreezes
            (2, 2),  # with worker processes, which die with the run and start afresh on resume
        ],
    )
    def test_same_epochs_as_an_uninterrupted_run(
        self, uninterrupted, data, tmp_path, monkeypatch, stop_after, num_workers
    ):
        whole, whole_learn, whole_metrics = uninterrupted
        cfg = RunConfig(data=data, out=tmp_path / "run", **{**SMALL, "num_workers": num_workers})
        with monkeypatch.context() as m:
            interrupt_after(m, stop_after)
            with pytest.raises(Interrupted):
                run(cfg, log=quiet)
        assert len(history_rows(cfg.out)) == 1 + stop_after
        lines: list[str] = []
        learn, metrics = run(cfg, log=lines.append, resume=True)
        assert any(line.startswith("resumed: stage") for line in lines), lines

        # The epoch-level randomness (order and augmentation) depends on (seed, epoch) alone, so
        # the numbers are the same ones, not merely close; with workers too, since no sample's
        # augmentation depends on which process reads it.
        assert history_rows(cfg.out) == history_rows(whole)
        assert [vars(h) for h in learn.history] == [vars(h) for h in whole_learn.history]
        assert metrics == pytest.approx(whole_metrics, abs=1e-6)


def forbid_training(monkeypatch) -> None:
    def train(*args, **kwargs):
        raise AssertionError("a run whose training was complete trained again")

    monkeypatch.setattr(ConvLearner, "fit", train)
    monkeypatch.setattr(ConvLearner, "lr_find", train)


class TestResumingAFinishedRun:
    def test_says_it_is_complete_and_trains_nothing(self, uninterrupted, data, monkeypatch):
        whole, whole_learn, whole_metrics = uninterrupted
        before = history_rows(whole)
        forbid_training(monkeypatch)
        lines: list[str] = []
        learn, metrics = run(RunConfig(data=data, out=whole, **SMALL), log=lines.append, resume=True)
        text = "\n".join(lines)
        assert "already complete (4 epochs" in text and "resumed: stage" not in text, text
        assert metrics == whole_metrics
        assert [vars(h) for h in learn.history] == [pytest.approx(vars(h), abs=1e-6) for h in whole_learn.history]
        assert history_rows(whole) == before

    def test_the_cli_exits_0(self, uninterrupted, monkeypatch, capsys):
        whole, _, _ = uninterrupted
        forbid_training(monkeypatch)
        assert trainer_main(["run", "--out", str(whole), "--resume"]) == 0
        out = capsys.readouterr().out
        assert "already complete" in out and "resumed: stage" not in out, out

    def test_interrupted_while_exporting_it_exports_without_training(self, uninterrupted, data, tmp_path, monkeypatch):
        whole, _, whole_metrics = uninterrupted
        cfg = RunConfig(data=data, out=tmp_path / "run", **SMALL)
        with monkeypatch.context() as m:
            m.setattr("trainer.export.export", lambda *a, **k: (_ for _ in ()).throw(Interrupted()))
            with pytest.raises(Interrupted):
                run(cfg, log=quiet)
        assert not (cfg.out / "bundle").exists()
        forbid_training(monkeypatch)
        lines: list[str] = []
        _, metrics = run(cfg, log=lines.append, resume=True)
        assert "resumed: training is complete (4 epochs); evaluating and exporting" in lines, lines
        assert (cfg.out / "bundle" / "model.onnx").is_file()
        assert metrics == pytest.approx(whole_metrics, abs=1e-6)
        assert history_rows(cfg.out) == history_rows(whole)
