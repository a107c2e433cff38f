"""The README's path through the real entry points: `trainer demo` (slow), `serving serve` and
`serving predict` on the session's `trainer run`, and their user errors."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from conftest import serve_args, served_ports

from serving.bundle.manifest import read_manifest

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


# Slow: a second training run (about 35 s on 2 idle cores, minutes on busy ones); the default suite
# trains once, in the session's `trainer_run`, which test_serve_predict_and_sigterm below serves.
@pytest.mark.slow
def test_demo_trains_serves_and_reports_accuracy(demo):
    out, stdout = demo
    assert (out / "bundle" / "model.onnx").is_file() and (out / "bundle" / "manifest.json").is_file()
    assert (out / "digits" / "train" / "7").is_dir() and (out / "digits" / "valid" / "7").is_dir()
    assert re.search(r"^\s+0\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+s\s", stdout, re.M), "no per-epoch table"
    found = re.search(
        r"accuracy on (\d+) validation images: served ([\d.]+) \((with|without) TTA, the bundle's default\); "
        r"trainer with TTA ([\d.]+), without TTA ([\d.]+)",
        stdout,
    )
    assert found, stdout
    n, served, tta = int(found[1]), float(found[2]), found[3] == "with"
    assert n == 359 and served == float(found[4] if tta else found[5])
    assert served > 0.8, "ImageNet features + a new head should read handwritten digits"


def test_serve_predict_and_sigterm(trainer_run):
    bundle = trainer_run.path / "bundle"
    views = len(read_manifest(bundle).tta.views)
    server = subprocess.Popen(
        [SERVING, "serve", *serve_args(bundle, metrics=True)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        port = served_ports(line).get("grpc")
        assert port, line + server.stderr.read()
        image = next((trainer_run.data / "valid" / "red").iterdir())
        proc = subprocess.run(
            [SERVING, "predict", str(image), "--target", f"127.0.0.1:{port}", "--top-k", "2", "--tta"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        label = r"(blue|red) [\d.]+"
        assert re.search(rf"{re.escape(str(image))}: {label}, {label}  \[{views} views\]", proc.stdout), proc.stdout
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


@pytest.mark.parametrize("command", ["predict", "health"])
def test_no_server_there_is_said_in_one_line_with_the_fix(command, tmp_path, capsys):
    """gRPC's own words for a refused connection name the transport's internals; ours say what to do."""
    from serving.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    image = tmp_path / "x.png"
    image.write_bytes(b"not read: the call fails first")
    argv = [command, "--target", f"127.0.0.1:{port}", "--timeout", "5"]
    assert main(argv + ([str(image)] if command == "predict" else [])) != 0
    err = capsys.readouterr().err
    assert "no server answers there" in err and "serving serve" in err
    assert "ipv4:" not in err and len(err.strip().splitlines()) == 1
