"""`run(resume=True)`: a run interrupted after any epoch and resumed trains exactly the epochs an
uninterrupted run trains, to the same weights, and resuming a finished run trains nothing.

(A real SIGKILL of `trainer run` and `--resume` through the console script: tests/trainer/test_trainer_cli.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import differing_tensors, epochs_as_trained, write_colour_dataset

from trainer.cli import main as trainer_main
from trainer.config import RunConfig
from trainer.learn.learner import ConvLearner
from trainer.recipe import run

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


def without_time(learn: ConvLearner) -> list[dict]:
    """The learner's epochs less their wall time, which no two runs share."""
    return [{k: v for k, v in vars(h).items() if k != "seconds"} for h in learn.history]


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
        assert len(epochs_as_trained(cfg.out)) == stop_after
        lines: list[str] = []
        learn, metrics = run(cfg, log=lines.append, resume=True)
        assert any(line.startswith("resumed: stage") for line in lines), lines

        # The epoch-level randomness (order and augmentation) depends on (seed, epoch) alone, so
        # the numbers are the same ones, not merely close; with workers too, since no sample's
        # augmentation depends on which process reads it.
        assert epochs_as_trained(cfg.out) == epochs_as_trained(whole)
        assert without_time(learn) == without_time(whole_learn)
        assert not differing_tensors(learn.net.state_dict(), whole_learn.net.state_dict())
        assert metrics == pytest.approx(whole_metrics, abs=1e-6)


def forbid_training(monkeypatch) -> None:
    def train(*args, **kwargs):
        raise AssertionError("a run whose training was complete trained again")

    monkeypatch.setattr(ConvLearner, "fit", train)
    monkeypatch.setattr(ConvLearner, "lr_find", train)


class TestResumingAFinishedRun:
    def test_says_it_is_complete_and_trains_nothing(self, uninterrupted, data, monkeypatch):
        whole, whole_learn, whole_metrics = uninterrupted
        before = epochs_as_trained(whole)
        forbid_training(monkeypatch)
        lines: list[str] = []
        learn, metrics = run(RunConfig(data=data, out=whole, **SMALL), log=lines.append, resume=True)
        text = "\n".join(lines)
        assert "already complete (4 epochs" in text and "resumed: stage" not in text, text
        assert metrics == whole_metrics
        # history.csv keeps 6 decimals of the losses and accuracy.
        assert without_time(learn) == [pytest.approx(h, abs=1e-6) for h in without_time(whole_learn)]
        assert epochs_as_trained(whole) == before

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
            m.setattr("trainer.outputs.export.export", lambda *a, **k: (_ for _ in ()).throw(Interrupted()))
            with pytest.raises(Interrupted):
                run(cfg, log=quiet)
        assert not (cfg.out / "bundle").exists()
        forbid_training(monkeypatch)
        lines: list[str] = []
        _, metrics = run(cfg, log=lines.append, resume=True)
        assert "resumed: training is complete (4 epochs); evaluating and exporting" in lines, lines
        assert (cfg.out / "bundle" / "model.onnx").is_file()
        assert metrics == pytest.approx(whole_metrics, abs=1e-6)
        assert epochs_as_trained(cfg.out) == epochs_as_trained(whole)
