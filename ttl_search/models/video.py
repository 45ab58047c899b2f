"""torchvision's 3D video ResNet ``r3d_18`` (Kinetics-400 weights): cuts after the stem and every block."""

from __future__ import annotations


from torch import nn

from .backbones import BackboneSpec, UnitList, register, torchvision_model, torchvision_weights


def _r3d_units(model: nn.Module) -> UnitList:
    units: UnitList = [("stem", 1, model.stem)]
    for stage in range(1, 5):
        for i, block in enumerate(getattr(model, f"layer{stage}")):
            units.append((f"layer{stage}.{i}", stage, block))
    return units


KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
"""The normalisation of torchvision's r3d_18 Kinetics-400 weights (its ``transforms()``), used
without weights too; written out so that registering does not import torchvision (a test checks
them against torchvision's)."""


def register_r3d() -> None:
    register(
        BackboneSpec(
            name="r3d_18",
            description="torchvision video ResNet r3d_18 for volumes; cuts after the stem and its 8 blocks",
            dims=3,
            default_input_size=64,
            build=lambda: torchvision_model("r3d_18"),
            units=_r3d_units,
            first_conv="stem.0",
            head_prefixes=("fc.",),
            weights=torchvision_weights("r3d_18"),
            mean=KINETICS_MEAN,
            std=KINETICS_STD,
            family="resnet3d",
        )
    )
