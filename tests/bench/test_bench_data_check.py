"""bench/data_check.py and bench/label_errors.py run end to end on generated photos; what they
measure (speed, distances, accuracy) is the benchmarks' business, not these tests'."""

from __future__ import annotations

import csv
import io

import pytest
from conftest import bench_module, photo, write_colour_dataset
from PIL import Image


def test_data_check_bench_times_the_check_and_measures_the_hash(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        photo(i).save(folder / f"p{i}.png")
    buf = io.BytesIO()
    photo(0).resize((80, 60)).save(buf, "JPEG", quality=75)
    (folder / "p0_small.jpg").write_bytes(buf.getvalue())
    assert bench_module("data_check").main(["--photos", str(folder), "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| check (scan_images) |" in out and "ratio: the check takes" in out
    assert "13 photos, 1 groups of copies found" in out


@pytest.mark.slow
def test_label_errors_bench_trains_with_and_without_the_suspects(tmp_path, capsys):
    data = write_colour_dataset(tmp_path / "colours", {"train": 12})
    rows = [(f"{c}/{p.name}", c) for c in ("red", "blue") for p in sorted((data / "train" / c).iterdir())]
    rows[0] = (rows[0][0], "blue")  # a red image labelled blue
    with open(data / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "label"), *rows])
    tiny = "--size 32 --bs 4 --num-workers 0 --lr 0.01 --head-epochs 1 --aug-cycles 0 --unfreeze-cycles 0"
    argv = ["--keep", str(tmp_path / "runs"), "--data", str(data), "--top", "1", "--trainer-args", tiny]
    assert bench_module("label_errors").main(argv) == 0
    out = capsys.readouterr().out
    assert "| all training images |" in out and "| without the top" in out
    assert (tmp_path / "runs" / "base" / "label_errors.csv").is_file()
    assert Image.open(tmp_path / "runs" / "base" / "confusion_matrix.png").size[0] > 0
