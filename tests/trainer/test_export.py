"""Export: ONNX parity with PyTorch, TTA reproduced through ONNX Runtime, ensembles, variants, tampering."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_colour_dataset

from serving.bundle.evaluate import predict_files
from serving.bundle.files import sha256_file
from serving.bundle.manifest import CONTRACT_KEY, MODEL_NAME, BundleError, contract_json, load_bundle, read_manifest
from serving.bundle.preprocess import load_views
from serving.bundle.session import ModelSession
from trainer.data.augment import tfms_from_model, transforms_side_on
from trainer.data.loaders import ImageClassifierData
from trainer.evaluate.calibrate import before_calibration
from trainer.evaluate.metrics import accuracy
from trainer.learn.learner import ConvLearner
from trainer.outputs import export as export_module
from trainer.outputs.export import ExportError, check_parity, choose_tta_default, export, quantize_int8


@pytest.fixture(scope="module")
def learn(tiny_hymenoptera, tmp_path_factory):
    tfms = tfms_from_model("efficientnet_lite0", 64, aug_tfms=transforms_side_on, max_zoom=1.1)
    data = ImageClassifierData.from_paths(tiny_hymenoptera, tfms, bs=8, num_workers=0, seed=0)
    torch.manual_seed(0)
    learn = ConvLearner.pretrained(
        "efficientnet_lite0", data, precompute=True, log=lambda _: None, models_dir=tmp_path_factory.mktemp("models")
    )
    learn.fit(1e-2, 2, cycle_len=1, cycle_save_name="snap")
    return learn


@pytest.fixture(scope="module")
def bundle(learn, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    return out, export(learn, out, name="ants-bees", version="7", fp16=True, int8=True)


class TestParity:
    def test_onnx_runtime_matches_pytorch_on_real_images(self, learn, bundle):
        out, _ = bundle
        gap = check_parity(ModelSession(out, device="cpu"), learn.inference_net().cpu(), learn.data.val_files)
        assert gap < 1e-4

    def test_bundle_tta_through_onnx_reproduces_the_trainers_tta_accuracy(self, learn, bundle):
        out, manifest = bundle
        probs, y = learn.TTA()
        onnx_probs = predict_files(ModelSession(out, device="cpu"), learn.data.val_files)
        assert accuracy(onnx_probs, y) == accuracy(probs, y) == manifest.metrics["accuracy_tta"]
        np.testing.assert_allclose(onnx_probs, probs, atol=1e-4)

    def test_graph_contract(self, bundle):
        import onnx

        out, manifest = bundle
        model = onnx.load(str(out / MODEL_NAME))
        assert model.opset_import[0].version >= 17
        (inp,), (_output,) = model.graph.input, model.graph.output
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert dims == ["batch", 64, 64, 3]
        assert manifest.versions["torch"] == torch.__version__


class TestVariants:
    @pytest.mark.parametrize("precision", ["fp16", "int8"])
    def test_variant_is_recorded_with_its_measured_accuracy_change(self, learn, bundle, precision):
        out, manifest = bundle
        (variant,) = [v for v in manifest.variants if v.precision == precision]
        assert sha256_file(out / variant.file) == variant.sha256
        probs = predict_files(ModelSession(out, device="cpu", precision=precision), learn.data.val_files)
        fp32 = manifest.metrics["accuracy_tta"]
        assert variant.accuracy_tta == accuracy(probs, learn.data.val_y)
        assert variant.accuracy_tta_delta == pytest.approx(variant.accuracy_tta - fp32)
        assert variant.max_probability_diff < (0.02 if precision == "fp16" else 0.5)

    @pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
    def test_every_precision_carries_the_manifests_contract(self, bundle, precision):
        out, m = bundle
        session = ModelSession(out, device="cpu", precision=precision)
        embedded = session.session.get_modelmeta().custom_metadata_map[CONTRACT_KEY]
        assert embedded == contract_json(m.classes, m.preprocessing, m.tta)

    def test_missing_variant_is_a_clear_error(self, tmp_path, learn):
        export(learn, tmp_path / "plain")
        with pytest.raises(BundleError, match=r"no int8 model .*export with --int8"):
            load_bundle(tmp_path / "plain", "int8")


class TestQuietQuantization:
    """onnxruntime.quantization logs a WARNING on the root logger per 1-D weight ("Axis 1 is
    out-of-range for weight ..."): noise on the user's terminal, which the export keeps away."""

    def test_int8_quantization_prints_nothing_to_the_terminal(self, learn, bundle, tmp_path):
        # A child process, as `trainer export --int8` runs: logging unconfigured, stderr the terminal.
        out, _ = bundle
        script = (
            "import logging, sys\n"
            "from pathlib import Path\n"
            "from serving.bundle.manifest import read_manifest\n"
            "from trainer.outputs.export import quantize_int8\n"
            "b, files = Path(sys.argv[1]), [Path(f) for f in sys.argv[3:]]\n"
            "quantize_int8(b / 'model.onnx', Path(sys.argv[2]), read_manifest(b), files)\n"
            "print('root handlers', len(logging.getLogger().handlers))\n"
        )
        files = [str(f) for f in learn.data.trn_files[:4]]
        done = subprocess.run(
            [sys.executable, "-c", script, str(out), str(tmp_path / "q.onnx"), *files],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "WARNING" not in done.stderr and "out-of-range" not in done.stderr, done.stderr
        # No stderr handler left behind either (logging.warning on an unconfigured root installs one).
        assert done.stdout.splitlines()[-1] == "root handlers 0"
        assert (tmp_path / "q.onnx").is_file()

    def test_in_process_only_the_quantizers_chatter_is_dropped(self, learn, bundle, tmp_path, caplog):
        out, manifest = bundle
        root = logging.getLogger()
        before = (list(root.handlers), list(root.filters), logging.getLogger("onnxruntime").level)
        with caplog.at_level(logging.INFO):
            quantize_int8(out / MODEL_NAME, tmp_path / "q.onnx", manifest, learn.data.trn_files[:4])
            logging.getLogger("trainer.test").warning("a warning of ours after quantization")
        assert not [r for r in caplog.records if r.name == "root" or r.name.startswith("onnxruntime")]
        assert [r.getMessage() for r in caplog.records] == ["a warning of ours after quantization"]
        assert (list(root.handlers), list(root.filters), logging.getLogger("onnxruntime").level) == before

    def test_errors_still_show_and_a_failure_still_raises(self, bundle, tmp_path, caplog):
        from google.protobuf.message import DecodeError

        _, manifest = bundle
        root = logging.getLogger()
        before = (list(root.handlers), list(root.filters))
        with caplog.at_level(logging.INFO), export_module._quiet_quantizer():
            logging.warning("chatter")
            logging.error("a real problem")
            logging.getLogger("onnxruntime.quantization").info("more chatter")
            logging.getLogger("trainer.test").warning("somebody else's warning")
        assert [r.getMessage() for r in caplog.records] == ["a real problem", "somebody else's warning"]
        (tmp_path / "broken.onnx").write_bytes(b"not a model")
        with pytest.raises(DecodeError, match="Error parsing message"):
            quantize_int8(tmp_path / "broken.onnx", tmp_path / "q.onnx", manifest, [])
        assert (list(root.handlers), list(root.filters)) == before


ACC = {"accuracy": 0.9248, "log_loss": 0.30, "accuracy_tta": 0.9192, "log_loss_tta": 0.25}


class TestTTADefault:
    """TTA on by default unless it scores worse on validation: lower accuracy, ties by log loss."""

    @pytest.mark.parametrize(
        ("metrics", "on", "reason"),
        [
            (ACC, False, r"^validation accuracy 0.9248 without TTA, 0.9192 with it; log loss 0.3000 without TTA, "
             r"0.2500 with it: less accurate with TTA, so TTA off$"),
            ({**ACC, "accuracy_tta": 0.93}, True, r"more accurate with TTA, so TTA on$"),
            ({**ACC, "accuracy_tta": 0.9248}, True, r"as accurate either way, log loss no higher with TTA, so TTA on$"),
            ({**ACC, "accuracy_tta": 0.9248, "log_loss_tta": 0.31}, False, r"log loss higher with TTA, so TTA off$"),
            ({**ACC, "accuracy_tta": 0.9248, "log_loss_tta": 0.30}, True, r"log loss no higher with TTA, so TTA on$"),
            ({"accuracy": 1.0, "accuracy_tta": 1.0, "log_loss_tta": 0.1}, True, r"no log loss of both to break the tie, so TTA on$"),
            ({"accuracy": 0.92480001, "accuracy_tta": 0.9248}, False, r"0.92480001 without TTA, 0.92480000 with it"),
            ({}, True, r"^no validation accuracy or accuracy_tta to compare TTA with the plain view, so TTA on$"),
            ({"accuracy_tta": 0.9, "log_loss_tta": 0.2}, True, r"^no validation accuracy to compare"),
            ({**ACC, "accuracy": float("nan")}, True, r"^no validation accuracy to compare"),
        ],
        ids=["tta-less-accurate", "tta-more-accurate", "tie-lower-loss", "tie-higher-loss", "tie-same-loss",
             "tie-no-loss", "close-accuracies", "no-metrics", "no-plain-accuracy", "nan"],
    )  # fmt: skip
    def test_rule(self, metrics, on, reason):
        default, why = choose_tta_default(metrics)
        assert default is on
        assert re.search(reason, why), why

    def test_scores_that_are_not_held_out_say_so(self):
        assert "not held out" not in choose_tta_default(ACC)[1]
        default, why = choose_tta_default(ACC, held_out=False)
        assert not default and why.endswith(
            "; these scores are not held out: the model also trained on the validation images (--full)"
        )

    def test_without_metrics_the_export_measures_both_views_and_decides_on_them(self, bundle):
        out, manifest = bundle
        m = manifest.metrics
        assert {"accuracy", "log_loss", "accuracy_tta", "log_loss_tta", "temperature"} <= m.keys()
        # Decided on the scores before calibration: the temperature is then fitted to the choice.
        assert (manifest.tta.default, manifest.tta.reason) == choose_tta_default(before_calibration(m))
        assert f"log loss {m['log_loss_uncalibrated']:.4f} without TTA" in manifest.tta.reason
        assert manifest.metrics_held_out and m["temperature_for_tta"] == float(manifest.tta.default)
        assert read_manifest(out).tta == manifest.tta

    def test_tta_worse_than_the_plain_view_turns_it_off_and_says_why(self, learn, tmp_path):
        # Plain accuracy 1 and log loss 0: whatever TTA scores, it is worse (or tied with a higher loss).
        logs: list[str] = []
        manifest = export(
            learn, tmp_path / "b", metrics={"accuracy": 1.0, "log_loss": 0.0}, held_out=False, log=logs.append
        )
        assert not manifest.tta.default and not manifest.metrics_held_out
        assert manifest.tta.reason.startswith("validation accuracy 1.0000 without TTA, ")
        assert manifest.tta.reason.endswith(
            "so TTA off; these scores are not held out: the model also trained on the validation images (--full)"
        )
        assert f"export: TTA off for calls that do not say: {manifest.tta.reason}" in logs
        session = ModelSession(tmp_path / "b", device="cpu")  # the choice is in the graph's contract too
        assert (
            session.manifest == manifest
            and json.loads(session.session.get_modelmeta().custom_metadata_map[CONTRACT_KEY])["tta"]["default"] is False
        )


class TestSnapshotEnsemble:
    def test_graph_equals_the_mean_of_its_members(self, learn, tmp_path):
        assert learn.snapshots == ["snap_cyc_0", "snap_cyc_1"]
        manifest = export(learn, tmp_path / "ens", snapshots=learn.snapshots)
        assert manifest.ensemble == learn.snapshots
        views = np.concatenate(
            [load_views(f.read_bytes(), manifest.preprocessing, manifest.tta.views) for f in learn.data.val_files[:4]]
        )
        members = []
        for name in learn.snapshots:
            learn.load(name)
            with torch.no_grad():
                # At the graph's temperature, fitted to the ensemble's own TTA on validation.
                net = learn.inference_net(manifest.metrics["temperature"]).cpu()
                members.append(net(torch.from_numpy(views)).numpy())
        learn.load("snap_cyc_1")
        got = ModelSession(tmp_path / "ens", device="cpu").run(views)
        np.testing.assert_allclose(got, np.mean(members, axis=0), atol=1e-5)
        assert not np.allclose(members[0], members[1], atol=1e-3), "snapshots should differ"


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    """Progressive resizing: a snapshot cycle at 32 px, then one at 48 px."""
    root = write_colour_dataset(tmp_path_factory.mktemp("resize") / "colours", {"train": 4, "valid": 2})

    def data(size):
        return ImageClassifierData.from_paths(
            root, tfms_from_model("efficientnet_lite0", size), bs=4, num_workers=0, seed=0
        )

    torch.manual_seed(0)
    learn = ConvLearner.pretrained(
        "efficientnet_lite0",
        data(32),
        precompute=False,
        log=lambda _: None,
        models_dir=tmp_path_factory.mktemp("models"),
    )
    learn.fit(1e-2, 1, cycle_save_name="small")
    learn.set_data(data(48))
    learn.fit(1e-2, 1, cycle_save_name="large")
    return learn


class TestSnapshotsAfterProgressiveResizing:
    """Weights load at any input size, but a snapshot trained at 32 px averaged into a 48-px bundle
    is another, worse model (issue 12: TTA accuracy 0.47 against 0.94)."""

    def test_only_snapshots_of_the_input_size_are_selected(self, resized):
        assert export_module.snapshots_at_input_size(resized, resized.snapshots) == (
            ["large_cyc_0"],
            {"small_cyc_0": 32},
        )

    def test_another_size_is_refused_and_the_old_bundle_kept(self, resized, tmp_path):
        out = tmp_path / "b"
        export(resized, out)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(ExportError, match=r"input size of 48 px: small_cyc_0 \(32 px\)"):
            export(resized, out, snapshots=resized.snapshots)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert [p.name for p in tmp_path.iterdir()] == [out.name], "temporary folders left behind"

    def test_ensemble_of_the_input_size_records_its_own_metrics(self, resized, tmp_path):
        manifest = export(
            resized, tmp_path / "ens", snapshots=["large_cyc_0"], metrics={"accuracy": 2.0, "accuracy_tta": 2.0}
        )  # the final weights', not the ensemble's
        assert manifest.ensemble == ["large_cyc_0"]
        assert {"accuracy", "log_loss", "accuracy_tta", "log_loss_tta", "temperature", "ece_tta"} <= set(
            manifest.metrics
        )
        assert 0 <= manifest.metrics["accuracy"] <= 1 and 0 <= manifest.metrics["accuracy_tta"] <= 1


class TestTampering:
    def test_changed_byte_in_the_onnx_file(self, bundle, tmp_path):
        out = copy_bundle(bundle[0], tmp_path)
        data = bytearray((out / MODEL_NAME).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (out / MODEL_NAME).write_bytes(bytes(data))
        with pytest.raises(BundleError, match=r"sha256 .* does not match"):
            ModelSession(out, device="cpu")

    def test_missing_manifest_field(self, bundle, tmp_path):
        out = copy_bundle(bundle[0], tmp_path)
        raw = json.loads((out / "manifest.json").read_text())
        del raw["tta"]
        (out / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(BundleError, match="tta: Field required"):
            ModelSession(out, device="cpu")

    def test_wrong_class_count(self, bundle, tmp_path):
        out = copy_bundle(bundle[0], tmp_path)
        raw = json.loads((out / "manifest.json").read_text())
        raw["classes"].append("wasps")
        (out / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(BundleError, match="outputs 2 probabilities but the manifest lists 3 classes"):
            ModelSession(out, device="cpu")

    @pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
    def test_reordered_classes_are_refused_at_every_precision(self, bundle, tmp_path, precision):
        out = copy_bundle(bundle[0], tmp_path)
        raw = json.loads((out / "manifest.json").read_text())
        raw["classes"].reverse()
        (out / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(BundleError, match=r"classes not as embedded in model.* at export .*re-export"):
            ModelSession(out, device="cpu", precision=precision)

    def test_failed_export_leaves_the_old_bundle_untouched(self, learn, bundle, tmp_path, monkeypatch):
        out = copy_bundle(bundle[0], tmp_path)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)  # every graph now fails parity
        with pytest.raises(ExportError, match="disagree"):
            export(learn, out)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert [p.name for p in tmp_path.iterdir()] == [out.name], "temporary folders left behind"


def copy_bundle(src, tmp_path):
    import shutil

    return shutil.copytree(src, tmp_path / "copy")


def test_export_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "export", "--help"], capture_output=True, text=True, check=False
    ).stdout
    for option in ["--run", "--out", "--name", "--version", "--snapshots", "--fp16", "--int8", "--calibration-images"]:
        assert option in out
    assert out.count("default") >= 7
