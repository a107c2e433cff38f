"""KServe's Python clients (InferenceGRPCClient, InferenceRESTClient) against a real server, unmodified,
in a process of their own (tests/serving/kserve_callers.py says why); answers equal our own Predict's."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import server_config
from test_serving_http import pixels, png
from test_serving_oip import IMAGES

from serving.client import Client
from serving.server import Server

# Looked up, not imported: importing it here would clash with tritonclient's stubs.
if importlib.util.find_spec("kserve") is None:
    pytest.skip(
        "KServe's Python SDK is not installed (pip install kserve; part of the dev extra)", allow_module_level=True
    )

CALLERS = Path(__file__).with_name("kserve_callers.py")


@pytest.fixture(scope="module")
def answers(tiny_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kserve")
    (folder / "image.jpg").write_bytes(IMAGES[0])
    np.save(folder / "pixels.npy", pixels(3)[np.newaxis])
    with Server(server_config(tiny_bundle, http_port=0)) as srv, Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
        argv = [
            sys.executable, str(CALLERS), f"127.0.0.1:{srv.port}", f"http://127.0.0.1:{srv.http_port}",
            str(folder / "image.jpg"), str(folder / "pixels.npy"), "colours",
        ]  # fmt: skip
        run = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120, cwd=CALLERS.parent)
        assert run.returncode == 0, run.stderr[-3000:]
        predicted = {
            "bytes": np.array(c.predict(IMAGES[0]).probabilities),
            "pixels": np.array(c.predict(png(pixels(3))).probabilities),
        }
    return json.loads(run.stdout.splitlines()[-1]), predicted


@pytest.mark.parametrize("binding", ["grpc", "rest"])
def test_health(answers, binding):
    got, _ = answers
    assert got[f"{binding}_live"] is True and got[f"{binding}_ready"] is True and got[f"{binding}_model_ready"] is True


def test_rest_says_an_unknown_model_is_not_ready(answers):
    assert answers[0]["rest_unknown_model_ready"] is False


@pytest.mark.parametrize(
    ("call", "image"),
    [
        ("grpc_bytes", "bytes"),
        ("grpc_pixels", "pixels"),
        ("rest_bytes", "bytes"),
        ("rest_pixels_binary", "pixels"),
        ("rest_pixels_json", "pixels"),
    ],
)
def test_infer_equals_predict(answers, call, image):
    got, predicted = answers
    np.testing.assert_allclose(np.array(got[call]), predicted[image][np.newaxis], atol=1e-6, rtol=0)
