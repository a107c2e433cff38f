"""Does training without the likely label errors `trainer clean` finds pay? (issue 28)

    python bench/label_errors.py --keep /tmp/le          # catbreeds: three runs, about 20 min on 2 cores
    python bench/label_errors.py --keep /tmp/le --reuse  # runs whose folder is complete are not run again

On catbreeds (owner labels, noisy), in the same run, with the same random validation split:

1. `trainer run` with no flags but the data: the baseline;
2. `trainer clean` on it: label_errors.csv (the images confident learning flags);
3. `trainer run --exclude` of every flagged training image, and of the --top flagged training images
   only (the first rows of the CSV, lowest probability of the given label first).

Each run is scored on every validation image, and on the validation images clean did not flag
(their owners' labels are the likelier right there): the served view (the centre view unless the
bundle turned TTA on), from the final weights. Validation keeps its images in every run: --exclude
leaves them alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
# `python bench/label_errors.py` puts bench/ first on sys.path, where bench/serving.py would hide
# the serving package; the project root instead.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]
CATBREEDS = ROOT.parent / "shared" / "data" / "catbreeds"


def trainer(*args: str) -> float:
    """Run a trainer command to completion; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainer", *args], check=True, cwd=ROOT)
    return time.perf_counter() - start


def train(flags: list[str], out: Path, *extra: str, reuse: bool) -> float | None:
    if reuse and (out / "metrics.json").is_file():
        return None
    return trainer("run", *flags, "--out", str(out), *extra)


def flagged(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def served_accuracy(run: Path, data: Path, leave_out: set[str]) -> tuple[float, float, int]:
    """Accuracy of the run's served view on all validation images and on those not in `leave_out`."""
    from serving.bundle.manifest import read_manifest
    from trainer.data.assemble import relative
    from trainer.outputs.run_folder import RunFolder

    learn = RunFolder(run).learner(lambda line: None)
    probs = learn.TTA()[0] if read_manifest(run / "bundle").tta.default else learn.predict("valid")
    y = np.asarray(learn.data.val_y)
    right = probs.argmax(axis=1) == y
    keep = np.asarray([relative(f, data) not in leave_out for f in learn.data.val_files])
    return float(right.mean()), float(right[keep].mean()), int(keep.sum())


def _ratio(accuracy: float, baseline: float) -> str:
    return f"{(1 - accuracy) / (1 - baseline):.2f}x" if baseline < 1 else "n/a (the baseline made no error)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=Path, required=True, help="folder for the runs")
    p.add_argument("--top", type=int, default=50, help="flagged training images the second variant leaves out")
    p.add_argument("--reuse", action="store_true", help="keep runs whose folder is complete")
    p.add_argument("--data", type=Path, default=CATBREEDS, help="dataset (default: ../shared/data/catbreeds)")
    p.add_argument("--csv", default="labels.csv", help="its labels CSV; empty for a folder dataset")
    p.add_argument("--trainer-args", default="", help="more `trainer run` flags, e.g. for a quick check")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"{args.data}: missing; this benchmark needs ../shared/data/catbreeds", file=sys.stderr)
        return 1
    keep: Path = args.keep
    flags = ["--data", str(args.data), *(["--csv", args.csv] if args.csv else []), *args.trainer_args.split()]
    seconds = {"all training images": train(flags, keep / "base", reuse=args.reuse)}
    trainer("clean", "--run", str(keep / "base"))
    rows = flagged(keep / "base" / "label_errors.csv")
    top = keep / f"top{args.top}.csv"
    train_rows = [r for r in rows if r["split"] == "train"]
    top.write_text("file\n" + "".join(f"{r['file']}\n" for r in train_rows[: args.top]))
    runs = {"all training images": keep / "base"}
    for name, out, listed in (
        (f"without all {len(train_rows)} flagged", keep / "all_flagged", keep / "base" / "label_errors.csv"),
        (f"without the top {min(args.top, len(train_rows))} flagged", keep / f"top{args.top}", top),
    ):
        seconds[name] = train(flags, out, "--exclude", str(listed), reuse=args.reuse)
        runs[name] = out
    valid_flagged = {r["file"] for r in rows if r["split"] == "valid"}
    print(
        f"\n{args.data.name}: {len(rows)} flagged by trainer clean ({len(train_rows)} train, {len(valid_flagged)} valid)"
    )
    print("| training set | train images | valid accuracy (all) | valid accuracy (not flagged) | seconds |")
    print("| --- | --- | --- | --- | --- |")
    results = {}
    for name, run in runs.items():
        every, unflagged, n = served_accuracy(run, args.data, valid_flagged)
        trained = json.loads((run / "data_check.json").read_text())["classes"]["train"]
        took = seconds[name]
        print(
            f"| {name} | {sum(trained.values())} | {every:.1%} | {unflagged:.1%} (of {n}) | "
            f"{'reused' if took is None else f'{took:.0f}'} |"
        )
        results[name] = (every, unflagged)
    base = results["all training images"]
    for name, (every, unflagged) in results.items():
        if name != "all training images":
            print(
                f"ratio: {name}: error {_ratio(every, base[0])} the baseline's on all validation images, "
                f"{_ratio(unflagged, base[1])} on those not flagged"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
