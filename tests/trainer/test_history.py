"""Epoch rows: what the terminal shows under its header, and the history.csv row."""

from __future__ import annotations

import math

from trainer.learn.history import COLUMNS, EpochStats, header


def test_each_value_sits_under_its_column_name():
    row = EpochStats(12, 0.51234, 0.41234, 0.875, "all layers unfrozen at 224 px", 31.25)
    head, line = header(), row.line()
    for name, value in [("epoch", "12"), ("trn_loss", "0.51234"), ("val_loss", "0.41234"), ("accuracy", "0.87500")]:
        end = head.index(name) + len(name)  # right-aligned: a value ends where its name ends
        assert line[end - len(value) : end] == value
    end = head.index("time") + len("time")
    assert line[end - len("31.2s") : end] == "31.2s"
    assert line.endswith("  all layers unfrozen at 224 px") and head.endswith("stage")


def test_a_csv_row_reads_back_as_the_same_epoch():
    row = EpochStats(3, math.nan, 0.25, 0.5, "head on precomputed activations", 1.5)
    back = EpochStats.from_row(dict(zip(COLUMNS, row.row(), strict=True)))
    assert (back.epoch, back.stage, back.val_loss, back.accuracy, back.seconds) == (3, row.stage, 0.25, 0.5, 1.5)
    assert math.isnan(back.trn_loss)
