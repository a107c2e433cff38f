"""ModelSession refuses a bundle whose graph and manifest do not belong together, as a one-line BundleError."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from conftest import serve_argv
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from serving.bundle.files import sha256_file
from serving.bundle.manifest import CONTRACT_KEY, MODEL_NAME, UNRECORDED_TTA_REASON, BundleError, contract_json
from serving.bundle.session import ModelSession


def edit_manifest(bundle, change) -> None:
    raw = json.loads((bundle / "manifest.json").read_text())
    change(raw)
    (bundle / "manifest.json").write_text(json.dumps(raw))


def edit_graph(bundle, change) -> None:
    """Change model.onnx with the onnx package and record its new sha256, as a re-export would."""
    import onnx

    model = onnx.load(str(bundle / MODEL_NAME))
    change(model)
    onnx.save(model, str(bundle / MODEL_NAME))
    edit_manifest(bundle, lambda raw: raw["model"].update(sha256=sha256_file(bundle / MODEL_NAME)))


def drop_contract(model) -> None:
    kept = [p for p in model.metadata_props if p.key != CONTRACT_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


def symbolic_sides(model) -> None:
    for axis, dim in enumerate(model.graph.input[0].type.tensor_type.shape.dim):
        if axis in (1, 2):
            dim.dim_param = "side"


def as_schema_1(bundle) -> None:
    """Make a bundle what the trainer wrote before schema 2: no tta.default, tta.reason or
    metrics_held_out in the manifest nor in the contract embedded in the graph."""

    def old_contract(model) -> None:
        (prop,) = [p for p in model.metadata_props if p.key == CONTRACT_KEY]
        contract = json.loads(prop.value)
        del contract["tta"]["default"], contract["tta"]["reason"]
        prop.value = json.dumps(contract, sort_keys=True, separators=(",", ":"))

    def old_manifest(raw: dict) -> None:
        raw["schema_version"] = 1
        del raw["metrics_held_out"], raw["tta"]["default"], raw["tta"]["reason"]

    edit_graph(bundle, old_contract)
    edit_manifest(bundle, old_manifest)


def smaller_input(raw: dict) -> None:
    raw["preprocessing"]["input_size"] -= 8  # still a valid manifest: resize_size stays larger


class TestContract:
    def test_exported_graph_carries_the_manifests_contract(self, tiny_bundle):
        session = ModelSession(tiny_bundle, device="cpu")
        m = session.manifest
        embedded = session.session.get_modelmeta().custom_metadata_map[CONTRACT_KEY]
        assert embedded == contract_json(m.classes, m.preprocessing, m.tta)

    @pytest.mark.parametrize(
        ("change", "differ"),
        [
            (lambda raw: raw["classes"].reverse(), "classes"),
            (
                lambda raw: raw["preprocessing"].update(resize_size=raw["preprocessing"]["resize_size"] + 4),
                "preprocessing",
            ),
            (lambda raw: raw["preprocessing"].update(interpolation="bicubic"), "preprocessing"),
            (lambda raw: raw["tta"]["views"].pop(), "tta"),
            (lambda raw: raw["tta"]["views"][1].update(vflip=True), "tta"),
            (lambda raw: raw["tta"].update(default=not raw["tta"]["default"]), "tta"),
        ],
        ids=["classes-reordered", "resize-size", "interpolation", "view-dropped", "view-changed", "default-flipped"],
    )
    def test_manifest_edited_after_export_is_refused(self, tiny_bundle, fresh_copy, change, differ):
        bundle = fresh_copy(tiny_bundle)
        edit_manifest(bundle, change)
        with pytest.raises(
            BundleError,
            match=rf"manifest.json: {differ} not as embedded in model.onnx at export "
            r"\(the manifest was edited after export\): re-export",
        ):
            ModelSession(bundle, device="cpu")

    def test_a_schema_1_bundle_loads_with_tta_on(self, tiny_bundle, fresh_copy):
        bundle = fresh_copy(tiny_bundle)
        as_schema_1(bundle)
        m = ModelSession(bundle, device="cpu").manifest
        assert m.schema_version == 1 and m.metrics_held_out
        assert m.tta.default and m.tta.reason == UNRECORDED_TTA_REASON

    def test_a_schema_1_bundle_edited_to_tta_off_is_refused(self, tiny_bundle, fresh_copy):
        bundle = fresh_copy(tiny_bundle)
        as_schema_1(bundle)
        edit_manifest(bundle, lambda raw: raw["tta"].update(default=False))
        with pytest.raises(BundleError, match=r"manifest.json: tta not as embedded in model.onnx at export"):
            ModelSession(bundle, device="cpu")

    def test_graph_from_an_older_trainer_is_refused(self, tiny_bundle, fresh_copy):
        bundle = fresh_copy(tiny_bundle)
        edit_graph(bundle, drop_contract)
        with pytest.raises(BundleError, match=r"exported by an older trainer.*re-export the bundle"):
            ModelSession(bundle, device="cpu")


class TestInputSize:
    def test_manifest_size_other_than_the_graphs_is_named(self, tiny_bundle, fresh_copy):
        # The contract differs too; the shape check runs first because it names both sizes.
        bundle = fresh_copy(tiny_bundle)
        edit_manifest(bundle, smaller_input)
        with pytest.raises(
            BundleError,
            match=r"the graph takes 32x32 pixel images but .*manifest.json says "
            r"preprocessing.input_size 24; .*re-export",
        ) as e:
            ModelSession(bundle, device="cpu")
        assert "\n" not in str(e.value)

    def test_a_graph_of_any_size_leaves_it_to_the_contract(self, tiny_bundle, fresh_copy):
        bundle = fresh_copy(tiny_bundle)
        edit_graph(bundle, symbolic_sides)
        assert ModelSession(bundle, device="cpu").session.get_inputs()[0].shape == ["batch", "side", "side", 3]
        edit_manifest(bundle, smaller_input)
        with pytest.raises(BundleError, match="preprocessing not as embedded"):
            ModelSession(bundle, device="cpu")

    def test_onnx_runtime_failure_in_warm_up_is_a_one_line_bundle_error(self, tiny_bundle, monkeypatch):
        session = ModelSession(tiny_bundle, device="cpu")

        def fail(*args, **kwargs):
            raise Fail("[ONNXRuntimeError] : 1 : FAIL : out of luck\n in the second line")

        monkeypatch.setattr(session.session, "run", fail)
        with pytest.raises(
            BundleError,
            match=r"model.onnx: ONNX Runtime cannot run it on a warm-up batch of 2 images: "
            r"\[ONNXRuntimeError\] : 1 : FAIL : out of luck in the second line$",
        ):
            session.warm_up(batch=2)


class TestServeCommand:
    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (
                smaller_input,
                r"model.onnx: the graph takes 32x32 pixel images but .* says preprocessing.input_size 24; .*",
            ),
            (
                lambda raw: raw["classes"].reverse(),
                r"manifest.json: classes not as embedded in model.onnx at export .*",
            ),
        ],
        ids=["input-size", "classes-reordered"],
    )
    def test_edited_bundle_exits_2_with_one_line_and_no_traceback(self, tiny_bundle, fresh_copy, change, message):
        bundle = fresh_copy(tiny_bundle)
        edit_manifest(bundle, change)
        argv = serve_argv(bundle)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("serving: ")]
        assert re.fullmatch(f"serving: {re.escape(str(bundle))}/{message}", line), line
