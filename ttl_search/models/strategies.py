"""The transfer strategies the paper compares, as models plus optimizer parameter groups.

- ``ttl``: keep and fine-tune the units up to the cut, drop the rest (TruncatedTL).
- ``full``: full fine-tuning (the cut is the last one).
- ``linear_probe``: frozen (optionally truncated) backbone, trained head.
- ``lwft``: layer-wise fine-tuning: the bottom ``frozen_units`` units frozen, the other units at
  lr/10, the head at lr.
- ``transfusion``: pretrained units up to the cut, every later unit re-created at half width with
  random init (Raghu et al., 2019).
- ``scratch``: the ``ttl`` architecture from random init.
- ``probe``: the frozen probe's model (a logistic regression on the pooled frozen features at the
  cut, fitted by :mod:`ttl_search.train.probe` rather than trained): the same architecture as
  ``linear_probe``; not a baseline a study schedules, the probe phase stores it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .backbones import LoadedBackbone, backbone_names, get_backbone, load_backbone, unit_modules
from .tiny import TinyBlock
from ..errors import ConfigError, choices
from .truncation import TruncatedModel, check_cut, feature_shape, input_shape, make_head, truncate

TRANSFUSION_FAMILIES = ("resnet", "resnet3d", "tiny")
"""Backbone families whose units TransFusion can re-create at half width (residual blocks)."""


@dataclass
class StrategyModel:
    """A model built for one strategy, with how to optimise it."""

    model: TruncatedModel
    """The network to train."""
    param_groups: list[dict]
    """Optimizer parameter groups: ``{"params": [...], "lr_scale": s, "name": ...}``."""
    frozen: list[nn.Module] = field(default_factory=list)
    """Modules that stay in eval mode while training (frozen batch-norm statistics)."""
    cut: int = 0
    """Cut the model corresponds to (the last cut for full fine-tuning)."""


def _groups(*pairs: tuple[str, nn.Module | list[nn.Module], float]) -> list[dict]:
    groups = []
    for name, modules, scale in pairs:
        modules = modules if isinstance(modules, list) else [modules]
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        if params:
            groups.append({"name": name, "params": params, "lr_scale": scale})
    return groups


def _freeze(modules: list[nn.Module]) -> None:
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; valid strategies: {choices(STRATEGIES)}")


def build_strategy_model(loaded: LoadedBackbone, strategy: str, cut: int | None, num_classes: int,
                         head: str = "pool", input_size: int | None = None,
                         frozen_units: int | None = None) -> StrategyModel:
    """Build the model and parameter groups of ``strategy`` at ``cut`` (None: the last cut)."""
    check_strategy(strategy)
    spec = loaded.spec
    last = len(spec.cuts)
    if STRATEGIES[strategy].last_cut_only:
        if cut not in (None, last):
            raise ConfigError(f"strategy {strategy!r} fine-tunes every unit; its cut is {last} for {spec.name}, got {cut}")
        cut = last
    cut = last if cut is None else cut
    check_cut(spec, cut)
    return STRATEGIES[strategy].build(loaded, cut, num_classes, head, input_size, frozen_units)


def _kept(loaded: LoadedBackbone, cut: int, num_classes: int, head: str, input_size: int | None,
          frozen_units: int | None) -> StrategyModel:
    model = truncate(loaded, cut, num_classes, head, input_size)
    return StrategyModel(model, _groups(("all", model, 1.0)), cut=cut)


def _scratch(loaded: LoadedBackbone, cut: int, num_classes: int, head: str, input_size: int | None,
             frozen_units: int | None) -> StrategyModel:
    fresh = load_backbone(loaded.spec.name, None, loaded.in_channels)
    return _kept(fresh, cut, num_classes, head, input_size, frozen_units)


def _linear_probe(loaded: LoadedBackbone, cut: int, num_classes: int, head: str, input_size: int | None,
                  frozen_units: int | None) -> StrategyModel:
    model = truncate(loaded, cut, num_classes, head, input_size)
    _freeze([model.features])
    return StrategyModel(model, _groups(("head", model.head, 1.0)), frozen=[model.features], cut=cut)


def default_frozen_units(loaded: LoadedBackbone) -> int:
    """LWFT default: freeze the first stage (ResNet-50: the stem and layer1, 4 units)."""
    return next(c.index for c in loaded.spec.cuts if c.stage_end)


def _lwft(loaded: LoadedBackbone, cut: int, num_classes: int, head: str, input_size: int | None,
          frozen_units: int | None) -> StrategyModel:
    k = default_frozen_units(loaded) if frozen_units is None else frozen_units
    if not 0 <= k < cut:
        raise ConfigError(f"lwft: frozen_units must be in 0..{cut - 1} (units below the cut), got {k}")
    model = truncate(loaded, cut, num_classes, head, input_size)
    units = list(model.features.children())
    frozen, tuned = units[:k], units[k:]
    _freeze(frozen)
    groups = _groups(("tuned_units", tuned, 0.1), ("head", model.head, 1.0))
    return StrategyModel(model, groups, frozen=frozen, cut=cut)


def _channels_of(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    return convs[-1].out_channels


def _half_width_unit(unit: nn.Module, in_ch: int) -> nn.Module:
    """A randomly initialised copy of a residual block at half its width, taking ``in_ch`` inputs."""
    from torchvision.models import resnet as tv_resnet
    from torchvision.models.video import resnet as tv_video

    def downsample(conv, norm, out_ch, stride):
        if stride == 1 and in_ch == out_ch:
            return None
        return nn.Sequential(conv(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), norm(out_ch))

    if isinstance(unit, tv_resnet.Bottleneck):
        planes, stride = unit.conv1.out_channels // 2, unit.conv2.stride[0]
        return tv_resnet.Bottleneck(in_ch, planes, stride, downsample(nn.Conv2d, nn.BatchNorm2d, planes * 4, stride))
    if isinstance(unit, tv_resnet.BasicBlock):
        planes, stride = unit.conv1.out_channels // 2, unit.conv1.stride[0]
        return tv_resnet.BasicBlock(in_ch, planes, stride, downsample(nn.Conv2d, nn.BatchNorm2d, planes, stride))
    if isinstance(unit, tv_video.BasicBlock):
        planes, stride = unit.conv1[0].out_channels // 2, unit.conv1[0].stride[0]
        return tv_video.BasicBlock(in_ch, planes, tv_video.Conv3DSimple, stride,
                                   downsample(nn.Conv3d, nn.BatchNorm3d, planes, stride))
    if isinstance(unit, TinyBlock):
        dims = 3 if isinstance(unit.conv1, nn.Conv3d) else 2
        return TinyBlock(in_ch, max(1, unit.conv1.out_channels // 2), unit.conv1.stride[0], dims)
    raise ConfigError(f"transfusion cannot halve a {type(unit).__name__} unit")


def _transfusion(loaded: LoadedBackbone, cut: int, num_classes: int, head: str,
                 input_size: int | None, frozen_units: int | None = None) -> StrategyModel:
    spec = loaded.spec
    if spec.family not in TRANSFUSION_FAMILIES:
        supported = [n for n in backbone_names() if get_backbone(n).family in TRANSFUSION_FAMILIES]
        raise ConfigError(f"strategy 'transfusion' supports residual backbones: {choices(supported)}; got {spec.name}")
    kept = truncate(loaded, cut, num_classes, head, input_size)
    units = list(kept.features.named_children())
    in_ch = _channels_of(kept.features)
    for name, unit in unit_modules(loaded.units[cut:]).items():
        new = _half_width_unit(unit, in_ch)
        units.append((f"{name}_half", new))
        in_ch = _channels_of(new)
    features = nn.Sequential(OrderedDict(units))
    size = input_size or spec.default_input_size
    shape = feature_shape(features, input_shape(spec, size, loaded.in_channels))
    model = TruncatedModel(features, make_head(head, shape[0], tuple(shape[1:]), num_classes), spec.name, cut, kept.cut_name)
    return StrategyModel(model, _groups(("all", model, 1.0)), cut=cut)


# ---------------------------------------------------------------------------------------------
# The registry

Builder = Callable[[LoadedBackbone, int, int, str, "int | None", "int | None"], StrategyModel]


@dataclass(frozen=True)
class TransferStrategy:
    """A transfer strategy: how its model is built, and how reports show it."""

    name: str
    """Key in study files and trial parameters."""
    label: str
    """Name in tables and plots."""
    marker: str
    """matplotlib marker of its points in plots (baselines)."""
    build: Builder
    """(loaded backbone, cut, classes, head, input size, frozen units) -> model and parameter groups."""
    families: tuple[str, ...] | None = None
    """Backbone families it supports (None: every family)."""
    last_cut_only: bool = False
    """Whether it always keeps every unit (its cut is the backbone's last)."""

    def supports(self, family: str) -> bool:
        return self.families is None or family in self.families


STRATEGIES: dict[str, TransferStrategy] = {s.name: s for s in (
    TransferStrategy("ttl", "TruncatedTL", "o", _kept),
    TransferStrategy("full", "full fine-tuning", "D", _kept, last_cut_only=True),
    TransferStrategy("linear_probe", "linear probe", "X", _linear_probe),
    TransferStrategy("lwft", "layer-wise fine-tuning", "P", _lwft),
    TransferStrategy("transfusion", "TransFusion", "h", _transfusion, families=TRANSFUSION_FAMILIES),
    TransferStrategy("scratch", "from scratch", "v", _scratch),
    TransferStrategy("probe", "frozen probe (logistic regression)", "*", _linear_probe),
)}
"""Every transfer strategy by name; all but ``ttl`` and ``probe`` can be a study's baseline."""
PROBE_STRATEGY = "probe"
"""The strategy of the frozen probe's stored model (see :mod:`ttl_search.train.probe`)."""
BASELINES = tuple(name for name in STRATEGIES if name not in ("ttl", PROBE_STRATEGY))


def fresh_parameters(model: nn.Module) -> list[str]:
    """Names of parameters of units re-created by TransFusion (for reports and tests)."""
    return [n for n, _ in model.named_parameters() if "_half." in n]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
