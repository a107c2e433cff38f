"""The bundle manifest: one schema, validated on load, with messages that name the problem."""

from __future__ import annotations

import json
import os

import pytest

from serving.bundle.files import make_temp_dir, sha256_file, umask, write_atomic
from serving.bundle.manifest import (
    CENTER,
    CONTRACT_KEY,
    MODEL_NAME,
    TTA,
    UNRECORDED_TTA_REASON,
    BundleError,
    Manifest,
    ModelFile,
    Normalization,
    Preprocessing,
    TTAView,
    check_contract,
    contract_json,
    load_bundle,
    now,
    read_manifest,
    write_manifest,
)

TWO_VIEWS = TTA(views=[CENTER, TTAView(name="hflip", hflip=True)])


def make_bundle(folder, payload: bytes = b"onnx bytes", tta: TTA = TWO_VIEWS) -> Manifest:
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
        tta=tta,
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
        with pytest.raises(BundleError, match=r"sha256 .* does not match"):
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
        raw["schema_version"] = 3
        (tmp_path / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(BundleError, match=r"schema_version 3 is not supported \(this server reads 1 and 2\)"):
            read_manifest(tmp_path)

    def test_a_schema_1_manifest_reads_with_tta_on_and_held_out_metrics(self, tmp_path):
        written = make_bundle(tmp_path)
        edit_manifest(tmp_path, as_schema_1)
        m = read_manifest(tmp_path)
        assert m.schema_version == 1 and m.metrics_held_out
        assert m.tta.default and m.tta.reason == UNRECORDED_TTA_REASON
        assert m.tta.views == written.tta.views

    def test_new_manifests_record_the_tta_choice(self, tmp_path):
        make_bundle(tmp_path, tta=TTA(views=[CENTER], default=False, reason="plain view scored better"))
        raw = json.loads((tmp_path / "manifest.json").read_text())
        assert raw["schema_version"] == 2 and raw["metrics_held_out"] is True
        assert raw["tta"]["default"] is False and raw["tta"]["reason"] == "plain view scored better"

    @pytest.mark.parametrize("missing", ["manifest.json", MODEL_NAME])
    def test_missing_file(self, tmp_path, missing):
        make_bundle(tmp_path)
        (tmp_path / missing).unlink()
        with pytest.raises(BundleError, match="missing"):
            load_bundle(tmp_path)

    def test_a_run_folder_points_at_its_bundle(self, tmp_path):
        make_bundle(tmp_path / "bundle")  # what `trainer run --out tmp_path` leaves
        with pytest.raises(BundleError, match=rf"did you mean {tmp_path / 'bundle'}\?"):
            read_manifest(tmp_path)

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


class TestTTAViews:
    """A call's `tta` wins; a call that does not say (None) gets the bundle's default."""

    @pytest.mark.parametrize(
        ("default", "tta", "names"),
        [
            (True, None, ["center", "hflip"]),
            (False, None, ["center"]),
            (True, False, ["center"]),
            (False, True, ["center", "hflip"]),
            (True, True, ["center", "hflip"]),
            (False, False, ["center"]),
        ],
    )
    def test_views_for(self, default, tta, names):
        views = TWO_VIEWS.model_copy(update={"default": default})
        assert [v.name for v in views.views_for(tta)] == names


def as_schema_1(raw: dict) -> None:
    """A manifest as the trainer wrote it before the TTA default and metrics_held_out were recorded."""
    raw["schema_version"] = 1
    del raw["metrics_held_out"], raw["tta"]["default"], raw["tta"]["reason"]


def edit_manifest(folder, change) -> None:
    raw = json.loads((folder / "manifest.json").read_text())
    change(raw)
    (folder / "manifest.json").write_text(json.dumps(raw))


def add_int8_variant(raw: dict, file: str = "model.int8.onnx", sha256: str = "0" * 64) -> None:
    raw["variants"] = [
        {
            "precision": "int8",
            "file": file,
            "sha256": sha256,
            "intended_for": "cpu",
            "accuracy_tta": 1.0,
            "accuracy_tta_delta": 0.0,
            "max_probability_diff": 0.0,
        }
    ]


OUTSIDE = [
    "../model.onnx",
    "/etc/passwd",
    "sub/../../model.onnx",
    "sub/model.onnx",
    "..",
    ".",
    "",
    "..\\model.onnx",
    "C:model.onnx",
]


class TestFilesStayInTheBundle:
    @pytest.mark.parametrize("name", OUTSIDE)
    def test_model_file_outside_is_refused(self, tmp_path, name):
        make_bundle(tmp_path)
        edit_manifest(tmp_path, lambda raw: raw["model"].update(file=name))
        with pytest.raises(BundleError, match=r"manifest.json: invalid manifest: model\.file: .*not a plain file name"):
            load_bundle(tmp_path)

    @pytest.mark.parametrize("name", OUTSIDE)
    def test_variant_file_outside_is_refused(self, tmp_path, name):
        make_bundle(tmp_path)
        edit_manifest(tmp_path, lambda raw: add_int8_variant(raw, file=name))
        with pytest.raises(
            BundleError, match=r"manifest.json: invalid manifest: variants\.0\.file: .*not a plain file"
        ):
            read_manifest(tmp_path)

    def test_link_to_a_file_outside_is_refused(self, tmp_path):
        bundle = tmp_path / "bundle"
        make_bundle(bundle)
        (bundle / MODEL_NAME).rename(tmp_path / "elsewhere.onnx")
        (bundle / MODEL_NAME).symlink_to(tmp_path / "elsewhere.onnx")
        with pytest.raises(
            BundleError, match=r"manifest.json: model\.file 'model.onnx' links to .*elsewhere.onnx, outside"
        ):
            load_bundle(bundle)

    def test_variant_link_to_a_file_outside_is_refused(self, tmp_path):
        bundle = tmp_path / "bundle"
        make_bundle(bundle)
        (tmp_path / "int8.onnx").write_bytes(b"int8 bytes")
        (bundle / "model.int8.onnx").symlink_to(tmp_path / "int8.onnx")
        edit_manifest(bundle, lambda raw: add_int8_variant(raw, sha256=sha256_file(tmp_path / "int8.onnx")))
        load_bundle(bundle)  # fp32 is inside; only the int8 file links out
        with pytest.raises(BundleError, match=r"manifest.json: variants\.0\.file 'model.int8.onnx' links to .*outside"):
            load_bundle(bundle, "int8")

    def test_link_within_the_bundle_is_accepted(self, tmp_path):
        written = make_bundle(tmp_path)
        (tmp_path / MODEL_NAME).rename(tmp_path / "real.onnx")
        (tmp_path / MODEL_NAME).symlink_to("real.onnx")
        assert load_bundle(tmp_path) == (written, tmp_path / MODEL_NAME)


def reverse_classes(m: Manifest) -> Manifest:
    return m.model_copy(update={"classes": m.classes[::-1]})


class TestContract:
    def test_canonical_json_of_the_three_parts(self, tmp_path):
        m = make_bundle(tmp_path)
        text = contract_json(m.classes, m.preprocessing, m.tta)
        parsed = json.loads(text)
        assert list(parsed) == ["classes", "preprocessing", "tta"]
        assert parsed["classes"] == m.classes and Preprocessing(**parsed["preprocessing"]) == m.preprocessing
        assert TTA(**parsed["tta"]) == m.tta
        assert text == json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert text.startswith('{"classes":["ants","bees"],"preprocessing":{')  # compact: no spaces between items

    def test_the_manifests_own_contract_passes(self, tmp_path):
        m = make_bundle(tmp_path)
        check_contract(m, contract_json(m.classes, m.preprocessing, m.tta), tmp_path / MODEL_NAME)

    @pytest.mark.parametrize(
        ("edit", "differ"),
        [
            (reverse_classes, "classes"),
            (
                lambda m: m.model_copy(update={"preprocessing": Preprocessing(input_size=32, resize_size=40)}),
                "preprocessing",
            ),
            (lambda m: m.model_copy(update={"tta": TTA(views=[CENTER])}), "tta"),
            (lambda m: reverse_classes(m).model_copy(update={"tta": TTA(views=[CENTER])}), "classes, tta"),
        ],
        ids=["classes", "preprocessing", "tta", "classes+tta"],
    )
    def test_an_edited_manifest_names_what_differs(self, tmp_path, edit, differ):
        exported = make_bundle(tmp_path)
        embedded = contract_json(exported.classes, exported.preprocessing, exported.tta)
        with pytest.raises(
            BundleError,
            match=rf"manifest.json: {differ} not as embedded in model.onnx at export "
            r"\(the manifest was edited after export\): re-export",
        ):
            check_contract(edit(exported), embedded, tmp_path / MODEL_NAME)

    def test_an_edited_tta_default_is_refused(self, tmp_path):
        exported = make_bundle(tmp_path)
        embedded = contract_json(exported.classes, exported.preprocessing, exported.tta)
        edited = exported.model_copy(update={"tta": exported.tta.model_copy(update={"default": False})})
        with pytest.raises(BundleError, match=r"manifest.json: tta not as embedded"):
            check_contract(edited, embedded, tmp_path / MODEL_NAME)

    def test_a_schema_1_graph_and_manifest_still_agree(self, tmp_path):
        """Before schema 2 the embedded TTA part had no default or reason: both sides read as TTA on."""
        make_bundle(tmp_path)
        edit_manifest(tmp_path, as_schema_1)
        old = read_manifest(tmp_path)
        embedded = json.loads(contract_json(old.classes, old.preprocessing, old.tta))
        del embedded["tta"]["default"], embedded["tta"]["reason"]
        check_contract(old, json.dumps(embedded), tmp_path / MODEL_NAME)
        # ...and an edit to an old manifest's TTA default is still caught.
        edited = old.model_copy(update={"tta": old.tta.model_copy(update={"default": False})})
        with pytest.raises(BundleError, match=r"manifest.json: tta not as embedded"):
            check_contract(edited, json.dumps(embedded), tmp_path / MODEL_NAME)

    def test_a_graph_without_the_contract_came_from_an_older_trainer(self, tmp_path):
        m = make_bundle(tmp_path)
        with pytest.raises(
            BundleError, match=f"no {CONTRACT_KEY} metadata, so it was exported by an older trainer.*re-export"
        ):
            check_contract(m, None, tmp_path / MODEL_NAME)

    @pytest.mark.parametrize("embedded", ["{", "[]", '"classes"'])
    def test_unreadable_contract(self, tmp_path, embedded):
        m = make_bundle(tmp_path)
        with pytest.raises(BundleError, match="not a JSON object: re-export"):
            check_contract(m, embedded, tmp_path / MODEL_NAME)


class TestFileModes:
    """Files and folders the trainer writes get the modes plain open() and mkdir would give them."""

    @pytest.mark.parametrize(
        "mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]
    )
    def test_the_umask_decides(self, tmp_path, mask, file_mode, dir_mode):
        old = os.umask(mask)
        try:
            assert umask() == mask
            write_atomic(tmp_path / "f.json", b"{}")
            folder = make_temp_dir(tmp_path, ".x-")
        finally:
            os.umask(old)
        assert (tmp_path / "f.json").stat().st_mode & 0o777 == file_mode
        assert folder.stat().st_mode & 0o777 == dir_mode
