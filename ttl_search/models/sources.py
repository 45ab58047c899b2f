"""Backbones by name from a library or a user's package, with cuts from their graph.

A backbone name with a source prefix needs no registration:

- ``torchvision:<model>``: any torchvision classification model (2D) or video model (3D), e.g.
  ``torchvision:convnext_tiny``, ``torchvision:mobilenet_v3_small``, ``torchvision:r2plus1d_18``;
  named weights are torchvision's (``IMAGENET1K_V1``...).
- ``timm:<model>`` (optionally ``<model>.<tag>``): any timm model, e.g. ``timm:resnet26d``; named
  weights are timm's pretrained tags (downloaded from the Hugging Face Hub).
- ``module:<package.module>:<factory>``: a user's ``nn.Module`` returned by ``factory()``; weights
  from a file (or ``none``).

Cuts come from :func:`~ttl_search.models.graph.analyze_graph`. ``?cuts=a,b,c`` after any of them
gives the cuts by hand (module paths in forward order), e.g. for a model that cannot be traced.
The analysis runs once per process and name (it traces the model twice, propagates shapes on the
meta device, and needs no weights).
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from functools import lru_cache
from typing import Callable

from torch import nn

from ..errors import BackboneError, choices
from .backbones import (IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, CutPoint, WeightsOption, torchvision_weights)
from .graph import analyze_graph, bind_units

SOURCES = ("torchvision", "timm", "module")
"""Prefixes of backbone names that are not registered."""
OPTIONS = ("cuts", "size")
"""Keys after ``?`` in a backbone name (joined by ``&``): ``cuts=a,b,c`` gives the cuts by hand,
``size=N`` the input side the cuts are analysed at (and the default input size)."""
DEFAULT_SIZE_3D = 64
"""Input side of 3D models (cubic volumes, as MedMNIST 3D's 64) when nothing says otherwise."""
TRANSFORM_INPUT = ("googlenet", "inception_v3")
"""torchvision models whose pretrained weights expect inputs normalised with mean = std = 0.5
(their ``transform_input``, which the random-weight build leaves off, converts to it)."""


def parse_name(name: str) -> tuple[str, str, dict[str, str]]:
    """``source:target?cuts=a,b&size=64`` -> (source, target, options)."""
    text = str(name).strip()
    base, _, query = text.partition("?")
    source, sep, target = base.partition(":")
    if not sep or source not in SOURCES or not target.strip():
        raise BackboneError(f"backbone {name!r}: a backbone that is not registered is named <source>:<model>; "
                            f"valid sources: {choices(SOURCES)} (e.g. timm:resnet26d, torchvision:convnext_tiny, "
                            "module:my_package.nets:build)")
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in OPTIONS:
            raise BackboneError(f"backbone {name!r}: unknown option {item!r}; valid options: "
                                f"{choices(o + '=...' for o in OPTIONS)}")
        options[key.strip()] = value.strip()
    if "cuts" in options and not [p for p in options["cuts"].split(",") if p.strip()]:
        raise BackboneError(f"backbone {name!r}: cuts= lists no module path")
    if "size" in options and not (options["size"].isdigit() and int(options["size"]) > 0):
        raise BackboneError(f"backbone {name!r}: size= must be a positive integer, got {options['size']!r}")
    return source, target.strip(), options


@lru_cache(maxsize=None)
def external_backbone(name: str) -> BackboneSpec:
    """The spec of a ``source:model`` backbone (analysed once per process)."""
    source, target, options = parse_name(name)
    label = str(name).strip()
    make = {"torchvision": _torchvision, "timm": _timm, "module": _module}[source]
    fixed = int(options["size"]) if "size" in options else None
    build, size, weights, mean, std, description = make(target, label, fixed)
    size = fixed or size
    hand = [p.strip() for p in options["cuts"].split(",") if p.strip()] if "cuts" in options else None
    analysis = analyze_graph(build, label, size, hand)
    size = analysis.input_size
    cuts = tuple(CutPoint(i + 1, c.name, c.stage, c.stage_end) for i, c in enumerate(analysis.cuts))
    how = "cuts given by hand" if analysis.hand else "cuts from its graph"
    return BackboneSpec(
        name=label,
        description=f"{description}; {how}",
        dims=analysis.dims,
        default_input_size=size,
        build=build,
        units=lambda model, a=analysis: bind_units(a, model),
        first_conv=analysis.first_conv,
        head_prefixes=analysis.head_keys,
        weights=weights,
        mean=mean,
        std=std,
        family=source,
        cut_list=cuts,
        head_optional=True,
        analysis=analysis,
    )


def _close(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return f"; close names: {', '.join(close)}" if close else ""


def _quiet(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return factory()
    return build


def _torchvision(arch: str, label: str, fixed: int | None):
    import torchvision

    two_d = torchvision.models.list_models(module=torchvision.models)
    three_d = torchvision.models.list_models(module=torchvision.models.video)
    if arch not in two_d + three_d:
        raise BackboneError(f"{label}: torchvision has no classification or video model {arch!r}{_close(arch, two_d + three_d)} "
                            "(torchvision.models.list_models(module=torchvision.models) lists them)")
    weights = torchvision_weights(arch)
    size, mean, std = DEFAULT_SIZE_3D, IMAGENET_MEAN, IMAGENET_STD
    if arch in two_d:
        size = 224
        options = list(weights)
        if options:
            default = torchvision.models.get_model_weights(arch).DEFAULT
            size = int(getattr(default.transforms(), "crop_size", [224])[0])
            mean, std = options[0].mean, options[0].std
        if arch in TRANSFORM_INPUT:
            half = (0.5, 0.5, 0.5)
            from dataclasses import replace

            weights = tuple(replace(o, mean=half, std=half) for o in options)
            mean = std = half
    else:
        options = list(weights)
        if options:  # a video model's pooling may need its own frame size (S3D's 7 x 7 average pool)
            crop = getattr(torchvision.models.get_model_weights(arch)[options[0].name].transforms(), "crop_size", [size])
            size = int(crop[0])
            mean, std = options[0].mean, options[0].std
    kwargs = {"image_size": fixed} if fixed and arch.startswith("vit_") else {}  # a ViT's size is fixed when built
    build = _quiet(lambda: torchvision.models.get_model(arch, weights=None, **kwargs))
    return build, size, weights, tuple(mean), tuple(std), f"torchvision {arch}"


def _timm(name: str, label: str, fixed: int | None):
    import timm
    from timm.models import get_pretrained_cfg

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise BackboneError(f"{label}: timm has no model {arch!r}{_close(arch, timm.list_models())} "
                            "(timm.list_models() lists them)")
    tags = [p.partition(".")[2] for p in timm.list_pretrained(f"{arch}.*")]
    if tag and tag not in tags:
        raise BackboneError(f"{label}: timm has no pretrained tag {tag!r} for {arch}; valid tags: {choices(tags) or 'none'}")
    default = get_pretrained_cfg(name) or get_pretrained_cfg(arch)
    size = int(default.input_size[-1]) if default is not None else 224
    mean = tuple(default.mean) if default is not None else IMAGENET_MEAN
    std = tuple(default.std) if default is not None else IMAGENET_STD
    ordered = ([tag] if tag else []) + [t for t in tags if t != tag]
    # Transformers fix their input size when built: ?size=N builds them (and resamples named weights) for N.
    kwargs = {"img_size": fixed} if fixed and default is not None and default.fixed_input_size else {}
    weights = tuple(_timm_weights(arch, t, kwargs) for t in ordered)
    build = _quiet(lambda: timm.create_model(name, pretrained=False, **kwargs))
    return build, size, weights, mean, std, f"timm {name}"


def _timm_weights(arch: str, tag: str, kwargs: dict) -> WeightsOption:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(f"{arch}.{tag}")

    def state_dict():
        import timm

        return timm.create_model(f"{arch}.{tag}", pretrained=True, **kwargs).state_dict()

    return WeightsOption(name=tag, description=f"timm {arch}.{tag} (downloaded from the Hugging Face Hub and cached)",
                         mean=tuple(cfg.mean), std=tuple(cfg.std), state_dict=state_dict)


def _module(target: str, label: str, fixed: int | None):
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise BackboneError(f"{label}: a user's module is named module:<package.module>:<factory>, "
                            "e.g. module:my_package.nets:build")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackboneError(f"{label}: cannot import {module_name!r} ({exc}); install the package (every Ray worker "
                            "imports it too) or put it on PYTHONPATH") from exc
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise BackboneError(f"{label}: {module_name} has no {attr!r}; its callables: {choices(names)}")
    if not callable(factory):
        raise BackboneError(f"{label}: {module_name}.{attr} is not callable")

    def build() -> nn.Module:
        model = factory()
        if not isinstance(model, nn.Module):
            raise BackboneError(f"{label}: {module_name}.{attr}() returned {type(model).__name__}, not an nn.Module")
        return model

    return build, None, (), IMAGENET_MEAN, IMAGENET_STD, f"{module_name}.{attr}()"
