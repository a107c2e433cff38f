"""Thread counts follow the CPUs a process may use (serving.bundle.cpus, trainer.threads): the affinity
mask, the cgroup's CPU quota (v2 and v1 files, made here), OMP_NUM_THREADS and torchrun's processes."""

from __future__ import annotations

import os

import pytest
import torch

from serving.bundle.cpus import cgroup_quota, usable_cpus
from trainer import threads


class TestCgroupQuota:
    def test_v2_quota_in_cpus(self, tmp_path):
        (tmp_path / "cpu.max").write_text("150000 100000\n")
        assert cgroup_quota(tmp_path) == 1.5

    def test_v2_without_a_quota(self, tmp_path):
        (tmp_path / "cpu.max").write_text("max 100000\n")
        assert cgroup_quota(tmp_path) is None

    def test_v1_quota_in_cpus(self, tmp_path):
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
        assert cgroup_quota(tmp_path) == 4

    def test_v1_without_a_quota(self, tmp_path):
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
        assert cgroup_quota(tmp_path) is None

    def test_no_cgroup_files(self, tmp_path):
        assert cgroup_quota(tmp_path) is None


def test_usable_cpus_is_within_the_affinity_mask():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


class TestThreadCount:
    @pytest.mark.parametrize(
        ("env", "cpus", "local", "want"),
        [
            ({}, 4, 1, 4),  # the CPUs this process may use
            ({}, 4, 2, 2),  # shared by the processes torchrun started here
            ({}, 1, 4, 1),  # never fewer than one
            ({"OMP_NUM_THREADS": "3"}, 64, 1, 3),  # what deploy/ sets from the CPU limit wins
            ({"OMP_NUM_THREADS": "zero"}, 2, 1, 2),  # not a count: ignored
        ],
    )
    def test_count(self, env, cpus, local, want):
        assert threads.thread_count(env, cpus, local)[0] == want

    def test_configure_sets_torch_and_says_so(self):
        before = torch.get_num_threads()
        said: list[str] = []
        try:
            n = threads.configure(said.append, env={"OMP_NUM_THREADS": "1"})
            assert n == 1 and torch.get_num_threads() == 1
            assert said and said[0].startswith("threads: 1 for torch (from OMP_NUM_THREADS")
        finally:
            torch.set_num_threads(before)
