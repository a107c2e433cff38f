"""The README's path through the real entry points: `trainer demo`, `serving serve`, `serving predict`."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys

import pytest

TRAINER, SERVING = shutil.which("trainer"), shutil.which("serving")
pytestmark = pytest.mark.skipif(not (TRAINER and SERVING), reason="console scripts not installed (pip install -e .)")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = subprocess.run(
        [TRAINER, "demo", "--out", str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_trains_serves_and_reports_accuracy(demo):
    out, stdout = demo
    assert (out / "bundle" / "model.onnx").is_file() and (out / "bundle" / "manifest.json").is_file()
    assert (out / "digits" / "train" / "7").is_dir() and (out / "digits" / "valid" / "7").is_dir()
    assert re.search(r"^\[  0, [\d.]+, [\d.]+, [\d.]+\]$", stdout, re.M), "no per-epoch table"
    found = re.search(r"accuracy on (\d+) validation images: served ([\d.]+), trainer TTA ([\d.]+)", stdout)
    assert found, stdout
    n, served, trainer_tta = int(found[1]), float(found[2]), float(found[3])
    assert n == 359 and served == trainer_tta
    assert served > 0.8, "ImageNet features + a new head should read handwritten digits"


def test_serve_predict_and_sigterm(demo):
    out, _ = demo
    server = subprocess.Popen(
        [SERVING, "serve", "--bundle", str(out / "bundle"), "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        port = re.search(r"serving on [\d.]+:(\d+)", line)
        assert port, line + server.stderr.read()
        image = next((out / "digits" / "valid" / "3").iterdir())
        proc = subprocess.run(
            [SERVING, "predict", str(image), "--target", f"127.0.0.1:{port[1]}", "--top-k", "2"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert re.search(rf"{re.escape(str(image))}: \d [\d.]+, \d [\d.]+  \[5 views\]", proc.stdout), proc.stdout
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.parametrize(
    "argv, message",
    [
        ([SERVING, "serve"], "bundle: Field required"),
        ([SERVING, "serve", "--bundle", "/nonexistent/bundle"], "no such bundle folder"),
        ([SERVING, "serve", "--bundle", "x", "--port", "99999"], "port: Input should be less than or equal to 65535"),
        ([SERVING, "serve", "--bundle", "x", "--tls-cert", "cert.pem"], "tls_cert: cert.pem: no such file"),
        ([SERVING, "serve", "--bundle", "x", "--max-queue", "8"], "max_batch_images 64 is more than max_queue 8"),
        ([TRAINER, "run", "--data", "/nonexistent/data"], "/nonexistent/data/train: no such folder"),
        ([TRAINER, "run", "--arch", "vgg_nonexistent", "--data", "."], "unknown architecture"),
    ],
)
def test_user_errors_are_one_line_without_traceback(argv, message, tmp_path):
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PATH": str(__import__("pathlib").Path(sys.executable).parent)},
        check=False,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
