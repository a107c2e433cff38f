"""`trainer` through its real entry point: a whole run, --resume after a kill, and user errors.

The whole run is the session's `trainer_run` (tests/conftest.py), shared with the end-to-end and
serving CLI tests; tests here read it and copy it before they change it."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAINER_RUN_FLAGS, differing_tensors, epochs_as_trained, write_colour_dataset
from PIL import Image

TRAINER = shutil.which("trainer")
pytestmark = pytest.mark.skipif(not TRAINER, reason="console script not installed (pip install -e .)")

RUN_FILES = [
    "config.json",
    "history.csv",
    "lr_find.png",
    "lr_find_unfrozen.png",
    "schedule.png",
    "losses.png",
    "confusion_matrix.png",
    "most_incorrect.png",
    "most_uncertain.png",
    "most_correct.png",
    "calibration.png",
    "metrics.json",
    "report.html",
    "bundle/model.onnx",
    "bundle/manifest.json",
]


def trainer(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TRAINER, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw, check=False
    )


def epochs(run: Path) -> int:
    return len(epochs_as_trained(run))


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture
def data(colour_data) -> Path:
    return colour_data


@pytest.fixture
def full_run(trainer_run) -> Path:
    return trainer_run.path


def test_run_writes_every_file(full_run):
    for name in RUN_FILES:
        assert (full_run / name).is_file(), f"{name} missing"
    for png in full_run.glob("*.png"):
        with Image.open(png) as im:
            im.verify()
    assert epochs(full_run) == 1 + 1 + 3  # head, head with augmentation, unfrozen cycles 1 + 2
    html = (full_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(list(full_run.glob("*.png"))) >= 8
    assert 'class="missing"' not in html


def test_run_calibrates_its_probabilities_and_says_so_everywhere(full_run):
    metrics, manifest = metrics_of(full_run), manifest_of(full_run / "bundle")
    t = metrics["temperature"]
    assert 0.05 <= t <= 20 and manifest["metrics"] == {k: v for k, v in metrics.items() if k != "held_out"}
    # Fitted to what the bundle serves by default; T = 1 is among the temperatures tried, so the
    # fitted one never raises the log loss it minimises.
    served = "_tta" if manifest["tta"]["default"] else ""
    assert metrics["temperature_for_tta"] == float(manifest["tta"]["default"])
    assert metrics[f"log_loss{served}"] <= metrics[f"log_loss{served}_uncalibrated"]
    for key in ("ece", "ece_tta", "ece_uncalibrated", "ece_tta_uncalibrated"):
        assert 0 <= metrics[key] <= 1, key
    html = (full_run / "report.html").read_text()
    assert f"temperature {t:.3f} fitted on validation" in html and "reliability diagram" in html


def test_the_report_opens_with_what_the_bundle_serves(trainer_run):
    """One line first, in words: the served accuracy, with or without TTA as the bundle's default
    chose, calibrated, and on how many held-out images; before any table of raw keys."""
    run = trainer_run.path
    metrics, manifest = metrics_of(run), manifest_of(run / "bundle")
    tta = manifest["tta"]["default"]
    served = "_tta" if tta else ""
    n_valid = len([f for f in (trainer_run.data / "valid").rglob("*") if f.is_file()])
    html = (run / "report.html").read_text()
    line = (
        f"served accuracy {100 * metrics[f'accuracy{served}']:.1f}% {'with' if tta else 'without'} TTA "
        f"(the bundle&#x27;s default), calibrated: log loss {metrics[f'log_loss{served}']:.3f}, "
        f"ECE {metrics[f'ece{served}']:.3f}, on {n_valid} held-out validation images"
    )
    assert line in html, html[:2000]
    assert html.index(line) < html.index("<h2>")


def test_run_files_are_readable_by_other_users(full_run):
    """A server in a container runs as another user than the trainer: bundle, report, plots and CSVs
    must be 0644 and folders 0755 under umask 022, as files written with plain open() would be."""
    paths = [full_run, *full_run.rglob("*")]
    assert {p.relative_to(full_run).as_posix() for p in paths} >= set(RUN_FILES)
    wrong = {
        p.relative_to(full_run).as_posix(): oct(p.stat().st_mode & 0o777)
        for p in paths
        if p.stat().st_mode & 0o777 != (0o755 if p.is_dir() else 0o644)
    }
    assert not wrong, wrong


# `trainer run` with one change, made from outside: once `after` epochs are trained and checkpointed
# it prints PAUSED and waits on its stdin, which the test never closes. The test kills it there, at
# a point it knows, instead of at whatever point a fast machine had reached (or after it finished).
PAUSED = "test gate: paused after epoch"
PAUSING_TRAINER = f"""
import sys

from trainer.cli import main
from trainer.learn.learner import ConvLearner

after = int(sys.argv[1])
fit = ConvLearner.fit


def fit_then_pause(self, *args, on_epoch_end, **kwargs):
    def end(epochs):
        on_epoch_end(epochs)  # the recipe's checkpoint
        if len(self.history) == after:
            print("{PAUSED}", after, flush=True)
            sys.stdin.read()

    return fit(self, *args, on_epoch_end=end, **kwargs)


