"""Test-time augmentation in the trainer, through the same preprocessing the server runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from serving.bundle.manifest import Preprocessing, TTAView
from serving.bundle.preprocess import load_views


@torch.no_grad()
def predict_views(
    net: torch.nn.Module,
    files: Sequence[Path],
    prep: Preprocessing,
    views: Sequence[TTAView],
    *,
    device: torch.device | str = "cpu",
    batch_images: int = 16,
    progress: bool = True,
) -> np.ndarray:
    """Probabilities for every view of every image: (n_images, n_views, n_classes), float32.

    `net` is an InferenceNet (uint8 NHWC in, probabilities out): the module that gets exported."""
    net.eval()
    out = []
    for i in tqdm(range(0, len(files), batch_images), desc="TTA", unit="batch", leave=False, disable=not progress):
        chunk = files[i : i + batch_images]
        x = np.concatenate([load_views(Path(f).read_bytes(), prep, views) for f in chunk])
        probs = net(torch.from_numpy(x).to(device)).float().cpu().numpy()
        out.append(probs.reshape(len(chunk), len(views), -1))
    return np.concatenate(out) if out else np.empty((0, len(views), 0), np.float32)
