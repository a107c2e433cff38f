"""Shared fixtures: real image folders, small and fast enough for a 2-core CPU."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from PIL import Image

    from serving.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera"


def serve_args(source: Path, *flags: str, repository: bool = False, metrics: bool = False) -> list[str]:
    """The arguments after `serving serve` as the tests start it: `source` a bundle (or, with
    repository=True, a model repository), on free ports (gRPC and HTTP; metrics only when asked),
    on the CPU, then `flags`."""
    where = "--model-repository" if repository else "--bundle"
    ports = ["--port", "0", "--http-port", "0", "--metrics-port", "0" if metrics else "off"]
    return [where, str(source), *ports, "--device", "cpu", *flags]


def serve_argv(source: Path, *flags: str, repository: bool = False, metrics: bool = False) -> list[str]:
    """`serving serve` as a process of this Python (serve_args says with what)."""
    return [
        sys.executable,
        "-m",
        "serving.cli",
        "serve",
        *serve_args(source, *flags, repository=repository, metrics=metrics),
    ]


def served_ports(line: str) -> dict[str, int]:
    """The ports in the line a started server prints first ("serving on HOST:PORT, HTTP/REST on ...,
    metrics on ..."): grpc, and http and metrics when they are on; empty when the line is not it."""
    found = re.match(r"serving on \S+:(\d+)(?:, HTTP/REST on \S+:(\d+)/)?(?:, metrics on \S+:(\d+)/metrics)?", line)
    if not found:
        return {}
    named = zip(("grpc", "http", "metrics"), found.groups(), strict=True)
    return {name: int(port) for name, port in named if port is not None}


def hymenoptera_or_skip() -> Path:
    if not (HYMENOPTERA / "train").is_dir():
        pytest.skip(f"shared dataset not found at {HYMENOPTERA} (it lies beside the project, never inside it)")
    return HYMENOPTERA


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    return hymenoptera_or_skip()


def server_config(bundle: Path | None = None, **kw) -> ServerConfig:
    """A test server's configuration: gRPC and HTTP on ports the system picks, on the CPU, no metrics
    port (metrics_port=0 gives one); any other field from `kw`, a model repository included."""
    from serving.config import ServerConfig

    kw.setdefault("metrics_port", None)
    kw.setdefault("http_port", 0)
    return ServerConfig(bundle=bundle, port=0, device="cpu", **kw)


def bench_module(name: str):
    """bench/<name>.py loaded as the module bench_<name>: bench/ holds scripts, not on the path
    tests run with (and bench/serving.py's name would hide the serving package if it were)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def subset(src: Path, dst: Path, per_class: dict[str, int], *, val_from: str = "val", val_to: str = "valid") -> Path:
    """A small copy of a folder dataset: symlinks to the first n images of every class."""
    for split, n in per_class.items():
        source_split = val_from if split == val_to else split
        for cls in sorted(p.name for p in (src / source_split).iterdir() if p.is_dir()):
            folder = dst / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for f in sorted((src / source_split / cls).iterdir())[:n]:
                (folder / f.name).symlink_to(f.resolve())
    return dst


@pytest.fixture(scope="session")
def tiny_hymenoptera(tmp_path_factory, hymenoptera) -> Path:
    """12 training and 6 validation photos per class, in the lesson's train/valid layout."""
    return subset(hymenoptera, tmp_path_factory.mktemp("hym") / "data", {"train": 12, "valid": 6})


@pytest.fixture
def fresh_copy(tmp_path):
    """Copy a folder into tmp_path (files, not links) so that a test may change it."""

    def copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst, symlinks=False)
        return dst

    return copy


