"""The fastai-style lesson-2 workflow: data, augmentation, a pretrained ConvLearner, SGDR, TTA, export.

The folders are the stages: `data/` (images to batches), `learn/` (the network and its training),
`evaluate/` (TTA, calibration, metrics), `outputs/` (the run folder, the bundle, plots, the
report), `audit/` (checks of a dataset: unreadable files, warnings, likely label errors); `recipe`, `commands`, `cli` and `demo` put them together. The names a script needs are
here, imported on first use so that `import trainer` (and the CLI's startup) does not load torch:

    from trainer import ConvLearner, ImageClassifierData, export, tfms_from_model, transforms_side_on
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_PUBLIC = {
    "ImageClassifierData": "trainer.data.loaders",
    "tfms_from_model": "trainer.data.augment",
    "transforms_side_on": "trainer.data.augment",
    "transforms_top_down": "trainer.data.augment",
    "ConvLearner": "trainer.learn.learner",
    "export": "trainer.outputs.export",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
