"""Model quality: the default recipe against a linear probe on frozen features, measured in the same run.

For each dev set the baseline is the cheapest model worth comparing with: the backbone's pooled
ImageNet features of the centre view (no augmentation), standardised, and scikit-learn's
logistic regression with the C of a grid that scores best on the validation images themselves (an
optimistic baseline: its C is chosen on the data it is scored on). The recipe is `trainer run`
started as a user starts it, with no flags but the data. Both see the same images and the same
validation split.

    python bench/quality.py                       # hymenoptera, catbreeds, digits (about 25 min on 2 cores)
    python bench/quality.py --sets hymenoptera    # one set
    python bench/quality.py --quick               # digits only, under a minute

Accuracy here is what the bundle serves to a call that does not say (TTA or not, as its manifest's
tta.default chose); log loss and the expected calibration error (ECE, 15 bins) likewise, after the
temperature the export fitted. Prints a table, then per set the ratios it exists for: the recipe's
error rate over the baseline's (below 1 is better), its accuracy gain in points and its wall time
over the baseline's. --json writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # the probe's progress bars would bury the table

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class DevSet:
    name: str
    flags: tuple[str, ...]  # what `trainer run` is given: the data, and nothing else
    needs: Path | None  # skipped, with a reason, where this is absent


# The digits run at the demo's size and augmentation (`trainer demo`; 8x8 scans are not flipped),
# with the recipe's unfrozen stage kept but shortened: the defaults at 224 px would spend a quarter
# of an hour on them.
DIGITS_FLAGS = ("--size", "64", "--crop-pct", "1.0", "--aug", "basic", "--head-epochs", "3", "--aug-cycles", "1")
SETS = {
    "hymenoptera": DevSet(
        "hymenoptera", ("--data", str(SHARED / "hymenoptera"), "--val-name", "val"), SHARED / "hymenoptera"
    ),
    "catbreeds": DevSet(
        "catbreeds", ("--data", str(SHARED / "catbreeds"), "--csv", "labels.csv"), SHARED / "catbreeds"
    ),
    "digits": DevSet("digits", (*DIGITS_FLAGS, "--unfreeze-cycles", "2"), None),
}


@dataclass
class Score:
    accuracy: float
    log_loss: float
    ece: float
    seconds: float
    detail: str


def run_config(dev: DevSet, out: Path):
    """The RunConfig `trainer run` builds from the set's flags: the baseline reads the same data."""
    from trainer.cli import config, parser

    return config(parser().parse_args(["run", *dev.flags, "--out", str(out)]))


def linear_probe(dev: DevSet, work: Path) -> Score:
    """Frozen pooled features of the centre view + logistic regression, best C on validation."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from trainer.assemble import make_data
    from trainer.calibrate import expected_calibration_error
    from trainer.learner import ConvLearner
    from trainer.metrics import accuracy, log_loss

    started = time.perf_counter()
    cfg = run_config(dev, work / "probe")
    data = make_data(cfg, cfg.train_sizes[-1], cfg.out)
    torch.manual_seed(cfg.seed)
    learn = ConvLearner.pretrained(
        cfg.arch, data, precompute=True, work_dir=work / "probe_cache", log=lambda _: None, weights=cfg.weights
    )
    # The pooled features are [max, mean] (the lesson's concat pooling): the probe takes the mean,
    # the global average pooling a linear probe conventionally uses.
    n = learn.net.n_pooled // 2
    x_trn, x_val = (learn._features[name][:, n:].numpy() for name in ("train", "valid"))
    y_trn, y_val = np.asarray(data.trn_y), np.asarray(data.val_y)
    scaler = StandardScaler().fit(x_trn)
    x_trn, x_val = scaler.transform(x_trn), scaler.transform(x_val)
    best = None
    for c in C_GRID:
        probs = LogisticRegression(C=c, max_iter=5000).fit(x_trn, y_trn).predict_proba(x_val)
        key = (accuracy(probs, y_val), -log_loss(probs, y_val))
        if best is None or key > best[0]:
            best = (key, c, probs)
    assert best is not None
    (_, c, probs) = best
    return Score(
        accuracy(probs, y_val),
        log_loss(probs, y_val),
        expected_calibration_error(probs, y_val),
        time.perf_counter() - started,
        f"C={c:g} of {len(C_GRID)}, {len(y_trn)} train / {len(y_val)} valid",
    )


def recipe(dev: DevSet, work: Path) -> Score:
    """`trainer run` with the set's data flags only, in a subprocess, timed from start to exit."""
    out = work / "run"
    cmd = [sys.executable, "-m", "trainer.cli", "run", *dev.flags, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    (work / "run.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); its output is in {work / 'run.log'}")
    metrics = json.loads((out / "metrics.json").read_text())
    tta = json.loads((out / "bundle" / "manifest.json").read_text())["tta"]["default"]
    suffix = "_tta" if tta else ""
    return Score(
        metrics[f"accuracy{suffix}"],
        metrics[f"log_loss{suffix}"],
        metrics[f"ece{suffix}"],
        seconds,
        f"TTA {'on' if tta else 'off'}, T={metrics['temperature']:.2f}, ECE before T "
        f"{metrics[f'ece{suffix}_uncalibrated']:.3f}, {len(_epochs(out))} epochs",
    )


def _epochs(run: Path) -> list[str]:
    lines = (run / "history.csv").read_text().splitlines()
    return lines[1:]


def machine() -> str:
    cpus = os.cpu_count()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "torch not installed"
    return f"{platform.node()}: {platform.processor() or platform.machine()}, {cpus} CPUs, {gpu}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="hymenoptera,catbreeds,digits", help="comma-separated dev sets")
    parser.add_argument("--quick", action="store_true", help="digits only (under a minute)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--keep", type=Path, help="keep the runs under this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    names = ["digits"] if args.quick else [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown:
        parser.error(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(SETS)}")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="quality-"))
    results: dict[str, dict] = {}
    print(f"machine: {machine()}", flush=True)
    for name in names:
        dev = SETS[name]
        if dev.needs is not None and not dev.needs.is_dir():
            print(f"{name}: skipped, {dev.needs} is absent", flush=True)
            continue
        work = root / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        print(f"{name}: linear probe ...", flush=True)
        base = linear_probe(dev, work)
        print(f"{name}: trainer run {' '.join(dev.flags)} ...", flush=True)
        ours = recipe(dev, work)
        results[name] = {"baseline": asdict(base), "recipe": asdict(ours)}
        print(_table({name: results[name]}), flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(_table(results))
    print()
    for name, r in results.items():
        b, o = r["baseline"], r["recipe"]
        print(
            f"{name}: error rate ratio {(1 - o['accuracy']) / max(1 - b['accuracy'], 1e-9):.2f} (recipe/baseline), "
            f"accuracy {100 * (o['accuracy'] - b['accuracy']):+.1f} points, "
            f"wall time ratio {o['seconds'] / b['seconds']:.1f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")
    return 0


def _table(results: dict[str, dict]) -> str:
    rows = ["| set | model | accuracy | log loss | ECE | wall s | detail |", "|---|---|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        for label, key in (("linear probe", "baseline"), ("trainer run", "recipe")):
            s = r[key]
            rows.append(
                f"| {name} | {label} | {s['accuracy']:.4f} | {s['log_loss']:.4f} | {s['ece']:.4f} | "
                f"{s['seconds']:.0f} | {s['detail']} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
