"""Export a trained learner as a bundle: model.onnx (uint8 NHWC in, probabilities out) + manifest.json."""

from __future__ import annotations

import copy
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from serving.bundle import (
    MODEL_NAME,
    Manifest,
    ModelFile,
    Normalization,
    TTA,
    now,
    sha256_file,
    write_manifest,
)
from serving.preprocess import load_views
from serving.session import ModelSession
from trainer.model import InferenceNet, get_arch

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
# ONNX Runtime and PyTorch compute in different orders; on real images their probabilities agree
# far more closely than this, so a larger gap means the graph is not the model that was validated.
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    pass


def export_onnx(net: torch.nn.Module, path: Path, input_size: int, opset: int = OPSET) -> None:
    """Trace `net` (an InferenceNet on the CPU) into an ONNX file with a dynamic batch axis."""
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
    recipe: dict | None = None,
    parity_files: int = 8,
) -> Manifest:
    """Write the bundle for `learn` into out_dir, replacing what was there only once it is complete.

    The graph is checked with onnx.checker and against PyTorch on real validation images before
    the bundle is moved into place, so a bundle folder is always whole and verified."""
    import onnx

    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tfms, arch = learn.data.tfms, get_arch(learn.net.arch_name)
    net = InferenceNet(copy.deepcopy(learn.net).cpu().float()).eval()
    created = now()
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        export_onnx(net, tmp / MODEL_NAME, tfms.sz)
        manifest = Manifest(
            name=name,
            version=version or created.strftime("%Y%m%d-%H%M%S"),
            created_at=created,
            architecture=arch.name,
            classes=list(learn.data.classes),
            preprocessing=tfms.prep,
            normalization=Normalization(mean=arch.mean, std=arch.std),
            tta=TTA(views=list(tfms.tta_views)),
            model=ModelFile(
                file=MODEL_NAME,
                sha256=sha256_file(tmp / MODEL_NAME),
                opset=OPSET,
                input_name=INPUT_NAME,
                output_name=OUTPUT_NAME,
            ),
            metrics=metrics or {},
            recipe=recipe or {},
            versions={"torch": torch.__version__, "onnx": onnx.__version__},
        )
        write_manifest(tmp, manifest)
        files = list(learn.data.val_files[:parity_files]) or list(learn.data.trn_files[:parity_files])
        check_parity(ModelSession(tmp, device="cpu"), net, files)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


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
