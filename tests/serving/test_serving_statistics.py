"""ModelStats: exact totals from made-up batches and requests, no model and no network."""

from __future__ import annotations

import pytest

from serving.engine.batcher import BatchStats
from serving.engine.statistics import Duration, ModelStats


def test_a_batch_adds_queue_waits_per_image_and_its_run_once_per_image():
    stats = ModelStats()
    stats.observe_batch(BatchStats(queue_waits=[0.001, 0.003], views=8, seconds=0.010))
    stats.observe_batch(BatchStats(queue_waits=[0.002], views=4, seconds=0.004))
    s = stats.snapshot()
    assert s.queue == Duration(count=3, ns=6_000_000)
    assert s.compute_infer == Duration(count=3, ns=14_000_000)
    assert s.execution_count == 2
    assert s.batches == {2: Duration(1, 10_000_000), 1: Duration(1, 4_000_000)}


def test_counting_records_answers_and_failures():
    stats = ModelStats(wall_clock=lambda: 1_700_000_000.5)
    with stats.counting() as outcome:
        outcome.images = 3
        outcome.output_seconds = 0.002
    with pytest.raises(ValueError), stats.counting(1):
        raise ValueError("a bad image")
    s = stats.snapshot()
    assert (s.success.count, s.fail.count, s.inference_count) == (1, 1, 3)
    assert s.compute_output == Duration(1, 2_000_000)
    assert s.last_inference_ms == 1_700_000_000_500
    assert s.success.ns > 0 and s.fail.ns > 0


def test_a_snapshot_does_not_move_with_later_calls():
    stats = ModelStats()
    stats.prepared(0.001)
    before = stats.snapshot()
    stats.prepared(0.001)
    stats.observe_batch(BatchStats(queue_waits=[0.0], views=1, seconds=0.001))
    assert before.compute_input == Duration(1, 1_000_000) and before.batches == {}
    assert stats.snapshot().compute_input == Duration(2, 2_000_000)
