"""bench/gpu_check.sh, the script a GPU machine runs once, works end to end here with --cpu on tiny
data: train, export with fp16, serve, one table. On a GPU it runs the same steps at full size."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_colour_dataset

ROOT = Path(__file__).resolve().parents[2]
TINY = "--size 32 --bs 4 --num-workers 0 --head-epochs 1 --aug-cycles 1 --unfreeze-cycles 1"


def test_gpu_check_trains_exports_and_serves_with_one_table(tmp_path):
    data = write_colour_dataset(tmp_path / "colours", {"train": 8, "val": 4})
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(data), "OUT": str(tmp_path / "out")}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--trainer-args", TINY],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("GPU check:") :]
    for line in (
        "train: all layers unfrozen at 32 px",
        "train: peak GPU memory in use",
        "accuracy with TTA: fp16 (change)",
        "serve fp16, batching on, 16 callers",
        "process start to SERVING",
    ):
        assert line in table, table
    assert (tmp_path / "out" / "bundle" / "model.fp16.onnx").is_file()


def test_gpu_check_says_what_is_missing_without_a_gpu(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine: the check would run for real")
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "needs an NVIDIA GPU" in done.stdout
