"""The work behind Predict, as plain functions: bytes in, ranked probabilities out. No network."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.preprocess import load_views
from serving.session import ModelSession


@dataclass(frozen=True)
class Result:
    probabilities: np.ndarray  # (n_classes,), mean over the views that ran
    views: list[str]  # names of those views

    def top(self, k: int = 0) -> list[tuple[int, float]]:
        """(class index, probability), most probable first; k=0 gives every class."""
        order = np.argsort(-self.probabilities, kind="stable")
        if k:
            order = order[:k]
        return [(int(i), float(self.probabilities[i])) for i in order]


def predict_image(session: ModelSession, data: bytes, *, tta: bool = True, max_pixels: int) -> Result:
    """Decode, make the bundle's views (all of them, or only the first with tta=False), run them
    through ONNX Runtime in one call and average the probabilities. Raises ImageError on bad input."""
    m = session.manifest
    views = m.tta.views if tta else m.tta.views[:1]
    x = load_views(data, m.preprocessing, views, max_pixels=max_pixels)
    return Result(session.predict(x)[0], [v.name for v in views])