def write_colour_dataset(root: Path, per_class: dict[str, int], size=(40, 30), seed: int = 0) -> Path:
    """A real, learnable image dataset: reddish 'red' and bluish 'blue' photos with noise, as PNG
    and JPEG files in root/<split>/<class>/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = {"blue": (40, 60, 200), "red": (200, 50, 40)}
    for split, n in per_class.items():
        for cls, rgb in base.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.normal(0, 30, (size[1], size[0], 3))
                a = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(a).save(folder / f"{cls}{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture
def colours(tmp_path) -> Path:
    """8 training and 4 validation images per class (red, blue), writable."""
    return write_colour_dataset(tmp_path / "colours", {"train": 8, "valid": 4})


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> Path:
    """8 training and 4 validation images per class (red, blue), shared by the session: read it,
    never write into it (copy it with `fresh_copy` first)."""
    return write_colour_dataset(tmp_path_factory.mktemp("shared") / "colours", {"train": 8, "valid": 4})


# Every stage of the recipe at 32 px in a few seconds an epoch: lr_find, the head (1 epoch), the head
# with augmentation (1), lr_find unfrozen, then all layers for 2 SGDR cycles (1 + 2 epochs).
# Every step the recipe can take, the unfrozen lr_find sweep included (the default derives that lr
# from the head's instead: tests/trainer/test_recipe.py covers it).
TRAINER_RUN_FLAGS = (
    *("--size", "32", "--bs", "4", "--num-workers", "0", "--name", "colours"),
    *("--head-epochs", "1", "--aug-cycles", "1", "--unfreeze-cycles", "2", "--lr-find-unfrozen"),
)


@dataclass(frozen=True)
class TrainerRun:
    """A finished `trainer run`: its folder, and the dataset and flags it was given."""

    path: Path
    data: Path
    flags: tuple[str, ...]


@pytest.fixture(scope="session")
def trainer_run(tmp_path_factory, colour_data) -> TrainerRun:
    """The one end-to-end training run of the default suite: `trainer run` through its console
    script, as a user runs it; the CLI, end-to-end and resume tests read its folder and serve its
    bundle. Read only: a test that changes a run copies it first.

    A relative --out, as the README writes it (report.html once lost its plots with one), and umask
    022, as on most systems: what the trainer writes must then be readable by other users."""
    trainer = shutil.which("trainer")
    if trainer is None:
        pytest.skip("console script `trainer` not installed (pip install -e .)")
    parent = tmp_path_factory.mktemp("trainer_run")
    proc = subprocess.run(
        [trainer, "run", "--data", str(colour_data), "--out", "run", *TRAINER_RUN_FLAGS],
        cwd=parent,
        preexec_fn=lambda: os.umask(0o022),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return TrainerRun(path=parent / "run", data=colour_data, flags=TRAINER_RUN_FLAGS)


def epochs_as_trained(run: Path) -> list[dict]:
    """A run's history.csv, one dict per epoch, less each epoch's wall time: what two runs that
    trained the same way share exactly."""
    from trainer.outputs.run_folder import RunFolder

    return [{k: v for k, v in vars(s).items() if k != "seconds"} for s in RunFolder(run).read_history()]


def differing_tensors(a: dict, b: dict) -> list[str]:
    """The names of the tensors in which two state dicts (or weight files loaded) differ, missing ones included."""
    import torch

    return sorted({*a, *b} - {k for k in a.keys() & b.keys() if torch.equal(a[k], b[k])})


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A real export bundle for the serving tests: EfficientNet-Lite0 with a head trained for one
    epoch on the red/blue images at 32 px (4 TTA views). About 15 s on 2 cores, made once per session;
    the tests need a real graph and manifest, not a good model."""
    import torch

    from trainer.data.augment import tfms_from_model, transforms_side_on
    from trainer.data.loaders import ImageClassifierData
    from trainer.learn.learner import ConvLearner
    from trainer.outputs.export import export

    root = tmp_path_factory.mktemp("tiny_bundle")
    data_dir = write_colour_dataset(root / "colours", {"train": 4, "valid": 2})
    tfms = tfms_from_model("efficientnet_lite0", 32, aug_tfms=transforms_side_on, max_zoom=1.1)
    data = ImageClassifierData.from_paths(data_dir, tfms, bs=8, num_workers=0, seed=0)
    torch.manual_seed(0)
    learn = ConvLearner.pretrained(
        "efficientnet_lite0", data, precompute=True, log=lambda _: None, models_dir=root / "models"
    )
    learn.fit(1e-2, 1)
    # A plain-view accuracy below any TTA's: the bundle applies TTA to calls that do not say, as the
    # serving tests expect (without it, export measures both views and the tie-break may turn TTA off).
    export(learn, root / "bundle", name="colours", version="test-1", metrics={"accuracy": 0.0})
    return root / "bundle"


def png(rgb=(200, 50, 40), size=(40, 30), seed=0) -> bytes:
    """A small noisy PNG of colour `rgb` (a real file, as callers send them)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = np.clip(np.array(rgb) + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def photo(seed: int, size=(160, 120)) -> Image.Image:
    """A picture with structure (gradients and blocks), as photos have: its perceptual hash survives
    resizing and re-encoding, where noise's would not."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([(xx * rng.uniform(0.5, 2) + yy * rng.uniform(-1, 1)) % 256 for _ in range(3)], axis=-1)
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
        a[y0 : y0 + rng.integers(10, 60), x0 : x0 + rng.integers(10, 60)] = rng.integers(0, 256, 3)
    return Image.fromarray(a.astype(np.uint8))
