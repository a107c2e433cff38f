"""An ONNX Runtime session over a validated bundle: views in, TTA-averaged probabilities out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.bundle.manifest import (
    CONTRACT_KEY,
    MANIFEST_NAME,
    BundleError,
    Manifest,
    Precision,
    check_contract,
    load_bundle,
)


def choose_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for `device`: auto (CUDA when usable, else CPU), cuda or cpu."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BundleError("device=cuda, but this onnxruntime has no CUDA provider; install onnxruntime-gpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and _cuda_device_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _cuda_device_present() -> bool:
    # onnxruntime-gpu lists its CUDA provider whether or not a GPU is there; asking the driver
    # avoids a noisy failed CUDA initialisation on CPU-only machines.
    import ctypes

    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


class ModelSession:
    """A bundle loaded into ONNX Runtime. `run` takes uint8 views (n, size, size, 3)."""

    def __init__(
        self,
        bundle_dir: Path | str,
        *,
        device: str = "auto",
        precision: Precision = "fp32",
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        spinning: bool = False,
    ):
        self.bundle_dir = Path(bundle_dir)
        self.precision = precision
        self.manifest: Manifest
        self.manifest, model_path = load_bundle(self.bundle_dir, precision)
        self.model_path = model_path
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads  # 0: ONNX Runtime's default (all cores)
        options.inter_op_num_threads = inter_op_threads
        options.log_severity_level = 3  # errors only
        # Spinning keeps ONNX Runtime's pool threads busy-waiting for the next run after each one ends; in a
        # server that decodes images between runs they steal the cores the decoding needs (bench/serving.py
        # --threads measures it), so they sleep unless asked.
        for pool in ("intra_op", "inter_op"):
            options.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spinning else "0")
        providers = choose_providers(device)
        if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
            # CUDA and cuDNN from PyPI (onnxruntime-gpu[cuda,cudnn], the serving image's CUDA=1) live in
            # site-packages, where the dynamic loader does not look; a system CUDA needs no preload.
            ort.preload_dlls()
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types, not exported uniformly
            raise BundleError(f"{model_path}: ONNX Runtime cannot load it: {_one_line(e)}") from None
        self.providers = self.session.get_providers()
        # The shape check comes before the contract check: an edited input_size fails both, and the
        # shape names the sizes that disagree.
        self._check_io()
        check_contract(self.manifest, self.session.get_modelmeta().custom_metadata_map.get(CONTRACT_KEY), model_path)

    def _check_io(self) -> None:
        m, path = self.manifest, self.model_path
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [m.model.input_name] or [o.name for o in outputs] != [m.model.output_name]:
            raise BundleError(
                f"{path}: graph inputs {[i.name for i in inputs]} / outputs {[o.name for o in outputs]} do not match "
                f"the manifest's {m.model.input_name!r} / {m.model.output_name!r}"
            )
        if inputs[0].type != "tensor(uint8)":
            raise BundleError(f"{path}: graph input is {inputs[0].type}, the bundle contract says tensor(uint8)")
        shape, size = inputs[0].shape, m.preprocessing.input_size
        # A symbolic (str) dimension takes any size; a fixed one must be the manifest's.
        if len(shape) != 4 or (isinstance(shape[3], int) and shape[3] != 3):
            raise BundleError(f"{path}: graph input has shape {shape}, the bundle contract says (batch, size, size, 3)")
        if any(isinstance(d, int) and d != size for d in shape[1:3]):
            raise BundleError(
                f"{path}: the graph takes {shape[1]}x{shape[2]} pixel images but {path.parent / MANIFEST_NAME} says "
                f"preprocessing.input_size {size}; the bundle's files do not belong together: re-export it"
            )
        width = outputs[0].shape[-1]
        if not isinstance(width, int):  # a symbolic width: find out by running the graph once
            width = self._run_or_refuse(np.zeros((1, *self.input_shape), np.uint8), "a blank image").shape[-1]
        if width != len(m.classes):
            raise BundleError(
                f"{path}: the model outputs {width} probabilities but the manifest lists {len(m.classes)} classes; "
                "the bundle's files do not belong together: re-export it"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.manifest.preprocessing.input_size
        return (size, size, 3)

    def run(self, views: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of views: uint8 (n, size, size, 3) -> float32 (n, classes)."""
        return self.session.run([self.manifest.model.output_name], {self.manifest.model.input_name: views})[0]

    def predict(self, views: np.ndarray, counts: Sequence[int] | None = None) -> np.ndarray:
        """Mean probability over consecutive groups of views (one group per image; default: one image)."""
        probs = self.run(views)
        counts = list(counts) if counts is not None else [len(views)]
        ends = np.cumsum(counts)
        return np.stack([probs[e - c : e].mean(axis=0) for c, e in zip(counts, ends, strict=True)])

    def warm_up(self, batch: int = 1) -> None:
        """Run the graph once so that the first real request pays no initialisation cost."""
        n_views = len(self.manifest.tta.views)
        self._run_or_refuse(
            np.zeros((batch * n_views, *self.input_shape), np.uint8), f"a warm-up batch of {batch} images"
        )

    def _run_or_refuse(self, views: np.ndarray, what: str) -> np.ndarray:
        """`run`, with an ONNX Runtime failure (a graph that does not fit its manifest) as a BundleError."""
        try:
            return self.run(views)
        except Exception as e:  # onnxruntime raises its own exception types, not exported uniformly
            raise BundleError(f"{self.model_path}: ONNX Runtime cannot run it on {what}: {_one_line(e)}") from None


def _one_line(error: Exception) -> str:
    # ONNX Runtime's messages span several lines; the CLI prints a BundleError as one.
    return " ".join(str(error).split())
