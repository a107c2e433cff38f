"""Measure what loaded model versions cost in resident memory, as the server loads them.

    python scripts/model_memory.py BUNDLE [--versions 2] [--max-batch-views 64]

Loads the bundle `--versions` times, each as its own ONNX Runtime session warmed with a full batch
(what a hot switch holds at once: old and new), and prints the resident-set growth after each,
and its ratio to the model file's size: the basis of serving.repository.registry.memory_estimate. Linux only
(reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from serving.config import ServerConfig
from serving.monitoring import Metrics
from serving.repository.registry import open_model


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--versions", type=int, default=2)
    p.add_argument("--max-batch-views", type=int, default=64)
    args = p.parse_args()
    config = ServerConfig(bundle=args.bundle, device="cpu", max_batch_views=args.max_batch_views, metrics_port=None)
    metrics = Metrics()
    gc.collect()
    base = rss_bytes()
    loaded = []
    for i in range(1, args.versions + 1):
        loaded.append(open_model(config, metrics, args.bundle, number=i))
        gc.collect()
        grown = rss_bytes() - base
        size = loaded[0].session.model_path.stat().st_size
        estimate = loaded[0].cost_bytes
        print(
            f"{i} version(s) loaded: +{grown / 2**20:.1f} MiB resident, {grown / i / 2**20:.1f} MiB each, "
            f"{grown / i / size:.2f}x the {size / 2**20:.1f} MiB model file; estimate {estimate / 2**20:.1f} MiB each"
        )
    for m in loaded:
        m.batcher.close()


if __name__ == "__main__":
    main()
