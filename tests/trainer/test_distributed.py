"""Distributed data parallel training: torchrun's environment, sharding and gathering, and real
two-process runs (gloo on CPU) compared with one process at the same effective batch."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAINER_RUN_FLAGS, epochs_as_trained, write_colour_dataset

from serving.bundle.manifest import read_manifest
from trainer.data.loaders import EpochSampler
from trainer.learn import distributed
from trainer.learn.distributed import Dist, DistributedError, from_env
from trainer.outputs.run_folder import RunFolder

WORKER = Path(__file__).with_name("ddp_worker.py")


class TestEnvironment:
    def test_no_torchrun_is_one_process(self):
        assert from_env({}) == Dist() and not Dist().active and Dist().is_main

    def test_torchrun_variables(self):
        d = from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
        assert (d.rank, d.world_size, d.local_rank, d.active, d.is_main) == (3, 4, 1, True, False)

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"WORLD_SIZE": "2"}, "RANK/LOCAL_RANK are not whole numbers"),
            ({"WORLD_SIZE": "2", "RANK": "two"}, "RANK/LOCAL_RANK are not whole numbers"),
            ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK 2 is not within WORLD_SIZE 2"),
        ],
    )
    def test_a_broken_environment_says_what_to_do(self, env, message):
        with pytest.raises(DistributedError, match=message) as err:
            from_env(env)
        assert "torchrun" in str(err.value)


class TestSharding:
    @pytest.mark.parametrize(("n", "world"), [(10, 2), (11, 2), (7, 3), (2, 4)])
    def test_interleaved_shards_gather_back_in_order(self, n, world):
        items = list(range(n))
        shards = [Dist(r, world).shard(items) for r in range(world)]
        assert sorted(item for shard in shards for item in shard) == items
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        # What gather_rows does with the shards once all_gather padded them to one length.
        per_rank = -(-n // world)
        padded = [s + [-1] * (per_rank - len(s)) for s in shards]
        assert np.stack(padded, axis=1).reshape(-1)[:n].tolist() == items

    def test_one_process_gathers_what_it_has(self):
        rows = torch.arange(6.0).reshape(3, 2)
        assert torch.equal(distributed.gather_rows(rows, 3, Dist()), rows)

    @pytest.mark.parametrize(("n", "world"), [(16, 2), (17, 2), (10, 4), (3, 4)])
    def test_ranks_share_one_pass_and_take_as_many_steps(self, n, world):
        def drawn(rank: int, world_size: int) -> list[tuple[int, int]]:
            s = EpochSampler(n, seed=7, shuffle=True, rank=rank, world_size=world_size)
            s.set_epoch(3, 1)
            return list(s)

        whole = drawn(0, 1)
        shares = [drawn(r, world) for r in range(world)]
        assert {len(s) for s in shares} == {-(-n // world)}
        # Together, step by step, the ranks draw the pass one process draws: the same images with
        # the same augmentation seeds, then the pass's first few again as padding.
        merged = [pair for step in zip(*shares, strict=True) for pair in step]
        assert merged[:n] == whole
        assert merged[n:] == (whole * world)[: len(merged) - n]


def run(data: Path, out: Path, bs: int, *args: str, ranks: int = 1) -> list[dict]:
    """The worker, alone (ranks=1) or under torchrun; each rank's results."""
    out.mkdir(parents=True)
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [sys.executable, *launcher, str(WORKER), str(data), str(out), str(bs), *args]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [
        json.loads((out / f"rank{r}.json").read_text()) | {"state": torch.load(out / f"rank{r}.pt", weights_only=True)}
        for r in range(ranks)
    ]


@pytest.fixture(scope="module")
def colours_data(tmp_path_factory) -> Path:
    return write_colour_dataset(tmp_path_factory.mktemp("ddp") / "colours", {"train": 8, "valid": 4})


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"ranks differ in {different[:5]}"


