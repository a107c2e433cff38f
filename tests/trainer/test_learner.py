"""ConvLearner: SGDR epochs and restarts, freezing, differential lrs, precompute cache, snapshots."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from trainer.data.augment import tfms_from_model, transforms_side_on
from trainer.data.loaders import ImageClassifierData
from trainer.evaluate.scoring import snapshot_ensemble
from trainer.evaluate.submission import write_submission
from trainer.learn.learner import ConvLearner


def make_learner(path, *, sz=32, precompute=True, bs=4) -> ConvLearner:
    tfms = tfms_from_model("efficientnet_lite0", sz, aug_tfms=transforms_side_on, max_zoom=1.1)
    data = ImageClassifierData.from_paths(path, tfms, bs=bs, num_workers=0, seed=0)
    torch.manual_seed(0)
    return ConvLearner.pretrained("efficientnet_lite0", data, precompute=precompute, log=lambda _: None)


def n_trainable(learn) -> int:
    return sum(p.numel() for p in learn.net.parameters() if p.requires_grad)


class TestFit:
    def test_cycle_mult_runs_seven_epochs_and_restarts_at_their_boundaries(self, colours):
        learn = make_learner(colours)
        spe = learn.steps_per_epoch()
        assert spe == 4  # 16 images in batches of 4
        learn.fit(0.1, 3, cycle_len=1, cycle_mult=2)
        assert len(learn.history) == 7
        lrs = [g[-1] for g in learn.lr_history]
        assert len(lrs) == 7 * spe
        restarts = [i for i in range(1, len(lrs)) if lrs[i] > lrs[i - 1]]
        assert restarts == [spe, 3 * spe]  # epochs 1 and 3 start new cycles (1 + 2 + 4 epochs)
        assert lrs[0] == lrs[spe] == lrs[3 * spe] == pytest.approx(0.1)

    def test_differential_lrs_reach_the_optimizer_groups(self, colours):
        learn = make_learner(colours)
        learn.fit([1e-4, 1e-3, 1e-2], 1)
        assert learn.lr_history[0] == pytest.approx([1e-4, 1e-3, 1e-2])
        last = learn.lr_history[-1]
        assert [g["lr"] for g in learn.opt.param_groups] == last
        assert last[2] / last[0] == pytest.approx(100)

    def test_wrong_number_of_lrs(self, colours):
        with pytest.raises(ValueError, match="one per layer group"):
            make_learner(colours).fit([1e-3, 1e-2], 1)

    def test_training_lowers_the_loss(self, colours):
        learn = make_learner(colours)
        # 1e-2: at 0.1 the head diverges on the "same"-padded backbone's activations (training
        # loss 0.30 -> 3.4 over 3 epochs, measured), which is what this test should catch.
        learn.fit(1e-2, 3)
        assert learn.history[-1].trn_loss < learn.history[0].trn_loss


class TestFreezing:
    def test_trainable_parameters_per_freeze_level(self, colours):
        learn = make_learner(colours)
        head = sum(p.numel() for p in learn.net.head.parameters())
        groups = [sum(p.numel() for p in g.parameters()) for g in learn.layer_groups()]
        assert n_trainable(learn) == head == groups[2]
        learn.freeze_to(1)
        assert n_trainable(learn) == groups[1] + groups[2]
        learn.unfreeze()
        assert n_trainable(learn) == sum(groups) == sum(p.numel() for p in learn.net.parameters())

    def test_frozen_batchnorm_keeps_its_statistics(self, colours):
        learn = make_learner(colours, precompute=False)
        learn.freeze_to(1)
        early_bn = learn.layer_groups()[0][1]  # bn1 after the stem
        late_bn = learn.net.backbone.model.bn2
        before = early_bn.running_mean.clone(), late_bn.running_mean.clone()
        learn.fit(1e-3, 1)
        assert torch.equal(early_bn.running_mean, before[0])
        assert not torch.equal(late_bn.running_mean, before[1])


class TestPrecomputeCache:
    def cache_files(self, learn):
        return sorted((learn.work_dir / "tmp" / "precompute").glob("*.pt"))

    def count_computes(self, learn, monkeypatch):
        calls = []
        original = learn.compute_features
        monkeypatch.setattr(learn, "compute_features", lambda name: calls.append(name) or original(name))
        return calls

    def test_written_once_and_reused(self, colours, monkeypatch):
        learn = make_learner(colours)
        assert len(self.cache_files(learn)) == 2
        again = make_learner(colours, precompute=False)
        calls = self.count_computes(again, monkeypatch)
        again.precompute = True
        assert calls == []
        assert torch.equal(again._features["train"], learn._features["train"])

    def test_changed_file_invalidates_the_cache(self, colours, monkeypatch):
        make_learner(colours)
        changed = sorted((colours / "valid" / "red").iterdir())[0]
        data = changed.read_bytes()
        changed.write_bytes(data)
        st = changed.stat()
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        learn = make_learner(colours, precompute=False)
        calls = self.count_computes(learn, monkeypatch)
        learn.precompute = True
        assert calls == ["valid"]

    def test_truncated_cache_file_is_recomputed_not_used(self, colours, monkeypatch):
        first = make_learner(colours)
        path = next(p for p in self.cache_files(first) if "train" in p.name)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        learn = make_learner(colours, precompute=False)
        calls = self.count_computes(learn, monkeypatch)
        learn.precompute = True
        assert calls == ["train"]
        assert torch.allclose(learn._features["train"], first._features["train"], atol=1e-5)

    def test_training_the_backbone_makes_activations_stale(self, colours, monkeypatch):
        learn = make_learner(colours)
        learn.precompute = False
        learn.unfreeze()
        learn.fit(1e-2, 1)
        calls = self.count_computes(learn, monkeypatch)
        learn.precompute = True
        assert sorted(calls) == ["train", "valid"]

    def test_a_read_only_dataset_is_never_written_to(self, colours, tmp_path, monkeypatch):
        """Shared data (mode r-x) stays untouched, even for root, whom os.access lets write anywhere."""
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        folders = [colours, *(p for p in colours.rglob("*") if p.is_dir())]
        for folder in folders:
            folder.chmod(0o555)
        try:
            learn = make_learner(colours)
            assert learn.work_dir.is_relative_to(tmp_path / "cache")
            assert len(self.cache_files(learn)) == 2
            assert not (colours / "tmp").exists()
        finally:
            for folder in folders:
                folder.chmod(0o755)


class TestSnapshotsAndPersistence:
    def test_one_snapshot_per_cycle_and_their_ensemble(self, colours):
        learn = make_learner(colours)
        learn.fit(0.1, 3, cycle_len=1, cycle_mult=2, cycle_save_name="s")
        assert learn.snapshots == ["s_cyc_0", "s_cyc_1", "s_cyc_2"]
        assert all((learn.models_dir() / f"{n}.pt").is_file() for n in learn.snapshots)
        current = learn.TTA()[0]
        ensemble, _ = snapshot_ensemble(learn)
        members = []
        for name in learn.snapshots:
            other = make_learner(colours)
            other.load(name)
            members.append(other.TTA()[0])
        np.testing.assert_allclose(ensemble, np.mean(members, axis=0), atol=1e-6)
        np.testing.assert_allclose(learn.TTA()[0], current, atol=1e-7)  # weights restored

    def test_save_load_round_trip(self, colours):
        learn = make_learner(colours)
        learn.fit(0.1, 1)
        learn.save("m")
        other = make_learner(colours)
        other.load("m")
        for (k, a), b in zip(learn.net.state_dict().items(), other.net.state_dict().values(), strict=True):
            assert torch.equal(a.cpu(), b.cpu()), k

    def test_set_data_keeps_weights_for_progressive_resizing(self, colours):
        learn = make_learner(colours, sz=32)
        learn.fit(0.1, 1)
        head = {k: v.clone() for k, v in learn.net.head.state_dict().items()}
        bigger = learn.data.with_tfms(tfms_from_model("efficientnet_lite0", 48, aug_tfms=transforms_side_on))
        learn.set_data(bigger)
        assert learn._features["train"].shape[0] == 16
        assert all(torch.equal(v, learn.net.head.state_dict()[k]) for k, v in head.items())
        learn.fit(0.05, 1)
        assert learn.data.tfms.sz == 48 and len(learn.history) == 2


class TestLrFind:
    def test_lesson_spelling_restores_weights_and_plots(self, colours, tmp_path):
        from PIL import Image

        learn = make_learner(colours)
        before = {k: v.clone() for k, v in learn.net.state_dict().items()}
        sched = learn.lr_find(num_it=30)
        assert learn.sched is sched and len(sched.lrs) <= 30
        assert all(torch.equal(v, learn.net.state_dict()[k]) for k, v in before.items())
        sched.plot(tmp_path / "lr_find.png", n_skip=2, n_skip_end=1)
        assert Image.open(tmp_path / "lr_find.png").size[0] > 100


def test_submission_csv_for_a_test_folder(colours, tmp_path):
    import csv

    from conftest import write_colour_dataset

    write_colour_dataset(tmp_path / "t", {"unlabelled": 3})
    test_dir = colours / "test"
    test_dir.mkdir()
    for f in (tmp_path / "t" / "unlabelled" / "red").iterdir():
        f.rename(test_dir / f.name)
    tfms = tfms_from_model("efficientnet_lite0", 32, aug_tfms=transforms_side_on)
    data = ImageClassifierData.from_paths(colours, tfms, bs=4, num_workers=0, test_name="test")
    learn = ConvLearner.pretrained("efficientnet_lite0", data, precompute=True, log=lambda _: None)
    learn.fit(0.1, 2)
    rows = list(csv.reader(write_submission(learn, tmp_path / "sub.csv").open()))
    assert rows[0] == ["id", "blue", "red"] and len(rows) == 4
    assert {r[0] for r in rows[1:]} == {f.stem for f in test_dir.iterdir()}
    assert all(abs(float(r[1]) + float(r[2]) - 1) < 1e-5 for r in rows[1:])


class TestPrecomputeKeepsNoLoader:
    """Precompute reads each set once: its loaders' workers must not persist, idle, through the rest
    of the run (two of a default run's seven processes did; bench/training.py's memory section)."""

    def test_a_one_pass_loader_is_new_and_its_workers_do_not_persist(self, colours):
        tfms = tfms_from_model("efficientnet_lite0", 32)
        data = ImageClassifierData.from_paths(colours, tfms, bs=4, num_workers=1, seed=0)
        first, second = data.loader("train", once=True), data.loader("train", once=True)
        assert first is not second
        assert not first.persistent_workers
        assert data.loader("valid").persistent_workers  # validation's, read every epoch, persist
        assert data.loader("valid") is data.loader("valid")

    def test_precompute_leaves_no_loader_behind(self, colours):
        learn = make_learner(colours, precompute=True)
        assert learn._features["train"].shape[0] == len(learn.data.trn_files)
        assert learn.data._loaders == {}
