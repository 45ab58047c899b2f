"""torchvision ResNet-18/34/50/101: cuts after the stem and after every residual block."""

from __future__ import annotations


from torch import nn

from .backbones import BackboneSpec, UnitList, register, torchvision_model, torchvision_weights


def _resnet_units(model: nn.Module) -> UnitList:
    units: UnitList = [("stem", 1, nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool))]
    for stage in range(1, 5):
        for i, block in enumerate(getattr(model, f"layer{stage}")):
            units.append((f"layer{stage}.{i}", stage, block))
    return units


def register_resnets() -> None:
    for depth in (18, 34, 50, 101):
        arch = f"resnet{depth}"
        register(
            BackboneSpec(
                name=arch,
                description=f"torchvision ResNet-{depth}; cuts after the stem and every residual block",
                dims=2,
                default_input_size=224,
                build=lambda a=arch: torchvision_model(a),
                units=_resnet_units,
                first_conv="conv1",
                head_prefixes=("fc.",),
                weights=torchvision_weights(arch),
                family="resnet",
            )
        )
