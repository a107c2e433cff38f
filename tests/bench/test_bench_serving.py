"""bench/serving.py runs end to end on a tiny bundle: a real server process, real calls, its figures
written; what it measures (latency, throughput) is the benchmark's business, not this test's."""

from __future__ import annotations

import json

from conftest import bench_module, write_colour_dataset

bench = bench_module("serving")


def test_serving_bench_measures_the_server_against_the_in_process_limit(tmp_path, tiny_bundle, capsys):
    photos = write_colour_dataset(tmp_path / "photos", {"val": 3})
    out = tmp_path / "serving.json"
    argv = ["--bundle", str(tiny_bundle), "--photos", str(photos), "--precisions", "fp32", "--batching", "on,off"]
    argv += ["--images", "4", "--rounds", "2", "--concurrency", "1,3", "--threads", "--json", str(out)]
    argv += ["--protocols", "grpc,http-binary,http-json"]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {(r["setting"], r["concurrency"]): r for r in result["rows"]}
    protocols = ("", ", http-binary", ", http-json")  # gRPC's rows keep their names
    assert set(rows) == {(f"fp32, batching {b}{p}", c) for b in ("on", "off") for p in protocols for c in (1, 3)}
    for row in rows.values():
        assert row["calls"] == 8  # every image, every round
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["throughput"] > 0 and row["limit_rate"] > 0
        # The server answers what the same work in-process gives, by every binding: like is compared with like.
        assert row["max_prob_diff"] < 1e-5
    assert set(result["startup_s"]) == {"fp32, batching on", "fp32, batching off"}
    assert all(0 < s < 120 for s in result["startup_s"].values())
    assert len(result["threads"]) == 4
    printed = capsys.readouterr().out
    assert "server p50 at concurrency 1 / in-process p50" in printed
    assert "throughput at concurrency 3 / in-process serial rate" in printed
