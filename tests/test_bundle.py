"""The bundle manifest: one schema, validated on load, with messages that name the problem."""

from __future__ import annotations

import json

import pytest

from serving.bundle import (
    CENTER,
    MODEL_NAME,
    BundleError,
    Manifest,
    ModelFile,
    Normalization,
    Preprocessing,
    TTA,
    TTAView,
    load_bundle,
    now,
    read_manifest,
    sha256_file,
    write_manifest,
)


def make_bundle(folder, payload: bytes = b"onnx bytes") -> Manifest:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_NAME).write_bytes(payload)
    manifest = Manifest(
        name="m",
        version="1",
        created_at=now(),
        architecture="efficientnet_lite0",
        classes=["ants", "bees"],
        preprocessing=Preprocessing(input_size=32, resize_size=36),
        normalization=Normalization(mean=(0.5,) * 3, std=(0.5,) * 3),
        tta=TTA(views=[CENTER, TTAView(name="hflip", hflip=True)]),
        model=ModelFile(sha256=sha256_file(folder / MODEL_NAME), opset=17, input_name="image", output_name="p"),
    )
    write_manifest(folder, manifest)
    return manifest


class TestManifest:
    def test_round_trip(self, tmp_path):
        written = make_bundle(tmp_path)
        assert read_manifest(tmp_path) == written
        manifest, model = load_bundle(tmp_path)
        assert manifest == written and model == tmp_path / MODEL_NAME

    def test_changed_model_byte_is_refused(self, tmp_path):
        make_bundle(tmp_path)
        data = bytearray((tmp_path / MODEL_NAME).read_bytes())
        data[3] ^= 1
        (tmp_path / MODEL_NAME).write_bytes(bytes(data))
        with pytest.raises(BundleError, match="sha256 .* does not match"):
            load_bundle(tmp_path)

    def test_missing_field_is_named(self, tmp_path):
        make_bundle(tmp_path)
        raw = json.loads((tmp_path / "manifest.json").read_text())
        del raw["classes"]
        (tmp_path / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(BundleError, match="classes: Field required"):
            read_manifest(tmp_path)

    def test_future_schema_is_refused(self, tmp_path):
        make_bundle(tmp_path)
        raw = json.loads((tmp_path / "manifest.json").read_text())
        raw["schema_version"] = 2
        (tmp_path / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(BundleError, match="schema_version 2 is not supported"):
            read_manifest(tmp_path)

    @pytest.mark.parametrize("missing", ["manifest.json", MODEL_NAME])
    def test_missing_file(self, tmp_path, missing):
        make_bundle(tmp_path)
        (tmp_path / missing).unlink()
        with pytest.raises(BundleError, match="missing"):
            load_bundle(tmp_path)

    def test_not_json(self, tmp_path):
        make_bundle(tmp_path)
        (tmp_path / "manifest.json").write_text("{")
        with pytest.raises(BundleError, match="not valid JSON"):
            read_manifest(tmp_path)

    def test_duplicate_view_names_are_refused(self):
        with pytest.raises(ValueError, match="unique"):
            TTA(views=[CENTER, TTAView(name="center", hflip=True)])

    def test_crop_larger_than_resize_is_refused(self):
        with pytest.raises(ValueError, match="smaller than input_size"):
            Preprocessing(input_size=64, resize_size=32)
