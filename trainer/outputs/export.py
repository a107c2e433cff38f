"""Export a trained learner as a bundle: model.onnx (uint8 NHWC in, probabilities out) + manifest.json.

Over 400 lines: the bundle is verified here before it moves into place (onnx.checker, parity with
PyTorch, TTA through ONNX Runtime, the fp16 and int8 variants), and those checks share the
temporary folder, the graph and the learner's data."""

from __future__ import annotations

import copy
import logging
import math
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from serving.bundle.evaluate import predict_files
from serving.bundle.files import make_temp_dir, sha256_file
from serving.bundle.manifest import (
    CONTRACT_KEY,
    MODEL_NAME,
    TTA,
    Manifest,
    ModelFile,
    Normalization,
    Variant,
    contract_json,
    now,
    write_manifest,
)
from serving.bundle.preprocess import load_views
from serving.bundle.session import ModelSession
from trainer import memory
from trainer.evaluate.calibrate import before_calibration, calibrated_metrics, scores
from trainer.evaluate.metrics import accuracy
from trainer.evaluate.tta import predict_views
from trainer.learn.model import EnsembleNet, InferenceNet, get_arch

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
# ONNX Runtime and PyTorch compute in different orders; on real images their probabilities agree
# far more closely than this, so a larger gap means the graph is not the model that was validated.
PARITY_TOLERANCE = 1e-4


# Validation metrics that describe one set of weights, measured anew for a snapshot ensemble.
ENSEMBLE_METRICS = ("accuracy", "log_loss", "accuracy_tta", "log_loss_tta")


class ExportError(RuntimeError):
    pass


