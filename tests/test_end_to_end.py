"""A `trainer run`'s bundle on a real gRPC server on loopback: Predict equals the trainer's TTA.

The run is the session's `trainer_run` (tests/conftest.py): images -> train -> export happen once
for the whole suite, and this module serves what they made."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import server_config

from serving.bundle.manifest import read_manifest
from serving.client import Client
from serving.server import Server
from trainer.outputs.run_folder import RunFolder


@pytest.fixture(scope="module")
def trained(trainer_run):
    """(the run's learner with its final weights, its folder, its bundle's manifest)"""
    folder = RunFolder(trainer_run.path)
    return folder.learner(log=lambda _: None), folder, read_manifest(folder.bundle_dir)


@pytest.fixture(scope="module")
def server(trained):
    _, folder, _ = trained
    srv = Server(server_config(folder.bundle_dir))
    yield srv
    srv.stop(0)


@pytest.fixture
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c


def test_served_probabilities_equal_the_trainers_tta(trained, client):
    learn, _, manifest = trained
    expected, _ = learn.TTA()
    for i, f in enumerate(learn.data.val_files):
        reply = client.predict_file(f, tta=True)
        assert list(reply.tta_views) == [v.name for v in manifest.tta.views]
        np.testing.assert_allclose(reply.probabilities, expected[i], atol=1e-4, rtol=0)
        assert reply.predictions[0].index == int(np.argmax(expected[i]))
        assert reply.predictions[0].label == learn.data.classes[reply.predictions[0].index]


def test_predict_batch_equals_the_trainers_tta_in_order(trained, client):
    learn, _, manifest = trained
    expected, _ = learn.TTA()
    files = list(learn.data.val_files)
    reply = client.predict_batch([f.read_bytes() for f in files], tta=True)
    assert len(reply.results) == len(files)
    for i, result in enumerate(reply.results):
        assert result.status.code == 0, result.status.message
        assert list(result.response.tta_views) == [v.name for v in manifest.tta.views]
        np.testing.assert_allclose(result.response.probabilities, expected[i], atol=1e-4, rtol=0)


def test_tta_off_runs_only_the_centre_view(trained, client):
    learn, _, _ = trained
    plain = learn.predict("valid")
    reply = client.predict_file(learn.data.val_files[0], tta=False, top_k=1)
    assert list(reply.tta_views) == ["center"] and len(reply.predictions) == 1
    np.testing.assert_allclose(reply.probabilities, plain[0], atol=1e-4, rtol=0)


def test_model_info(trained, client):
    learn, folder, manifest = trained
    info = client.model_info()
    # Version 1, as the Open Inference Protocol's clients expect; the bundle's own beside it.
    assert (info.model_name, info.model_version, info.bundle_version) == ("colours", "1", manifest.version)
    assert list(info.classes) == learn.data.classes == ["blue", "red"]
    assert info.input_size == 32 and info.model_sha256 == manifest.model.sha256
    assert dict(info.metrics) == manifest.metrics
    measured, _ = folder.read_metrics()
    assert dict(info.metrics) == measured  # what the run measured, as it gave it to export
    tta, y = learn.TTA()
    assert info.metrics["accuracy_tta"] == pytest.approx(float(np.mean(tta.argmax(1) == y)))


def test_bad_image_is_invalid_argument_and_server_keeps_serving(trained, client):
    learn, _, _ = trained
    with pytest.raises(grpc.RpcError) as err:
        client.predict(b"definitely not a jpeg")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a recognised image format" in err.value.details()
    assert client.predict_file(learn.data.val_files[0]).predictions
