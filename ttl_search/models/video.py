"""torchvision's 3D video ResNet ``r3d_18`` (Kinetics-400 weights): cuts after the stem and every block."""

from __future__ import annotations


from torch import nn

from .backbones import BackboneSpec, UnitList, register, torchvision_weights


def _r3d_units(model: nn.Module) -> UnitList:
    units: UnitList = [("stem", 1, model.stem)]
    for stage in range(1, 5):
        for i, block in enumerate(getattr(model, f"layer{stage}")):
            units.append((f"layer{stage}.{i}", stage, block))
    return units


def register_r3d() -> None:
    import torchvision

    weights = torchvision_weights("r3d_18")
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
