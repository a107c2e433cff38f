"""trainer.evaluate.submission.write_predictions_csv: Kaggle-style CSVs, read back with the csv module."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.evaluate.submission import write_predictions_csv

FILES = [Path("data/test/0042.jpg"), Path("data/test/abc.png")]
CLASSES = ["cats", "dogs", "hot,dogs"]
PROBS = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]], dtype=np.float32)


def read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


class TestWrite:
    @pytest.mark.parametrize("probs", [PROBS, torch.from_numpy(PROBS), PROBS.tolist()])
    def test_one_probability_column_per_class(self, tmp_path, probs):
        rows = read(write_predictions_csv(tmp_path / "sub.csv", FILES, probs, CLASSES))
        assert rows[0] == ["id", *CLASSES]
        assert [r[0] for r in rows[1:]] == ["0042", "abc"]
        np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], dtype=float), PROBS, rtol=1e-6)

    def test_top_label(self, tmp_path):
        rows = read(write_predictions_csv(tmp_path / "sub.csv", FILES, PROBS, CLASSES, top_label=True))
        assert rows == [["id", "label"], ["0042", "dogs"], ["abc", "cats"]]

    def test_folder_created_and_no_temporary_left(self, tmp_path):
        out = write_predictions_csv(tmp_path / "out" / "sub.csv", FILES, PROBS, CLASSES)
        assert [p.name for p in out.parent.iterdir()] == ["sub.csv"]


class TestRefuses:
    @pytest.mark.parametrize(
        "files, probs, message",
        [
            (FILES, PROBS[:1], r"shape \(1, 3\), expected .* \(2, 3\)"),
            (FILES, PROBS[:, :2], r"shape \(2, 2\)"),
            (
                FILES,
                np.array([[0.1, np.nan, 0.2], [0.6, 0.3, 0.1]]),
                "NaN or infinite values in rows \\[0\\]: 0042.jpg",
            ),
            ([Path("a/x.jpg"), Path("b/x.png")], PROBS, "1 ids name more than one file"),
        ],
    )
    def test_bad_input(self, tmp_path, files, probs, message):
        with pytest.raises(ValueError, match=message):
            write_predictions_csv(tmp_path / "sub.csv", files, probs, CLASSES)
        assert not (tmp_path / "sub.csv").exists()