class TestTwoProcesses:
    def test_two_ranks_train_as_one_process_with_their_batches_together(self, colours_data, tmp_path):
        """With no batch-dependent layers, 2 ranks of bs 4 and 1 process of bs 8 do the same arithmetic
        (up to the order of float sums): weights within 1e-6, every epoch's metrics within 1e-6."""
        [one] = run(colours_data, tmp_path / "one", 8, "exact")
        rank0, rank1 = run(colours_data, tmp_path / "two", 4, "exact", ranks=2)
        assert_same_weights(rank0["state"], rank1["state"])
        assert rank0["steps_per_epoch"] == one["steps_per_epoch"] == 2
        for k in one["state"]:
            np.testing.assert_allclose(rank0["state"][k].float(), one["state"][k].float(), atol=1e-6, err_msg=k)
        np.testing.assert_allclose(rank0["history"], one["history"], atol=1e-6)
        np.testing.assert_allclose(rank0["tta_probs"], one["tta_probs"], atol=1e-6)
        assert rank0["history"] == rank1["history"] and rank0["tta_probs"] == rank1["tta_probs"]
        # Rank 0 alone wrote the files: one precompute cache per set, one saved model.
        assert sorted(p.name for p in (tmp_path / "two" / "models").iterdir()) == ["final.pt"]

    def test_the_lessons_model_ends_identical_on_every_rank(self, colours_data, tmp_path):
        """With BatchNorm and dropout, ranks still end with the same weights and BatchNorm statistics
        (rank 0's, sent to the others after each epoch), and report the same metrics."""
        rank0, rank1 = run(colours_data, tmp_path / "two", 4, ranks=2)
        assert_same_weights(rank0["state"], rank1["state"])
        assert rank0["history"] == rank1["history"] and rank0["tta_accuracy"] == rank1["tta_accuracy"]


def torchrun(*args: str, ranks: int = 2, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, cwd=cwd)


# The default suite's recipe at 32 px (conftest.TRAINER_RUN_FLAGS), with a fixed lr and seed so
# that two runs can be compared epoch by epoch.
RUN_FLAGS = (*TRAINER_RUN_FLAGS, "--lr", "1e-2", "--seed", "3")


class TestTorchrunTrainerRun:
    def test_one_run_folder_one_bundle_one_voice(self, colours_data, tmp_path):
        """`torchrun --nproc_per_node 2 -m trainer run`: the whole recipe, rank 0 writing the run
        folder and the bundle once, the log said once; the bundle serves."""
        done = torchrun(
            "-m", "trainer", "run", "--data", str(colours_data), "--out", "run", *TRAINER_RUN_FLAGS, cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr[-3000:]
        out = done.stdout + done.stderr
        assert "distributed: 2 processes of 4 images a step each: an effective batch of 8, 2 steps an epoch" in out
        for line in ("export: ONNX Runtime TTA accuracy", "bundle: run/bundle", "lr_find: suggests lr"):
            assert out.count(line) == (2 if line.startswith("lr_find") else 1), line  # two sweeps: head, unfrozen
        run = RunFolder(tmp_path / "run")
        manifest = read_manifest(run.bundle_dir)
        assert manifest.recipe["epochs"] == len(run.read_history()) == 5
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "nothing written beside the run folder"
        assert not list(tmp_path.rglob("*.tmp*")), "a temporary file was left behind"

    @pytest.mark.slow
    def test_a_rank_that_dies_ends_the_run_and_resume_finishes_it(self, colours_data, tmp_path):
        """Rank 1 dies after epoch 2: torchrun stops rank 0, which would otherwise wait for it, and
        fails the run; --resume then trains exactly the epochs and weights of a run never stopped."""
        whole = torchrun(
            "-m", "trainer", "run", "--data", str(colours_data), "--out", "whole", *RUN_FLAGS, cwd=tmp_path
        )
        assert whole.returncode == 0, whole.stderr[-3000:]
        args = ("--data", str(colours_data), "--out", "part", *RUN_FLAGS)
        started = time.monotonic()
        died = torchrun(str(WORKER), "die-after", "2", "1", "run", *args, cwd=tmp_path)
        assert died.returncode != 0 and "rank 1 died after 2 epochs" in died.stderr
        assert time.monotonic() - started < 300, "rank 0 waited for the dead rank instead of being stopped"
        assert len(RunFolder(tmp_path / "part").read_history()) == 2
        resumed = torchrun("-m", "trainer", "run", *args, "--resume", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed: stage" in resumed.stdout + resumed.stderr
        assert epochs_as_trained(tmp_path / "part") == epochs_as_trained(tmp_path / "whole")
        a, b = (torch.load(tmp_path / r / "models" / "final.pt", weights_only=True) for r in ("part", "whole"))
        assert_same_weights(a, b)
