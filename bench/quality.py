"""Model quality: the default recipe against a linear probe and fastai's fine_tune, in the same run.

For each dev set, on the same images and validation split:

- **linear probe**: the backbone's pooled ImageNet features of the centre view (no augmentation),
  standardised, and scikit-learn's logistic regression. Twice: with the C of a grid that scores best
  on the validation images themselves (optimistic: its C is chosen on what it is scored on), and
  with the C that 5-fold cross-validation on the training images picks (an honest baseline).
- **trainer run**: `trainer run` started as a user starts it, with no flags but the data, timed from
  start to exit (training, TTA, calibration, export, report), its caches cold, its peak RSS polled.
- **fastai fine_tune**: bench/fastai_peer.py's `recipe` (fastai 2.8's data pipeline and
  `fine_tune(4)` on our split and pretrained network, in fastai's default memory layout), run with
  the python of its own virtualenv (--fastai-python); skipped, saying so, where that is absent.

    python bench/quality.py                       # hymenoptera, catbreeds, digits (about 25 min on 2 cores)
    python bench/quality.py --sets hymenoptera    # one set
    python bench/quality.py --quick               # digits only, about a minute

Accuracy here is what the bundle serves to a call that does not say (TTA or not, as its manifest's
tta.default chose); log loss and the expected calibration error (ECE, 15 bins) likewise, after the
temperature the export fitted. fastai's are of its last epoch's softmax, uncalibrated, as
`get_preds` returns them. Prints a table, then per set the ratios of issue 25's goal: accuracy
against fastai's, wall time over fastai's, error rate over the cross-validated probe's, peak RSS.
--json writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # the probe's progress bars would bury the table

ROOT = Path(__file__).resolve().parents[1]
# `python bench/quality.py` puts bench/ first on sys.path, where bench/serving.py would hide the
# serving package that trainer imports; the project root instead, for bench.training.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]
SHARED = ROOT.parent / "shared" / "data"
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
FOLDS = 5
FASTAI_PYTHON = ROOT / "bench" / ".venv-fastai" / "bin" / "python"
GOAL = {"wall": 0.5, "error": 0.9, "rss_gb": 3.5}  # issue 25: of fastai's wall, of the CV probe's error; GB


@dataclass(frozen=True)
class DevSet:
    name: str
    flags: tuple[str, ...]  # what `trainer run` is given: the data, and nothing else
    needs: Path | None  # skipped, with a reason, where this is absent
    peer: tuple[str, ...] = ()  # bench/fastai_peer.py's data flags; () runs no fastai


def demo_flags() -> tuple[str, ...]:
    """`trainer run`'s flags for the digits as `trainer demo` trains them (trainer.demo.demo_config)."""
    from trainer.config import RunConfig
    from trainer.demo import demo_config

    demo, default = demo_config(Path("unused")).model_dump(), RunConfig().model_dump()
    flags: list[str] = []
    for name, value in demo.items():
        if name != "out" and value != default[name]:
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + name.replace("_", "-"))
            else:
                flags += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return tuple(flags)


def sets() -> dict[str, DevSet]:
    hymenoptera, catbreeds = SHARED / "hymenoptera", SHARED / "catbreeds"
    return {
        "hymenoptera": DevSet(
            "hymenoptera",
            ("--data", str(hymenoptera), "--val-name", "val"),
            hymenoptera,
            ("--data", str(hymenoptera), "--val-name", "val"),
        ),
        "catbreeds": DevSet(
            "catbreeds",
            ("--data", str(catbreeds), "--csv", "labels.csv"),
            catbreeds,
            ("--data", str(catbreeds), "--csv", "labels.csv"),
        ),
        "digits": DevSet("digits", demo_flags(), None),
    }


@dataclass
class Score:
    accuracy: float
    log_loss: float
    ece: float
    seconds: float
    detail: str
    peak_rss: float | None = None  # bytes: the largest RSS of the process (not of its loader workers)


