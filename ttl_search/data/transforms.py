"""From a split to batches: resizing once, per-sample conversion, normalisation and augmentation,
seeded per epoch."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError, DataError
from .config import CROP_RATIO, Split, _is_int

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- transforms


@dataclass
class TransformConfig:
    """How images become model inputs."""

    input_size: int
    """Model input size (square / cubic); images are resized once to it (bilinear 2D,
    trilinear 3D)."""
    in_channels: int = 3
    """Channels the model expects; 1-channel images are replicated, RGB images averaged to 1."""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    """Normalisation mean, length 1 or ``in_channels``."""
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    """Normalisation standard deviation, length 1 or ``in_channels``."""
    augment: bool = True
    """Training augmentation: 2D RandomResizedCrop(input_size, crop_scale) + horizontal flip;
    3D random flips along each axis."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Area range of the random resized crop (2D)."""
    hflip: bool = True
    """Random flips: horizontal for 2D, along each axis for 3D."""

    def __post_init__(self) -> None:
        if not _is_int(self.input_size) or self.input_size < 1:
            raise ConfigError(f"transform.input_size must be a positive integer, got {self.input_size!r}")
        if not _is_int(self.in_channels) or self.in_channels < 1:
            raise ConfigError(f"transform.in_channels must be a positive integer, got {self.in_channels!r}")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.in_channels):
                raise ConfigError(
                    f"transform.{key} has {len(values)} values; needs 1 or in_channels "
                    f"({self.in_channels})"
                )
        if any(not v > 0 for v in self.std):
            raise ConfigError(f"transform.std values must be positive, got {self.std}")
        low, high = (float(v) for v in self.crop_scale)
        if not 0 < low <= high <= 1:
            raise ConfigError(f"transform.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        self.crop_scale = (low, high)


def _mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 steps)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state = z ^ (z >> 31)
    return state & 0x7FFFFFFFFFFFFFFF


def resize_images(images: torch.Tensor, size: int, dims: int) -> torch.Tensor:
    """Resize a ``uint8`` batch to ``size`` per spatial axis (bilinear+antialias 2D, trilinear 3D)."""
    if tuple(images.shape[2:]) == (size,) * dims:
        return images
    from torchvision.transforms.v2 import functional as TF

    n, c = images.shape[:2]
    out = torch.empty((n, c, *(size,) * dims), dtype=torch.uint8)
    step = max(1, (1 << 25) // max(1, c * size**dims))
    for start in range(0, n, step):
        chunk = images[start:start + step]
        if dims == 2:
            out[start:start + step] = TF.resize(chunk, [size, size], antialias=True)
        else:
            resized = F.interpolate(chunk.float(), size=(size,) * 3, mode="trilinear", align_corners=False)
            out[start:start + step] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _crop_params(
    height: int, width: int, scale: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's ``(top, left, h, w)``, drawn from ``generator``."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    return 0, 0, height, width


class TensorImageDataset(Dataset):
    """In-memory images resized once to the input size, transformed per sample.

    Images stay ``uint8`` (memory); ``__getitem__`` converts to float in [0, 1], augments
    (training), maps channels to ``in_channels`` and normalises. Augmentation draws from a
    generator seeded by ``(seed, epoch, index)``: the same seed gives the same samples in the
    same epoch, in any order. The training sampler of :func:`make_loader` advances ``epoch``
    (single-process loading).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        tcfg: TransformConfig,
        *,
        train: bool,
        dims: int,
        seed: int = 0,
    ) -> None:
        if dims not in (2, 3):
            raise ConfigError(f"dims must be 2 or 3, got {dims!r}")
        if images.dtype != torch.uint8 or images.ndim != dims + 2:
            raise DataError(
                f"images must be uint8 N x C x {'D x ' if dims == 3 else ''}H x W for {dims}D data, "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        channels = int(images.shape[1])
        mappable = channels in (1, tcfg.in_channels) or (channels == 3 and tcfg.in_channels == 1)
        if not mappable:
            raise ConfigError(
                f"cannot map {channels}-channel images to transform.in_channels={tcfg.in_channels}"
            )
        self.images = resize_images(images, tcfg.input_size, dims)
        """uint8 images at the input size."""
        self.labels = labels
        """int64 labels."""
        self._label_items = labels.tolist()
        self.tcfg = tcfg
        self.dims = dims
        self.augment = bool(train and tcfg.augment)
        """Whether ``__getitem__`` augments."""
        self.seed = int(seed)
        self.epoch = 0
        """Current epoch; part of the augmentation seed."""
        shape = (-1,) + (1,) * dims
        self._mean = torch.tensor(tcfg.mean, dtype=torch.float32).view(shape)
        self._std = torch.tensor(tcfg.std, dtype=torch.float32).view(shape)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds augmentation."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        x = self.images[index].float().div_(255)
        if self.augment:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, index))
            x = self._augment(x, generator)
        x = self._map_channels(x)
        x = (x - self._mean) / self._std
        label = self._label_items[index]
        return x, (torch.tensor(label, dtype=torch.int64) if isinstance(label, list) else label)

    def _map_channels(self, x: torch.Tensor) -> torch.Tensor:
        target = self.tcfg.in_channels
        if x.shape[0] == target:
            return x
        if x.shape[0] == 1:
            return x.expand(target, *x.shape[1:])
        return x.mean(dim=0, keepdim=True)

    def _augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        if self.dims == 2:
            size = self.tcfg.input_size
            top, left, h, w = _crop_params(x.shape[-2], x.shape[-1], self.tcfg.crop_scale, generator)
            x = TF.resized_crop(x, top, left, h, w, [size, size], antialias=True)
            if self.tcfg.hflip and torch.rand(1, generator=generator).item() < 0.5:
                x = TF.horizontal_flip(x)
            return x
        if self.tcfg.hflip:
            flips = torch.rand(3, generator=generator) < 0.5
            axes = [axis + 1 for axis in range(3) if flips[axis]]
            if axes:
                x = torch.flip(x, axes)
        return x


class EpochShuffleSampler(Sampler[int]):
    """Seeded shuffling that advances the dataset's epoch on each pass.

    Pass ``e`` (from 0) permutes with a generator seeded by ``(seed, e)`` and sets the
    dataset's epoch to ``e`` before the first sample is read.
    """

    def __init__(self, dataset: TensorImageDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0
        """The next pass's epoch."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        self.epoch += 1
        self.dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, 0x5EED))
        yield from torch.randperm(len(self.dataset), generator=generator).tolist()


def make_loader(
    split: Split, tcfg: TransformConfig, *, train: bool, batch_size: int, seed: int, dims: int
) -> DataLoader:
    """A single-process loader over ``split``.

    Training: seeded shuffle and (``tcfg.augment``) seeded augmentation, both reproducible
    from ``seed`` (same seed -> same batches, epoch by epoch). Evaluation: no augmentation, no
    shuffle. ``drop_last`` is false.
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    dataset = TensorImageDataset(split.images, split.labels, tcfg, train=train, dims=dims, seed=seed)
    sampler = EpochShuffleSampler(dataset, seed) if train else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=0, drop_last=False
    )
