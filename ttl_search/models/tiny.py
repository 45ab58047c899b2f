"""Tiny random-weight test backbones (2D and 3D) for tests and debug studies."""

from __future__ import annotations


import torch
from torch import nn

from .backbones import BackboneSpec, UnitList, register


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


def register_tiny() -> None:
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