def run_config(dev: DevSet, out: Path):
    """The RunConfig `trainer run` builds from the set's flags: the baseline reads the same data."""
    from trainer.cli import config, parser

    return config(parser().parse_args(["run", *dev.flags, "--out", str(out)]))


def linear_probes(dev: DevSet, work: Path) -> tuple[Score, Score]:
    """Frozen pooled features of the centre view + logistic regression: the C best on validation,
    and the C that cross-validation on the training images picks. Both times include the features."""
    import time

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from trainer.data.assemble import make_data
    from trainer.evaluate.calibrate import expected_calibration_error
    from trainer.evaluate.metrics import accuracy, log_loss
    from trainer.learn.learner import ConvLearner

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
    features = time.perf_counter() - started

    def model(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))

    t = time.perf_counter()
    probs = {c: model(c).fit(x_trn, y_trn).predict_proba(x_val) for c in C_GRID}  # each C fitted once
    on_valid = max(C_GRID, key=lambda c: (accuracy(probs[c], y_val), -log_loss(probs[c], y_val)))
    grid_seconds = time.perf_counter() - t
    t = time.perf_counter()
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=cfg.seed)
    cv = {c: cross_val_score(model(c), x_trn, y_trn, cv=folds, scoring="neg_log_loss").mean() for c in C_GRID}
    by_cv = max(C_GRID, key=lambda c: cv[c])
    cv_seconds = time.perf_counter() - t

    def score(c: float, seconds: float, how: str) -> Score:
        return Score(
            accuracy(probs[c], y_val),
            log_loss(probs[c], y_val),
            expected_calibration_error(probs[c], y_val),
            features + seconds,
            f"C={c:g} {how}, {len(y_trn)} train / {len(y_val)} valid",
        )

    return (
        score(on_valid, grid_seconds, f"of {len(C_GRID)}, best on validation"),
        score(by_cv, cv_seconds + grid_seconds / len(C_GRID), f"of {len(C_GRID)} by {FOLDS}-fold CV log loss on train"),
    )


def recipe(dev: DevSet, work: Path) -> Score:
    """`trainer run` with the set's data flags only, in a subprocess with cold caches, timed from
    start to exit, its peak RSS polled."""
    from bench.training import cold_cache, peak_memory

    out = work / "run"
    cmd = [sys.executable, "-m", "trainer.cli", "run", *dev.flags, "--out", str(out)]
    done = peak_memory(cmd, env=cold_cache(work))
    (work / "run.log").write_text(done.output)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); its output is in {work / 'run.log'}")
    metrics = json.loads((out / "metrics.json").read_text())
    tta = json.loads((out / "bundle" / "manifest.json").read_text())["tta"]["default"]
    suffix = "_tta" if tta else ""
    return Score(
        metrics[f"accuracy{suffix}"],
        metrics[f"log_loss{suffix}"],
        metrics[f"ece{suffix}"],
        done.seconds,
        f"TTA {'on' if tta else 'off'}, T={metrics['temperature']:.2f}, ECE before T "
        f"{metrics[f'ece{suffix}_uncalibrated']:.3f}, {len(_epochs(out))} epochs",
        done.main_rss,
    )


