"""RunConfig: the architectures it accepts are the ones the model module builds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainer.config import ARCH_NAMES, RunConfig


def test_the_architecture_names_are_those_the_model_module_builds():
    from trainer.learn.model import ARCHS

    assert list(ARCH_NAMES) == list(ARCHS)


def test_an_unknown_architecture_is_refused_with_the_known_ones_named():
    with pytest.raises(
        ValidationError, match="unknown architecture 'vgg'; choose one of: efficientnet_lite0, efficientnet_lite1"
    ):
        RunConfig(arch="vgg")