def export_onnx(net: torch.nn.Module, path: Path, input_size: int, contract: str, opset: int = OPSET) -> None:
    """Trace `net` (an InferenceNet on the CPU) into an ONNX file with a dynamic batch axis, carrying
    `contract` (serving.bundle.manifest.contract_json) in its metadata so that the server can tell an edited manifest."""
    import onnx

    dummy = torch.zeros(2, input_size, input_size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about constants; the checker runs below
        torch.onnx.export(
            net,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {CONTRACT_KEY: contract})
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def check_parity(session: ModelSession, net: torch.nn.Module, files: Sequence[Path]) -> float:
    """Largest |ONNX Runtime - PyTorch| probability over every TTA view of `files`; raises past tolerance."""
    m = session.manifest
    views = np.concatenate([load_views(Path(f).read_bytes(), m.preprocessing, m.tta.views) for f in files])
    with torch.no_grad():
        expected = net(torch.from_numpy(views)).numpy()
    gap = float(np.abs(session.run(views) - expected).max())
    if gap > PARITY_TOLERANCE:
        raise ExportError(f"ONNX Runtime and PyTorch disagree by {gap:.2e} in probability (limit {PARITY_TOLERANCE})")
    return gap


def export(
    learn,
    out_dir: Path | str,
    *,
    name: str = "classifier",
    version: str | None = None,
    metrics: dict[str, float] | None = None,
    held_out: bool = True,
    recipe: dict | None = None,
    snapshots: Sequence[str] = (),
    fp16: bool = False,
    int8: bool = False,
    parity_files: int = 8,
    calibration_images: int = 64,
    log=lambda msg: None,
) -> Manifest:
    """Write the bundle for `learn` into out_dir, replacing what was there only once it is complete.

    snapshots: names saved by fit(cycle_save_name=...); when given, the graph averages their
    probabilities (a snapshot ensemble) instead of using the current weights. Every one must have
    been trained at the bundle's input size (see snapshots_at_input_size); `metrics` describe the
    current weights, so the ensemble's own are measured instead.
    held_out: False when the model also trained on the validation images (`trainer run --full`), so
    that `metrics` are not held-out scores; recorded as the manifest's metrics_held_out.
    The manifest's tta.default (TTA for calls that do not say) follows choose_tta_default.
    Calibration: the graph divides its logits by metrics' temperature (trainer.evaluate.scoring fits it);
    without one, a temperature is fitted here on the validation images, to what the bundle serves by
    default (trainer.evaluate.calibrate), and, for the current weights, kept by the learner too, so that its
    TTA gives what the bundle serves.
    fp16 / int8: also write model.fp16.onnx (for GPUs) / model.int8.onnx (for CPUs, calibrated on
    training images), each with its validation accuracy change against the fp32 graph.

    Before the bundle moves into place it is verified: onnx.checker; ONNX Runtime against PyTorch on
    real images (PARITY_TOLERANCE); and the bundle's TTA through ONNX Runtime reproducing the
    PyTorch TTA accuracy on the validation set exactly. Raises ExportError when any check fails."""
    import onnx

    memory.trim()  # what training and evaluation freed, before the exporter and ONNX Runtime allocate
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    data, tfms, arch = learn.data, learn.data.tfms, get_arch(learn.net.arch_name)
    _check_snapshot_sizes(learn, snapshots)  # before anything is written: the old bundle stays
    net = _export_net(learn, snapshots)
    metrics = dict(metrics or {})
    if snapshots:  # the given metrics are the current weights'; _measure_tta measures the ensemble's
        metrics = {k: v for k, v in metrics.items() if k not in ENSEMBLE_METRICS}
    # Before the graph is written: its temperature, and the TTA default these metrics decide, are
    # part of its contract.
    _measure_tta(net, learn, metrics, held_out=held_out)
    net.temperature.fill_(metrics["temperature"])
    if not snapshots:  # the learner's TTA then gives the probabilities the bundle serves
        learn.temperature = metrics["temperature"]
    default, reason = choose_tta_default(before_calibration(metrics), held_out=held_out)
    log(f"export: TTA {'on' if default else 'off'} for calls that do not say: {reason}")
    created = now()
    tmp = make_temp_dir(out_dir.parent, prefix=f".{out_dir.name}.tmp-")
    try:
        # The graph carries the manifest's meaning, so the sha256 taken below covers both.
        classes, tta = list(data.classes), TTA(views=list(tfms.tta_views), default=default, reason=reason)
        export_onnx(net, tmp / MODEL_NAME, tfms.sz, contract_json(classes, tfms.prep, tta))
        memory.trim()  # the exporter's graph, before ONNX Runtime's sessions add theirs
        manifest = Manifest(
            name=name,
            version=version or created.strftime("%Y%m%d-%H%M%S"),
            created_at=created,
            architecture=arch.name,
            classes=classes,
            preprocessing=tfms.prep,
            normalization=Normalization(mean=arch.mean, std=arch.std),
            tta=tta,
            model=_model_file(tmp),
            ensemble=list(snapshots),
            metrics=metrics,
            metrics_held_out=held_out,
            recipe=recipe or {},
            versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": _ort_version()},
        )
        write_manifest(tmp, manifest)
        session = ModelSession(tmp, device="cpu")
        check_parity(session, net, list(data.val_files[:parity_files]) or list(data.trn_files[:parity_files]))
        reference = _verify_tta(session, learn, metrics, log)
        variants = []
        if fp16:
            variants.append(_variant(tmp, manifest, "fp16", reference, data, convert_fp16, log))
        if int8:
            calibration = list(data.trn_files[:calibration_images])
            quantize = lambda src, dst: quantize_int8(src, dst, manifest, calibration)  # noqa: E731
            variants.append(_variant(tmp, manifest, "int8", reference, data, quantize, log))
        manifest = manifest.model_copy(update={"variants": variants})
        write_manifest(tmp, Manifest.model_validate(manifest.model_dump()))
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _model_file(folder: Path) -> ModelFile:
    """The manifest's entry for the graph written in `folder`, with its digest."""
    return ModelFile(
        file=MODEL_NAME,
        sha256=sha256_file(folder / MODEL_NAME),
        opset=OPSET,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
    )


def snapshots_at_input_size(learn, names: Sequence[str]) -> tuple[list[str], dict[str, int | None]]:
    """Split snapshots into those trained at the learner's input size, which a bundle may average,
    and the others with the size each was trained at (None: unrecorded)."""
    size = learn.data.tfms.sz
    sizes = {name: learn.snapshot_size(name) for name in names}
    return [n for n in names if sizes[n] == size], {n: s for n, s in sizes.items() if s != size}


def _check_snapshot_sizes(learn, snapshots: Sequence[str]) -> None:
    """An ensemble member trained at another input size scores far worse at this one (after
    progressive resizing 32 -> 48 px, averaging the 32-px snapshots took TTA accuracy from 0.94 to
    0.47), and nothing downstream would notice: so a caller who names such snapshots is refused
    rather than silently given fewer members than asked for."""
    _, wrong = snapshots_at_input_size(learn, snapshots)
    if wrong:
        listed = ", ".join(f"{n} ({'size not recorded' if s is None else f'{s} px'})" for n, s in wrong.items())
        raise ExportError(
            f"snapshots not trained at the bundle's input size of {learn.data.tfms.sz} px: {listed}; "
            f"average only snapshots of the last size (trainer.outputs.export.snapshots_at_input_size selects them), "
            f"or export the final weights without snapshots"
        )


def _export_net(learn, snapshots: Sequence[str]) -> InferenceNet | EnsembleNet:
    """The module to trace, on the CPU in float32: the current weights, or an ensemble of snapshots."""
    if not snapshots:
        return InferenceNet(copy.deepcopy(learn.net).cpu().float()).eval()
    members = []
    current = {k: v.detach().clone() for k, v in learn.net.state_dict().items()}
    try:
        for snapshot in snapshots:
            learn.load(snapshot)
            members.append(copy.deepcopy(learn.net).cpu().float())
    finally:
        learn.net.load_state_dict(current)
    return EnsembleNet(members).eval()


def choose_tta_default(metrics: Mapping[str, float], *, held_out: bool = True) -> tuple[bool, str]:
    """Whether the server applies TTA to a call that does not say, and why, for the manifest.

    TTA is on unless it scores worse on validation than the plain view: a lower accuracy with TTA
    (accuracy_tta < accuracy), or the same accuracy and a higher log loss (log_loss_tta > log_loss).
    Averaging views can blur what the plain centre view sees best: on the digits demo TTA scored
    0.9192 against 0.9248 without. Where the metrics cannot tell (an accuracy missing, or a tie and
    no log loss to break it) TTA stays on, the lesson's default. Pure: no model, no files."""
    acc, acc_tta = metrics.get("accuracy", math.nan), metrics.get("accuracy_tta", math.nan)
    loss, loss_tta = metrics.get("log_loss", math.nan), metrics.get("log_loss_tta", math.nan)
    caveat = (
        "" if held_out else "; these scores are not held out: the model also trained on the validation images (--full)"
    )
    # 1) Nothing to compare: keep the default.
    missing = [name for name, value in (("accuracy", acc), ("accuracy_tta", acc_tta)) if not math.isfinite(value)]
    if missing:
        return True, f"no validation {' or '.join(missing)} to compare TTA with the plain view, so TTA on"
    # 2) Accuracy first, log loss on a tie (a comparison with a missing, NaN, log loss is False: TTA on).
    worse = acc_tta < acc or (acc_tta == acc and loss_tta > loss)
    scores = f"validation accuracy {_pair(acc, acc_tta)} with it"
    if math.isfinite(loss) and math.isfinite(loss_tta):
        scores += f"; log loss {_pair(loss, loss_tta)} with it"
    # 3) Say which rule decided.
    if acc_tta != acc:
        verdict = "less accurate with TTA" if worse else "more accurate with TTA"
    elif not (math.isfinite(loss) and math.isfinite(loss_tta)):
        verdict = "as accurate either way, and no log loss of both to break the tie"
    else:
        verdict = f"as accurate either way, log loss {'higher' if worse else 'no higher'} with TTA"
    return not worse, f"{scores}: {verdict}, so TTA {'off' if worse else 'on'}{caveat}"


def _pair(without: float, with_tta: float) -> str:
    """'0.9248 without TTA, 0.9192', with decimals enough to tell them apart (at least 4)."""
    d = 4
    while d < 12 and without != with_tta and f"{without:.{d}f}" == f"{with_tta:.{d}f}":
        d += 1
    return f"{without:.{d}f} without TTA, {with_tta:.{d}f}"


def _measure_tta(net: InferenceNet | EnsembleNet, learn, metrics: dict[str, float], *, held_out: bool) -> None:
    """Fill metrics with calibrated scores with and without TTA and the temperature (see
    trainer.evaluate.calibrate.calibrated_metrics) unless trainer.evaluate.scoring measured them already for these
    weights (scores the caller gave stand); an ensemble, whose metrics nobody else measured, is
    measured here in full. The temperature is fitted to what the bundle will serve by default."""
    if "temperature" in metrics and "accuracy_tta" in metrics and not isinstance(net, EnsembleNet):
        return
    data, tfms = learn.data, learn.data.tfms
    y = np.asarray(data.val_y)
    net.temperature.fill_(1.0)
    per_view = predict_views(net, data.val_files, tfms.prep, list(tfms.tta_views))
    given = {} if isinstance(net, EnsembleNet) else dict(metrics)
    tta, _ = choose_tta_default({**scores(per_view, y), **given}, held_out=held_out)
    measured, _ = calibrated_metrics(per_view, y, tta=tta)
    for k in given:  # a score the caller gave is the one before calibration too
        measured.pop(f"{k}_uncalibrated", None)
    metrics.update({k: v for k, v in measured.items() if k not in given})


def _verify_tta(session: ModelSession, learn, metrics: dict[str, float], log) -> np.ndarray:
    """The bundle's TTA through ONNX Runtime must reproduce PyTorch's TTA accuracy (metrics'
    accuracy_tta, see _measure_tta) exactly; returns the ONNX probabilities."""
    data = learn.data
    y = np.asarray(data.val_y)
    onnx_probs = predict_files(session, data.val_files)
    onnx_accuracy = accuracy(onnx_probs, y)
    if len(y) and onnx_accuracy != metrics["accuracy_tta"]:
        raise ExportError(
            f"the bundle's TTA through ONNX Runtime scores {onnx_accuracy:.6f} on the validation set, "
            f"PyTorch's TTA {metrics['accuracy_tta']:.6f}: the exported graph is not the validated model"
        )
    log(f"export: ONNX Runtime TTA accuracy {onnx_accuracy:.4f} equals the trainer's")
    return onnx_probs


def _variant(
    tmp: Path, manifest: Manifest, precision: Literal["fp16", "int8"], reference: np.ndarray, data, make, log
) -> Variant:
    """Write the `precision` copy of model.onnx and measure it against the fp32 model's probabilities."""
    file = f"model.{precision}.onnx"
    # Both converters keep the graph's metadata_props, so the copy carries the fp32 graph's contract;
    # the ModelSession below checks it, as the server does at any precision.
    make(tmp / MODEL_NAME, tmp / file)
    variant = Variant(
        precision=precision,
        file=file,
        sha256=sha256_file(tmp / file),
        intended_for="cuda" if precision == "fp16" else "cpu",
        accuracy_tta=0.0,
        accuracy_tta_delta=0.0,
        max_probability_diff=0.0,
    )
    write_manifest(tmp, manifest.model_copy(update={"variants": [variant]}))
    probs = predict_files(ModelSession(tmp, device="cpu", precision=precision), data.val_files)
    y = np.asarray(data.val_y)
    fp32 = accuracy(reference, y)
    measured = variant.model_copy(
        update={
            "accuracy_tta": accuracy(probs, y),
            "accuracy_tta_delta": accuracy(probs, y) - fp32,
            "max_probability_diff": float(np.abs(probs - reference).max()) if len(y) else 0.0,
        }
    )
    log(f"export: {precision} TTA accuracy {measured.accuracy_tta:.4f} ({measured.accuracy_tta_delta:+.4f} vs fp32)")
    return measured


def convert_fp16(src: Path, dst: Path) -> None:
    """Float16 weights and arithmetic, uint8 input and float32 output kept (the bundle contract)."""
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per weight too small for float16 (flushed to 0)
        model = float16.convert_float_to_float16(
            onnx.load(str(src)),
            keep_io_types=True,
            # Our graph's first node casts the uint8 input to float; converting that Cast yields a
            # graph ONNX Runtime rejects (type mismatch), so it stays float32 and feeds a converted copy.
            op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, "Cast"],
        )
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def quantize_int8(src: Path, dst: Path, manifest: Manifest, calibration_files: Sequence[Path]) -> None:
    """Static int8 quantization (QDQ, per-channel weights) calibrated on real images' plain views."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            views = manifest.tta.views[:1]
            self.batches = iter(
                {INPUT_NAME: load_views(Path(f).read_bytes(), manifest.preprocessing, views)} for f in calibration_files
            )

        def get_next(self):
            return next(self.batches, None)

    pre = dst.with_suffix(".pre.onnx")
    try:
        with _quiet_quantizer(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), str(pre))
            quantize_static(
                str(pre),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
    finally:
        pre.unlink(missing_ok=True)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Keep onnxruntime.quantization's notes off the user's terminal while it runs, and nothing else.

    It logs on the root logger itself (`logging.warning("Axis 1 is out-of-range for weight ...")`
    for every 1-D weight, expected with per-channel quantization, and info lines), and the first such
    call on an unconfigured root also installs a stderr handler for the rest of the process
    (logging.basicConfig). So for the duration: records below ERROR made on the root logger or under
    `onnxruntime` are dropped (a logger's filter sees only its own records, so other libraries'
    warnings still pass); an unconfigured root gets Python's last-resort handler, which prints what
    would have been printed anyway and keeps basicConfig from running. Errors and exceptions pass."""
    root, ort_logger = logging.getLogger(), logging.getLogger("onnxruntime")
    ort_level = ort_logger.level
    guard = logging.lastResort if not root.handlers else None

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    root.addFilter(errors_only)
    ort_logger.setLevel(max(ort_level, logging.ERROR))
    if guard is not None:
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard is not None:
            root.removeHandler(guard)
        ort_logger.setLevel(ort_level)
        root.removeFilter(errors_only)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _replace_dir(new: Path, target: Path) -> None:
    """Move a finished folder into place; an old bundle there is kept until the new one is in."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{now().strftime('%Y%m%d%H%M%S%f')}")
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
