"""The lr finder: the sweep on a real ConvLearner over a tiny fake net, and the pure suggestion on made-up curves."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from trainer.learn.learner import ConvLearner
from trainer.learn.lr_finder import LRFinderResult, SmoothedLoss, longest_descent, lr_find, suggest_lr

N_IN, N_FEATURES, N_TRAIN, N_VALID, BS = 8, 16, 64, 16, 8


class TinyNet(nn.Module):
    """ClassifierNet's interface on vectors of 8 numbers: three layer groups, features(), head."""

    arch_name = "tiny"

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(N_IN, N_FEATURES),
            nn.BatchNorm1d(N_FEATURES),
            nn.ReLU(),
            nn.Linear(N_FEATURES, N_FEATURES),
            nn.ReLU(),
        )
        self._groups = [self.backbone[:3], self.backbone[3:]]  # a plain list: aliases, as in ClassifierNet
        self.head = nn.Sequential(nn.BatchNorm1d(N_FEATURES), nn.Dropout(0.1), nn.Linear(N_FEATURES, 2))

    def layer_groups(self) -> list[nn.Module]:
        return [*self._groups, self.head]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class TinyData:
    """The fields of ImageClassifierData the learner reads, with inputs in memory instead of files."""

    path: Path
    inputs: dict[str, torch.Tensor]
    trn_y: list[int]
    val_y: list[int]
    bs: int = BS
    classes: list[str] = field(default_factory=lambda: ["ants", "bees"])
    test_files: list[Path] | None = None
    seed: int | None = None  # of the training passes' order (None: drawn at random, as ImageClassifierData)
    # The input side the learner names in its epochs' stage labels; the inputs here are feature vectors.
    tfms: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(sz=N_IN))

    @property
    def c(self) -> int:
        return len(self.classes)

    @property
    def trn_files(self) -> list[Path]:
        return [self.path / f"train_{i}.jpg" for i in range(len(self.trn_y))]

    @property
    def val_files(self) -> list[Path]:
        return [self.path / f"valid_{i}.jpg" for i in range(len(self.val_y))]

    def loader(self, name: str, *, augment: bool = False, shuffle: bool = False, shard: tuple[int, int] = (0, 1)):
        assert shard == (0, 1), "one process: the whole set"
        x = self.inputs[name]
        y = torch.tensor(self.trn_y if name == "train" else self.val_y)
        order = torch.randperm(len(x)) if shuffle else torch.arange(len(x))
        return [(x[idx], y[idx]) for idx in order.split(self.bs)]


