"""The GPU check: train, export and serve on a machine with an NVIDIA GPU, one table at the end.

Run by bench/gpu_check.sh (which says how to prepare the machine). Steps, each a command a user runs:

1. `trainer run` with its defaults (224 px, batch 64, mixed precision and channels_last on CUDA) on the
   data given (hymenoptera by default); device memory is read from nvidia-smi every 0.2 s throughout.
2. `trainer export --fp16`: the fp16 variant's validation accuracy with TTA, against fp32's.
3. `bench/serving.py --device cuda`: the bundle served with the CUDA provider, fp32 and fp16, p50
   latency at 1 caller and throughput with 16, against the same work in-process.

Images/s per stage counts each epoch's training and validation images over its wall time. --cpu runs the
same steps without a GPU (a smoke test of this script, on small data and few epochs: --trainer-args).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class DeviceMemory:
    """Peak memory in use on GPU 0 by nvidia-smi's count (the CUDA context included), polled in a thread."""

    def __init__(self, every_s: float = 0.2):
        self.peak_mib = 0
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def __enter__(self) -> DeviceMemory:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(self._every_s):
            used = _nvidia_smi("memory.used")
            if used:
                self.peak_mib = max(self.peak_mib, int(used.split()[0]))


def _nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "--id=0"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def run(command: list[str], log: Path) -> float:
    """Run a command with its output in `log` (and its tail on failure); returns wall seconds."""
    print(f"$ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"gpu_check: {command[0]} {command[1]} failed with {done.returncode}; the log is {log}")
    return seconds


def stages(run_dir: Path, images_per_epoch: int) -> list[tuple[str, int, float, float]]:
    """(stage, epochs, seconds, images/s) from the run's history.csv, in the order trained."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    with (run_dir / "history.csv").open() as f:
        for row in csv.DictReader(f):
            totals[row["stage"]][0] += 1
            totals[row["stage"]][1] += float(row["seconds"])
    return [(name, int(n), s, n * images_per_epoch / s) for name, (n, s) in totals.items()]


def count_images(data: Path) -> int:
    return sum(1 for p in data.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hymenoptera")
    parser.add_argument("--val-name", default="val")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--trainer-args", default="", help="more `trainer run` flags, as one string")
    parser.add_argument("--cpu", action="store_true", help="run without a GPU: a smoke test of this script")
    args = parser.parse_args(argv)

    device = "cpu" if args.cpu else "cuda"
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA device; run it on a GPU machine (or --cpu to test the script)")
            return 2
    if not (args.data / args.val_name).is_dir():
        print(f"gpu_check: {args.data / args.val_name} is missing; give --data (a folder with train/ and val/)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir, bundle = args.out / "run", args.out / "bundle"
    gpu = _nvidia_smi("name") or "no GPU"
    python = sys.executable
    train = [python, "-m", "trainer.cli", "run", "--data", str(args.data), "--val-name", args.val_name]
    train += ["--out", str(run_dir), "--num-workers", str(min(8, os.cpu_count() or 2))]
    train += shlex.split(args.trainer_args)
    with DeviceMemory() as memory:
        train_s = run(train, args.out / "train.log")
    export_s = run(
        [python, "-m", "trainer.cli", "export", "--run", str(run_dir), "--out", str(bundle), "--fp16"],
        args.out / "export.log",
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    fp16 = next(v for v in manifest["variants"] if v["precision"] == "fp16")
    serving_json = args.out / "serving.json"
    serve = [python, str(ROOT / "bench" / "serving.py"), "--bundle", str(bundle), "--device", device]
    serve += ["--photos", str(args.data / args.val_name), "--precisions", "fp32,fp16", "--batching", "on"]
    serve += ["--concurrency", "1,16", "--rounds", "1", "--json", str(serving_json)]
    run(serve, args.out / "serving.log")
    served = json.loads(serving_json.read_text())

    n_images = count_images(args.data / args.val_name) + count_images(args.data / "train")
    print(f"\nGPU check: {gpu}; {args.data.name}, {n_images} images; device {device}\n")
    print(f"{'what':<58} {'figure':>22}")
    for name, epochs, _seconds, rate in stages(run_dir, n_images):
        print(f"{'train: ' + name:<58} {f'{epochs} ep, {rate:.0f} img/s':>22}")
    print(f"{'train: whole trainer run (lr_find, TTA, export, report)':<58} {f'{train_s:.1f} s':>22}")
    peak = f"{memory.peak_mib} MiB" if memory.available else "n/a (no nvidia-smi)"
    print(f"{'train: peak GPU memory in use (nvidia-smi)':<58} {peak:>22}")
    accuracy = manifest["metrics"].get("accuracy_tta", float("nan"))
    print(f"{'export --fp16':<58} {f'{export_s:.1f} s':>22}")
    print(f"{'accuracy with TTA: fp32':<58} {accuracy:>22.4f}")
    change = f"{fp16['accuracy_tta']:.4f} ({fp16['accuracy_tta_delta']:+.4f})"
    print(f"{'accuracy with TTA: fp16 (change)':<58} {change:>22}")
    for row in served["rows"]:
        c = row["concurrency"]
        what = f"serve {row['setting']}, {c} caller{'s' if c > 1 else ''}"
        figure = f"p50 {row['p50_ms']:.1f} ms" if c == 1 else f"{row['throughput']:.0f} img/s"
        print(f"{what:<58} {figure:>22}")
        ratio = row["ratio_p50"] if c == 1 else row["ratio_rate"]
        print(f"{'  against the same work in-process':<58} {f'{ratio:.2f}x':>22}")
    for setting, seconds in served["startup_s"].items():
        print(f"{'serve ' + setting + ': process start to SERVING':<58} {f'{seconds:.1f} s':>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
