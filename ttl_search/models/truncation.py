"""Truncated models: the kept units of a backbone plus a new classification head.

``truncate(loaded, cut, num_classes)`` keeps units ``1..cut`` in an ``nn.Sequential`` and attaches
a new head; the dropped units are not referenced, so they are really gone (parameter count and
forward pass show it). ``analyze_cuts`` runs one forward pass through every unit at a given input
size and reports, per cut, the output shape, parameters, MACs and whether the cut is valid there.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch import nn

from .backbones import BackboneSpec, LoadedBackbone, get_backbone, load_backbone, stage_ends, unit_modules
from .cost import count_macs, count_params
from ..errors import ConfigError, CutError, choices

log = logging.getLogger(__name__)

HEADS = ("pool", "flatten")


def _kaiming_linear(in_features: int, num_classes: int) -> nn.Linear:
    linear = nn.Linear(in_features, num_classes)
    nn.init.kaiming_normal_(linear.weight, nonlinearity="linear")
    nn.init.zeros_(linear.bias)
    return linear


class PoolHead(nn.Module):
    """Global average pooling over every spatial axis, then a Kaiming-initialised linear layer."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = _kaiming_linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(2).mean(-1))


class FlattenHead(nn.Module):
    """Flatten the whole feature map, then a linear layer (the paper's ablation)."""

    def __init__(self, channels: int, spatial: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.fc = _kaiming_linear(channels * math.prod(spatial), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def make_head(kind: str, channels: int, spatial: tuple[int, ...], num_classes: int) -> nn.Module:
    if kind == "pool":
        return PoolHead(channels, num_classes)
    if kind == "flatten":
        return FlattenHead(channels, spatial, num_classes)
    raise ConfigError(f"unknown head {kind!r}; valid heads: {choices(HEADS)}")


class TruncatedModel(nn.Module):
    """Kept backbone units (``features``) followed by a new ``head``."""

    def __init__(self, features: nn.Sequential, head: nn.Module, backbone: str, cut: int, cut_name: str) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.backbone = backbone
        self.cut = cut
        self.cut_name = cut_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def check_cut(spec: BackboneSpec, cut: int) -> None:
    """Raise :class:`CutError` when ``cut`` is not one of the backbone's cut indices."""
    n = len(spec.cuts)
    if isinstance(cut, bool) or not isinstance(cut, int) or not 1 <= cut <= n:
        raise CutError(
            f"cut {cut!r} does not exist for {spec.name}; valid cuts: 1..{n} "
            f"(stage ends {choices(stage_ends(spec))})"
        )


def input_shape(spec: BackboneSpec, input_size: int, in_channels: int) -> tuple[int, ...]:
    """Shape of one input (without batch): C×S×S for 2D, C×S×S×S for 3D."""
    return (in_channels,) + (input_size,) * spec.dims


def feature_shape(features: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape (without batch) of ``features`` for one input of ``shape``."""
    was_training = features.training
    features.eval()
    try:
        with torch.no_grad():
            return tuple(features(torch.zeros(1, *shape)).shape[1:])
    finally:
        features.train(was_training)


def truncate(loaded: LoadedBackbone, cut: int, num_classes: int, head: str = "pool",
             input_size: int | None = None) -> TruncatedModel:
    """Keep units ``1..cut`` of ``loaded`` and attach a new head for ``num_classes`` classes.

    The cut is checked against the analysis at ``input_size`` (default: the backbone's), so a cut
    that fails or collapses there raises :class:`CutError` with the reason.
    """
    spec = loaded.spec
    check_cut(spec, cut)
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    size = input_size or spec.default_input_size
    info = analyze_cuts(spec.name, size, num_classes, loaded.in_channels, head)[cut - 1]
    if not info.valid:
        raise CutError(f"cut {cut} ({info.name}) of {spec.name} is invalid at {size} px input: {info.reason}")
    # A copy, so that training (or freezing) one truncated model never touches another's units.
    features = copy.deepcopy(nn.Sequential(unit_modules(loaded.units[:cut])))
    head_module = make_head(head, info.channels, info.spatial, num_classes)
    return TruncatedModel(features, head_module, spec.name, cut, info.name)


@dataclass(frozen=True)
class CutInfo:
    """One row of the cut table of a backbone at an input size."""

    index: int
    """1-based cut index."""
    name: str
    """Last kept unit."""
    stage: int
    """Stage of the last kept unit."""
    stage_end: bool
    """Whether the cut ends its stage."""
    channels: int | None
    """Output channels of the kept units (None when the forward pass fails)."""
    spatial: tuple[int, ...] | None
    """Output spatial size of the kept units."""
    params: int | None
    """Parameters of the truncated model, head included."""
    macs: int | None
    """Multiply-accumulates of one forward pass of the truncated model, head included."""
    valid: bool
    """Whether the truncated model works at this input size."""
    reason: str
    """Why the cut is invalid (empty when valid)."""

    def as_dict(self) -> dict:
        row = asdict(self)
        row["spatial"] = list(self.spatial) if self.spatial is not None else None
        return row


def _head_cost(head: str, channels: int, spatial: tuple[int, ...], num_classes: int) -> tuple[int, int]:
    features = channels * (math.prod(spatial) if head == "flatten" else 1)
    return features * num_classes + num_classes, features * num_classes


@lru_cache(maxsize=64)
def analyze_cuts(backbone: str, input_size: int | None = None, num_classes: int = 2, in_channels: int = 3,
                 head: str = "pool") -> tuple[CutInfo, ...]:
    """Shape, size, MACs and validity of every cut of ``backbone`` at ``input_size``.

    One forward pass of a random-weight copy runs unit by unit; a unit that raises, or leaves
    an empty feature map, makes its cut and every later cut invalid.
    """
    spec = get_backbone(backbone)
    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; valid heads: {choices(HEADS)}")
    size = input_size or spec.default_input_size
    if size < 1:
        raise ConfigError(f"input size must be positive, got {size}")
    # The random-weight copy draws from a forked random stream: this table is cached, so drawing
    # from the caller's would make a trial's own initialisation depend on whether an earlier trial
    # in the same (reused) worker process had filled the cache.
    with torch.random.fork_rng(devices=[]):
        loaded = load_backbone(backbone, None, in_channels)
    x = torch.zeros(1, *input_shape(spec, size, in_channels))
    rows: list[CutInfo] = []
    params = macs = 0
    failure = ""
    for cut, (_, _, module) in zip(spec.cuts, loaded.units):
        module.eval()
        params += count_params(module)
        if not failure:
            try:
                macs += count_macs(module, x)
                with torch.no_grad():
                    x = module(x)
                if any(d == 0 for d in x.shape[2:]):
                    failure = f"the feature map collapses to {tuple(x.shape[1:])} at {size} px input"
            except RuntimeError as exc:
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                failure = f"forward pass fails at {size} px input: {first_line}"
            if failure:
                rows.append(CutInfo(cut.index, cut.name, cut.stage, cut.stage_end, None, None, None, None, False, failure))
                failure = f"an earlier unit fails at {size} px input (cut {cut.index}, {cut.name})"
                continue
        if failure:
            rows.append(CutInfo(cut.index, cut.name, cut.stage, cut.stage_end, None, None, None, None, False, failure))
            continue
        channels, spatial = int(x.shape[1]), tuple(int(d) for d in x.shape[2:])
        head_params, head_macs = _head_cost(head, channels, spatial, num_classes)
        rows.append(CutInfo(cut.index, cut.name, cut.stage, cut.stage_end, channels, spatial,
                            params + head_params, macs + head_macs, True, ""))
    return tuple(rows)


def valid_cuts(backbone: str, input_size: int | None = None, in_channels: int = 3) -> list[int]:
    """Indices of the cuts that work at ``input_size``."""
    return [row.index for row in analyze_cuts(backbone, input_size, 2, in_channels) if row.valid]
