"""torchvision DenseNet-121/201: cuts after the stem, every dense block and transition (and, in the
``*_fine`` variants, after every dense layer)."""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from .backbones import BackboneSpec, UnitList, register, torchvision_model, torchvision_weights


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


def register_densenets() -> None:
    for depth in (121, 201):
        arch = f"densenet{depth}"
        weights = torchvision_weights(arch)
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
                    build=lambda a=arch: torchvision_model(a),
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
