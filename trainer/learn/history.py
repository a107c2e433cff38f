"""A run's epochs: one row per trained epoch, printed as it ends and kept in history.csv."""

from __future__ import annotations

import math
from dataclasses import dataclass

COLUMNS = ("epoch", "stage", "trn_loss", "val_loss", "accuracy", "seconds")


@dataclass
class EpochStats:
    epoch: int
    trn_loss: float  # NaN when the epoch trained nothing (a set too small for a batch of two)
    val_loss: float
    accuracy: float
    # What trained: "head on precomputed activations", "all layers unfrozen at 224 px", ... Empty in
    # history written before stages were recorded.
    stage: str = ""
    seconds: float = math.nan  # wall time of the epoch, validation included

    def line(self) -> str:
        """The epoch's row on the terminal, under header()."""
        return (
            f"{self.epoch:>5}  {self.trn_loss:>8.5f}  {self.val_loss:>8.5f}  {self.accuracy:>8.5f}"
            f"  {self.seconds:>6.1f}s  {self.stage}"
        )

    @classmethod
    def from_row(cls, row: dict[str, str]) -> EpochStats:
        """A history.csv row; rows from before `stage` and `seconds` existed read with their defaults."""
        seconds = row.get("seconds") or "nan"
        return cls(
            int(row["epoch"]),
            float(row["trn_loss"]),
            float(row["val_loss"]),
            float(row["accuracy"]),
            row.get("stage") or "",
            float(seconds),
        )

    def row(self) -> list[str]:
        """The epoch as history.csv stores it, in COLUMNS order."""
        return [
            str(self.epoch),
            self.stage,
            f"{self.trn_loss:.6f}",
            f"{self.val_loss:.6f}",
            f"{self.accuracy:.6f}",
            f"{self.seconds:.2f}",
        ]


def header() -> str:
    """The column names above EpochStats.line() rows."""
    return f"{'epoch':>5}  {'trn_loss':>8}  {'val_loss':>8}  {'accuracy':>8}  {'time':>7}  stage"


def stage_label(size: int, *, precompute: bool = False, unfrozen: bool = False) -> str:
    """What a fit trains, in words: the `stage` of its epochs' rows, the recipe's plan and the report."""
    if precompute:
        return "head on precomputed activations"
    if unfrozen:
        return f"all layers unfrozen at {size} px"
    return f"head with augmentation at {size} px"