def labelled(n: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    x = torch.randn(n, dim, generator=gen)
    return x, (x[:, 0] > 0).long().tolist()  # learnable, so the loss falls before it diverges


def make_learner(mode: str, tmp_path: Path, *, opt: str = "sgd") -> ConvLearner:
    """A real ConvLearner on CPU. precompute: the head trains on random 'activations'; end_to_end: all
    three groups train on random 'images' from TinyData.loader."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    precompute = mode == "precompute"
    dim = N_FEATURES if precompute else N_IN
    (x_trn, y_trn), (x_val, y_val) = labelled(N_TRAIN, dim, gen), labelled(N_VALID, dim, gen)
    data = TinyData(tmp_path, {"train": x_trn, "valid": x_val}, y_trn, y_val)
    learn = ConvLearner(data, TinyNet(), device=torch.device("cpu"), opt=opt, work_dir=tmp_path, log=lambda msg: None)
    if precompute:
        # The precompute setter would compute activations through data.tfms and a disk cache; these
        # stand in for them, so the flag's backing field is set directly.
        learn._features = {"train": x_trn, "valid": x_val}
        learn._precompute = True
    else:
        learn.unfreeze()
    return learn


MODES = ["precompute", "end_to_end"]


@pytest.fixture(params=MODES)
def learn(request, tmp_path) -> ConvLearner:
    return make_learner(request.param, tmp_path)


def record_set_lrs(monkeypatch, learn: ConvLearner) -> list[list[float]]:
    calls: list[list[float]] = []
    set_lrs = learn.set_lrs

    def recording(lrs):
        calls.append(list(lrs))
        set_lrs(lrs)

    monkeypatch.setattr(learn, "set_lrs", recording)
    return calls


class TestSweep:
    def test_lr_grows_by_a_constant_factor_with_group_ratios_kept(self, learn, monkeypatch):
        calls = record_set_lrs(monkeypatch, learn)
        starts = [1e-6, 1e-5, 1e-4]
        result = lr_find(learn, starts, 1e-1, num_it=30, stop_div=False)  # 30 > one epoch of 8 batches: cycles
        assert len(calls) == len(result.lrs) == len(result.losses) == len(result.raw_losses) == 30
        lrs = np.array(calls)
        np.testing.assert_allclose(lrs[0], starts)
        np.testing.assert_allclose(lrs[-1], [1e-3, 1e-2, 1e-1])
        np.testing.assert_allclose(lrs[1:] / lrs[:-1], (1e3) ** (1 / 29))
        np.testing.assert_allclose(lrs / lrs[:, -1:], np.broadcast_to(np.divide(starts, starts[-1]), lrs.shape))
        assert result.lrs == [row[-1] for row in calls]

    def test_defaults_to_one_epoch(self, learn):
        assert len(lr_find(learn, 1e-5, 1e-3).lrs) == learn.steps_per_epoch() == N_TRAIN // BS

    def test_stops_on_divergence(self, learn):
        result = lr_find(learn, 1e-3, 1e8, num_it=100)
        assert 10 < len(result.lrs) < 100
        last, best = result.losses[-1], min(result.losses[10:-1])
        assert last > 4 * best  # the 4x rule stopped it, before any NaN
        assert all(loss <= 4 * best for loss in result.losses[10:-1])

    def test_without_stop_div_it_goes_on_until_the_end_or_nan(self, learn):
        stopped = lr_find(learn, 1e-3, 1e8, num_it=100)
        result = lr_find(learn, 1e-3, 1e8, num_it=100, stop_div=False)
        assert len(result.lrs) > len(stopped.lrs)
        assert len(result.lrs) == 100 or math.isnan(result.losses[-1])
        assert not any(math.isnan(loss) for loss in result.losses[:-1])  # a NaN always ends the sweep

    def test_end_lr_per_group_must_keep_ratios(self, learn):
        with pytest.raises(ValueError, match="ratios"):
            lr_find(learn, [1e-6, 1e-5, 1e-4], [1.0, 1.0, 1.0])
        with pytest.raises(ValueError, match="start_lr < end_lr"):
            lr_find(learn, 1e-2, 1e-3)


def snapshot(learn: ConvLearner) -> dict:
    return {
        "net": copy.deepcopy(learn.net.state_dict()),
        "opt": copy.deepcopy(learn.opt.state_dict()),
        "requires_grad": [p.requires_grad for p in learn.net.parameters()],
        "training": [m.training for m in learn.net.modules()],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["net"].keys() == after["net"].keys()
    for k in before["net"]:
        assert torch.equal(before["net"][k], after["net"][k]), k
    assert before["opt"]["param_groups"] == after["opt"]["param_groups"]
    assert before["opt"]["state"].keys() == after["opt"]["state"].keys()
    for i, state in before["opt"]["state"].items():
        assert state.keys() == after["opt"]["state"][i].keys()
        for k, v in state.items():
            assert torch.equal(v, after["opt"]["state"][i][k]), (i, k)
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]


class TestRestores:
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("opt", ["sgd", "adamw"])
    def test_weights_optimizer_flags_and_modes(self, tmp_path, mode, opt):
        learn = make_learner(mode, tmp_path, opt=opt)
        learn.fit([1e-3, 1e-2, 1e-1], 1, wds=1e-4)  # real steps: momentum buffers, step counts, weight decay
        assert learn.opt.state, "fit should have left optimizer state to restore"
        learn.net.train()
        learn.net.head[0].eval()  # a mix of modes that the sweep's own train mode does not produce
        before = snapshot(learn)
        result = lr_find(learn, 1e-4, 10, num_it=20)
        assert result.lrs
        assert_same_state(before, snapshot(learn))

    def test_on_error(self, learn, monkeypatch):
        learn.fit(1e-2, 1)
        learn.net.eval()
        before = snapshot(learn)
        calls = record_set_lrs(monkeypatch, learn)
        set_lrs = learn.set_lrs

        def failing(lrs):
            if len(calls) == 5:  # whatever the sweep or the user changed by then is undone too
                for p in learn.net.parameters():
                    p.requires_grad_(not p.requires_grad)
                learn.net.train()
                raise RuntimeError("interrupted")
            set_lrs(lrs)

        monkeypatch.setattr(learn, "set_lrs", failing)
        with pytest.raises(RuntimeError, match="interrupted"):
            lr_find(learn, num_it=20)
        assert len(calls) == 5
        assert_same_state(before, snapshot(learn))


class TestSmoothedLoss:
    def test_bias_corrected_average(self):
        record = SmoothedLoss(beta=0.9)
        assert record.update(2.0) == pytest.approx(2.0)  # bias correction: not 0.1 * 2.0
        assert record.update(4.0) == pytest.approx((0.9 * 0.2 + 0.4) / (1 - 0.81))

    def test_best_is_tracked_only_after_the_first_ten_batches(self):
        raw = [0.01] * 10 + [0.05] * 50
        record = SmoothedLoss()
        stops = [(record.update(loss), record.diverged())[1] for loss in raw]
        assert not any(stops)
        # Counting the first ten batches would have stopped the sweep: 0.05 > 4 * 0.01.
        assert max(record.smoothed) > 4 * min(record.smoothed[:10])
        assert record.best == pytest.approx(record.smoothed[10])

    def test_diverges_above_four_times_the_best_and_on_nan(self):
        record = SmoothedLoss()
        for _ in range(20):
            record.update(1.0)
        assert not record.diverged()
        while not record.diverged():
            record.update(100.0)
        assert record.smoothed[-1] > 4 * record.best
        record.update(math.nan)
        assert record.diverged()


GRID = np.logspace(-6, 1, 141)  # 20 points per decade
STEP = 1 / 20


class TestSuggestLR:
    def test_min_div10_on_a_parabola(self):
        s = suggest_lr(GRID, (np.log10(GRID) + 2) ** 2 + 1)
        assert abs(math.log10(s.lr_min_div10) - (-3)) <= STEP

    def test_valley_is_the_middle_of_the_descent_and_the_pick(self):
        # Falls from the first point read (GRID[10], 1e-5.5) to the minimum at 1e-2: the middle in log(lr) is 1e-3.75.
        s = suggest_lr(GRID, (np.log10(GRID) + 2) ** 2 + 1)
        assert abs(math.log10(s.lr_valley) - (-3.75)) <= STEP
        assert s.lr == s.lr_valley

    def test_valley_reads_past_noise_and_a_spurious_dip_that_misleads_the_minimum(self):
        # What an unfrozen sweep of a trained model looks like: a long noisy plateau, one low
        # outlier in it, then the real descent from 1e-3 to 1e-1 and the divergence.
        rng = np.random.default_rng(0)
        log_lr = np.log10(GRID)
        losses = np.where(log_lr < -3, 2 + rng.normal(0, 0.02, len(GRID)), 2 - 0.75 * (log_lr + 3))
        losses[log_lr > -1] = 0.5 + 5 * (log_lr[log_lr > -1] + 1)
        losses[np.argmin(np.abs(log_lr + 5))] = 0.3
        s = suggest_lr(GRID, losses)
        assert s.lr_min_div10 < 1e-5  # the lesson's rule is fooled by the outlier
        # The valley is not: the plateau's noise lets its descent start early, but it ends at the real
        # minimum, so its middle lies two decades above the outlier's pick and below the divergence.
        assert 1e-4 <= s.lr_valley <= 1e-1

    def test_longest_descent(self):
        assert longest_descent([3, 1, 2, 1.5, 1.2, 0.1, 5]) == (0, 5)  # 3 > 2 > 1.5 > 1.2 > 0.1
        assert longest_descent([1.0]) == (0, 0)

    @pytest.mark.parametrize("steepest", [1e-4, 1e-3, 3e-2])
    def test_steepest_descent(self, steepest):
        losses = 2 - np.tanh(3 * (np.log10(GRID) - math.log10(steepest)))
        losses[:10] += np.linspace(5, 0, 10)  # a steeper fall among the skipped first points: ignored
        s = suggest_lr(GRID, losses)
        assert abs(math.log10(s.lr_steep) - math.log10(steepest)) <= STEP

    @pytest.mark.parametrize("n", [0, 8, 19])
    def test_too_few_points(self, n):
        with pytest.raises(ValueError, match=f"stopped after {n} batches.*smaller start_lr or more data"):
            suggest_lr(GRID[:n], np.ones(n))

    def test_mismatched_lengths(self):
        with pytest.raises(ValueError, match="one loss per lr"):
            suggest_lr(GRID, np.ones(3))


class TestPlot:
    @pytest.fixture
    def result(self) -> LRFinderResult:
        losses = list((np.log10(GRID) + 2) ** 2 + 1)
        return LRFinderResult(list(GRID), losses, losses)

    @pytest.mark.parametrize("method", ["plot", "plot_lr"])
    def test_writes_a_png_atomically(self, result, tmp_path, method):
        path = getattr(result, method)(tmp_path / "lr.png")
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100
        assert [p.name for p in tmp_path.iterdir()] == ["lr.png"]  # no temporary file left behind

    def test_plot_of_a_short_sweep_says_why(self, tmp_path):
        with pytest.raises(ValueError, match="stopped after 12 batches"):
            LRFinderResult([1e-3] * 12, [1.0] * 12, [1.0] * 12).plot(tmp_path / "lr.png")