ConvLearner.fit = fit_then_pause
sys.exit(main(sys.argv[2:]))
"""
# The first of the unfrozen stage's 3 epochs: mid-stage, after lr_find_unfrozen chose its lr and
# the first SGDR snapshot was saved, with 2 epochs and all of evaluation and export still to come.
KILL_AFTER = 3


def test_resume_after_a_kill_ends_as_the_uninterrupted_run(trainer_run, tmp_path):
    """SIGKILL after epoch KILL_AFTER, then `trainer run --resume`: the same epochs, weights and
    metrics as the session's uninterrupted run with the same flags (the recipe resumes exactly)."""
    out = tmp_path / "run"
    argv = [sys.executable, "-c", PAUSING_TRAINER, str(KILL_AFTER), "run", "--data", str(trainer_run.data)]
    with (
        open(tmp_path / "stderr.txt", "w") as stderr,
        subprocess.Popen(
            [*argv, "--out", str(out), *trainer_run.flags],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as proc,
    ):
        try:
            # The child waits at the gate once it says so; its output ends instead if it fails first.
            if not any(line.startswith(PAUSED) for line in proc.stdout):
                pytest.fail(
                    f"the run failed before epoch {KILL_AFTER}: {(tmp_path / 'stderr.txt').read_text()[-3000:]}"
                )
            assert epochs(out) == KILL_AFTER
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not (out / "bundle").exists()

    done = trainer("run", "--out", out, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed: stage" in done.stdout, done.stdout
    assert epochs_as_trained(out) == epochs_as_trained(trainer_run.path)
    weights = [torch.load(run / "models" / "final.pt", weights_only=True) for run in (out, trainer_run.path)]
    assert not differing_tensors(*weights)
    assert metrics_of(out) == pytest.approx(metrics_of(trainer_run.path), abs=1e-6)
    assert (out / "bundle" / "model.onnx").is_file()


@pytest.mark.parametrize(
    "what", ["missing folder", "no classes", "one class", "csv columns", "unknown arch", "weights"]
)
def test_user_errors_are_one_line(what, tmp_path, data):
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    args = ["run", "--data", root, "--out", tmp_path / "out", *TRAINER_RUN_FLAGS]
    expected = {
        "missing folder": "no such folder",
        "no classes": "no class folders",
        "one class": "only one class",
        "csv columns": "no column named 'breed'",
        "unknown arch": "unknown architecture",
        "weights": "not found at",
    }[what]
    if what == "missing folder":
        args[2] = tmp_path / "nowhere"
    elif what == "one class":
        write_colour_dataset(root, {"train": 2})
        shutil.rmtree(root / "train" / "red")
    elif what == "csv columns":
        (root / "labels.csv").write_text("id,label\nred00,red\n")
        args += ["--csv", "labels.csv", "--folder", "train", "--label-col", "breed"]
    elif what == "unknown arch":
        args += ["--arch", "vgg_nonexistent"]
    elif what == "weights":
        args = ["run", "--data", data, "--out", tmp_path / "out", "--arch", "resnet34", "--weights", tmp_path / "r.pth"]
    proc = trainer(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_full_trains_on_train_and_valid(data, tmp_path):
    out = tmp_path / "full"
    proc = trainer("run", "--data", data, "--out", out, *TRAINER_RUN_FLAGS, "--unfreeze-cycles", "0", "--full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: 24 train, 8 valid" in proc.stdout  # 16 + 8 training images
    assert "threads: " in proc.stdout and " for torch (from " in proc.stdout
    assert manifest_of(out / "bundle")["recipe"]["full"] is True


class TestStepCommands:
    def test_tta_fit_predict_on_a_finished_run(self, full_run, data, tmp_path):
        run = tmp_path / "run"
        shutil.copytree(full_run, run)
        tta = trainer("tta", "--run", run)
        assert tta.returncode == 0, tta.stderr[-2000:]
        assert "validation, calibrated: centre view accuracy" in tta.stdout and "; TTA (" in tta.stdout
        before = epochs(run)
        fit = trainer("fit", "--run", run, "--lr", "0.01", "--cycles", "2")
        assert fit.returncode == 0, fit.stderr[-2000:]
        assert epochs(run) == before + 2
        # Unfrozen, as the run was trained: with bn_freeze the backbone's BatchNorm statistics stay.
        stats = lambda: {k: v for k, v in torch.load(run / "models" / "final.pt").items() if "running_" in k}  # noqa: E731
        start = stats()
        fit = trainer("fit", "--run", run, "--lr", "0.001", "--unfreeze", "--cycles", "1")
        assert fit.returncode == 0, fit.stderr[-2000:]
        moved = [k for k, v in stats().items() if not torch.equal(v, start[k])]
        backbone = [k for k in moved if k.startswith("backbone.")]
        assert not backbone, f"fit --unfreeze trained the frozen BatchNorm statistics: {backbone[:3]}"
        predict = trainer("predict", "--run", run, "--test", data / "valid" / "red", "--top-label")
        assert predict.returncode == 0, predict.stderr[-2000:]
        rows = list(csv.reader((run / "submission.csv").open()))
        assert rows[0] == ["id", "label"] and len(rows) == 1 + 4

    def test_lr_find_sizes_and_resize_on_a_dataset(self, data, fresh_copy, tmp_path):
        data = fresh_copy(data)  # `trainer resize` writes its cache into the dataset folder
        out = tmp_path / "lr"
        found = trainer("lr-find", "--data", data, "--out", out, "--size", "32", "--bs", "4", "--num-workers", "0")
        assert found.returncode == 0, found.stderr[-2000:]
        assert "lr: " in found.stdout and (out / "lr_find.png").is_file()
        sizes = trainer("sizes", "--data", data, "--out", tmp_path)
        assert sizes.returncode == 0 and "24 images; width median 40" in sizes.stdout
        Image.open(tmp_path / "sizes.png").verify()
        resized = trainer("resize", "--data", data, "--target", "20")
        assert resized.returncode == 0, resized.stderr
        cached = list((data / "tmp" / "20").rglob("*.png"))
        assert cached and all(min(Image.open(p).size) == 20 for p in cached)


class TestExport:
    def test_re_export_records_the_runs_recipe_and_metrics(self, full_run, tmp_path):
        proc = trainer("export", "--run", full_run, "--out", tmp_path / "b")
        assert proc.returncode == 0, proc.stderr[-2000:]
        own, again = manifest_of(full_run / "bundle"), manifest_of(tmp_path / "b")
        assert {"epochs", "lr", "stages"} <= set(own["recipe"])
        assert again["recipe"] == own["recipe"]
        assert set(again["metrics"]) == set(own["metrics"]) >= {"accuracy", "log_loss", "accuracy_tta", "log_loss_tta"}
        assert again["metrics"] == pytest.approx(own["metrics"], abs=1e-5)

    def test_snapshots_after_progressive_resizing_average_only_the_last_size(self, data, tmp_path):
        run = tmp_path / "run"
        proc = trainer(
            "run",
            "--data",
            data,
            "--out",
            run,
            "--sizes",
            "32,40",
            "--lr",
            "0.01",
            "--bs",
            "4",
            "--head-epochs",
            "1",
            "--aug-cycles",
            "0",
            "--unfreeze-cycles",
            "1",
            "--num-workers",
            "0",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        ens = trainer("export", "--run", run, "--snapshots", "--out", tmp_path / "ens")
        assert ens.returncode == 0, ens.stderr[-2000:]
        assert "skipping 1 snapshot(s) not trained at the bundle's 40 px: snapshot_32_cyc_0 (32 px)" in ens.stdout
        manifest = manifest_of(tmp_path / "ens")
        assert manifest["ensemble"] == ["snapshot_40_cyc_0"]
        assert manifest["recipe"]["sizes"] == [32, 40] and "accuracy" in manifest["metrics"]


def test_fit_and_tta_say_that_bundle_and_report_describe_the_previous_model(full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    refresh = f"trainer export --run {run}"
    tta = trainer("tta", "--run", run)
    assert tta.returncode == 0 and refresh not in tta.stdout, "nothing is outdated before a fit"
    fit = trainer("fit", "--run", run, "--lr", "0.01", "--cycles", "1")
    assert fit.returncode == 0, fit.stderr[-2000:]
    last = fit.stdout.strip().splitlines()[-1]
    assert "bundle/" in last and "report.html" in last and "before `trainer fit`" in last and refresh in last
    tta = trainer("tta", "--run", run)
    assert tta.returncode == 0, tta.stderr[-2000:]
    assert "bundle/" in tta.stdout and "report.html" in tta.stdout and refresh in tta.stdout
    assert trainer("export", "--run", run).returncode == 0
    assert refresh not in trainer("tta", "--run", run).stdout, "the re-exported bundle is current"


def test_fit_trains_and_validates_without_the_old_temperature(full_run, tmp_path):
    """The run's temperature belongs to the weights `trainer fit` changes: the new epochs' validation
    loss is that of the plain softmax, as the run's own epochs' were."""
    from trainer import commands
    from trainer.evaluate.metrics import log_loss
    from trainer.outputs.run_folder import RunFolder

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    assert RunFolder(run).temperature() != 1.0
    learn = commands.fit(
        run, 0.01, cycles=1, cycle_len=1, cycle_mult=1, unfreeze=False, lr_ratio=10, precompute=True, log=lambda _: None
    )
    assert learn.temperature == 1.0 and RunFolder(run).temperature() == 1.0  # metrics.json is now older
    learn.precompute = True
    assert learn.history[-1].val_loss == pytest.approx(log_loss(learn.predict("valid"), np.asarray(learn.data.val_y)))


def test_help_answers_without_loading_torch():
    """`trainer --help` and every subcommand's help parse before PyTorch loads (it takes seconds)."""
    code = (
        "import sys\nfrom trainer.cli import main\n"
        "for argv in (['--help'], ['run', '--help'], ['fit', '--help'], ['export', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "False"
