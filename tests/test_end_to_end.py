"""Images -> train -> export -> real gRPC server on loopback -> Predict, equal to the trainer's TTA."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from serving.client import Client
from serving.config import ServerConfig
from serving.server import Server
from trainer.augment import tfms_from_model, transforms_side_on
from trainer.data import ImageClassifierData
from trainer.export import export
from trainer.learner import ConvLearner


@pytest.fixture(scope="module")
def trained(tiny_hymenoptera, tmp_path_factory):
    tfms = tfms_from_model("efficientnet_lite0", 64, aug_tfms=transforms_side_on, max_zoom=1.1)
    data = ImageClassifierData.from_paths(tiny_hymenoptera, tfms, bs=8, num_workers=0, seed=0)
    learn = ConvLearner.pretrained("efficientnet_lite0", data, precompute=True, log=lambda _: None)
    learn.fit(1e-2, 2)
    learn.precompute = False
    learn.fit(1e-3, 1)
    bundle = tmp_path_factory.mktemp("export") / "bundle"
    manifest = export(learn, bundle, name="hymenoptera", version="test-1", metrics={"accuracy": 0.5})
    return learn, bundle, manifest


@pytest.fixture(scope="module")
def server(trained):
    _, bundle, _ = trained
    srv = Server(ServerConfig(bundle=bundle, port=0, device="cpu", metrics_port=None))
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
        reply = client.predict_file(f)
        assert list(reply.tta_views) == [v.name for v in manifest.tta.views]
        np.testing.assert_allclose(reply.probabilities, expected[i], atol=1e-4, rtol=0)
        assert reply.predictions[0].index == int(np.argmax(expected[i]))
        assert reply.predictions[0].label == learn.data.classes[reply.predictions[0].index]


def test_predict_batch_equals_the_trainers_tta_in_order(trained, client):
    learn, _, manifest = trained
    expected, _ = learn.TTA()
    files = list(learn.data.val_files)
    reply = client.predict_batch([f.read_bytes() for f in files])
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
    learn, _, manifest = trained
    info = client.model_info()
    assert info.model_name == "hymenoptera" and info.model_version == "test-1"
    assert list(info.classes) == learn.data.classes == ["ants", "bees"]
    assert info.input_size == 64 and info.model_sha256 == manifest.model.sha256
    assert dict(info.metrics) == manifest.metrics
    assert info.metrics["accuracy"] == 0.5  # as given to export
    assert info.metrics["accuracy_tta"] == pytest.approx(float(np.mean(learn.TTA()[0].argmax(1) == learn.TTA()[1])))


def test_bad_image_is_invalid_argument_and_server_keeps_serving(trained, client):
    learn, _, _ = trained
    with pytest.raises(grpc.RpcError) as err:
        client.predict(b"definitely not a jpeg")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a recognised image format" in err.value.details()
    assert client.predict_file(learn.data.val_files[0]).predictions