def fastai(dev: DevSet, work: Path, python: Path) -> Score:
    """bench/fastai_peer.py's fine_tune in fastai's own virtualenv, timed from start to exit."""
    from bench.training import peak_memory

    out = work / "fastai.json"
    peer = ROOT / "bench" / "fastai_peer.py"
    cmd = [str(python), str(peer), "recipe", *dev.peer, f"--work={work / 'fastai'}", f"--json={out}"]
    done = peak_memory(cmd)
    (work / "fastai.log").write_text(done.output)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); its output is in {work / 'fastai.log'}")
    r = json.loads(out.read_text())
    curve = ", ".join(f"{a:.3f}@{t:.0f}s" for a, t in r["curve"])
    return Score(
        r["accuracy"], r["log_loss"], r["ece"], done.seconds, f"fine_tune(4), per epoch {curve}", done.main_rss
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


LABELS = {
    "probe_valid": "linear probe, C on valid",
    "probe_cv": "linear probe, C by CV",
    "recipe": "trainer run",
    "fastai": "fastai fine_tune",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="hymenoptera,catbreeds,digits", help="comma-separated dev sets")
    parser.add_argument("--quick", action="store_true", help="digits only (about a minute)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--keep", type=Path, help="keep the runs under this folder (default: a temporary one)")
    parser.add_argument(
        "--fastai-python", type=Path, default=FASTAI_PYTHON, help="the python of fastai's virtualenv (bench/README.md)"
    )
    parser.add_argument("--no-fastai", action="store_true", help="skip fastai's fine_tune")
    args = parser.parse_args(argv)
    known = sets()
    names = ["digits"] if args.quick else [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="quality-"))
    results: dict[str, dict] = {}
    print(f"machine: {machine()}", flush=True)
    for name in names:
        dev = known[name]
        if dev.needs is not None and not dev.needs.is_dir():
            print(f"{name}: skipped, {dev.needs} is absent", flush=True)
            continue
        work = root / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        print(f"{name}: linear probes ...", flush=True)
        on_valid, by_cv = linear_probes(dev, work)
        results[name] = {"probe_valid": asdict(on_valid), "probe_cv": asdict(by_cv)}
        print(f"{name}: trainer run {' '.join(dev.flags)} ...", flush=True)
        results[name]["recipe"] = asdict(recipe(dev, work))
        if dev.peer and not args.no_fastai:
            if args.fastai_python.exists():
                print(f"{name}: fastai fine_tune ...", flush=True)
                results[name]["fastai"] = asdict(fastai(dev, work, args.fastai_python))
            else:
                print(f"{name}: fastai skipped, {args.fastai_python} is absent (bench/README.md says how to make it)")
        print(_table({name: results[name]}), flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(_table(results))
    print()
    for name, r in results.items():
        print("\n".join(goal_lines(name, r)))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")
    return 0


def goal_lines(name: str, r: dict) -> list[str]:
    """Issue 25's goal, one line a measure, each with its target and whether this run met it."""
    ours, cv = r["recipe"], r["probe_cv"]

    def line(what: str, value: str, met: bool) -> str:
        return f"{name}: {what}: {value} ({'met' if met else 'NOT met'})"

    error = (1 - ours["accuracy"]) / max(1 - cv["accuracy"], 1e-9)
    lines = [line("error rate / CV probe's", f"{error:.2f}, target <= {GOAL['error']}", error <= GOAL["error"])]
    if "fastai" in r:
        peer = r["fastai"]
        points = 100 * (ours["accuracy"] - peer["accuracy"])
        wall = ours["seconds"] / peer["seconds"]
        lines += [
            line("accuracy - fastai's", f"{points:+.1f} points, target >= 0", points >= 0),
            line("wall time / fastai's", f"{wall:.2f}, target <= {GOAL['wall']}", wall <= GOAL["wall"]),
        ]
    if ours["peak_rss"] is not None and name != "digits":
        gb = ours["peak_rss"] / 1e9
        lines.append(line("peak RSS", f"{gb:.2f} GB, target <= {GOAL['rss_gb']}", gb <= GOAL["rss_gb"]))
    return lines


def _table(results: dict[str, dict]) -> str:
    rows = [
        "| set | model | accuracy | log loss | ECE | wall s | peak RSS GB | detail |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        for key, label in LABELS.items():
            if key not in r:
                continue
            s = r[key]
            rss = f"{s['peak_rss'] / 1e9:.2f}" if s.get("peak_rss") else ""
            rows.append(
                f"| {name} | {label} | {s['accuracy']:.4f} | {s['log_loss']:.4f} | {s['ece']:.4f} | "
                f"{s['seconds']:.0f} | {rss} | {s['detail']} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
