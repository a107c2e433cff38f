"""Slow: the default recipe on the real dev sets against a linear probe on frozen features, measured
in the same test (bench/quality.py does the measuring; bench/README.md has its latest table)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import bench_module

quality = bench_module("quality")


def _measure(name: str, tmp_path: Path):
    dev = quality.SETS[name]
    if dev.needs is not None and not dev.needs.is_dir():
        pytest.skip(f"{dev.needs} is absent (the shared data sits beside the project)")
    return quality.linear_probe(dev, tmp_path), quality.recipe(dev, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize(
    "name, floor",
    [
        ("hymenoptera", 0.93),
        ("catbreeds", 0.70),
    ],
)
def test_default_recipe_against_the_linear_probe(name, floor, tmp_path, capsys):
    """Floors about three images below what bench/quality.py measured (bench/README.md): hymenoptera
    0.9412 (probe 0.9542), catbreeds 0.7136 (probe 0.7186). The issue's goal (+8 points over the
    probe on catbreeds, 97% on hymenoptera) is not met yet; these hold what is."""
    base, ours = _measure(name, tmp_path)
    with capsys.disabled():
        print(f"\n{name}: probe {base}\n{name}: recipe {ours}")
    assert ours.accuracy >= floor, (base, ours)
    # Calibrated: its probabilities score better than the probe's, whose C was picked for accuracy.
    assert ours.log_loss < base.log_loss, (base, ours)
