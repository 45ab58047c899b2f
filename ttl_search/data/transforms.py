"""From a split to batches: resizing once, then conversion, augmentation and normalisation of whole
batches on the trial's device, seeded per epoch and batch."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .config import CROP_RATIO, Split, _is_int

log = logging.getLogger(__name__)

STORES = ("device", "host")
"""Where a :class:`BatchLoader` keeps a split's images."""

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


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
               generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop's boxes for ``n`` samples at once: ``(n, 4)`` float ``(top, left, h, w)``.

    As torchvision draws them (area fraction from ``scale``, log-uniform aspect ratio within
    :data:`CROP_RATIO`, up to 10 tries), vectorised: each sample keeps its first box that fits, or
    the whole image when none does. Drawn on the CPU from ``generator``, so that a seed gives the
    same boxes on any device."""
    tries = 10
    area = height * width
    u = torch.rand((4, n, tries), generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = torch.exp(log_low + (log_high - log_low) * u[1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(u[2] * (height - h + 1)).clamp_(min=0)
    left = torch.floor(u[3] * (width - w + 1)).clamp_(min=0)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    boxes = torch.stack([t.gather(1, first)[:, 0] for t in (top, left, h, w)], dim=1)
    whole = torch.tensor([0.0, 0.0, float(height), float(width)], dtype=torch.float64)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, whole).float()


def augment_batch(x: torch.Tensor, tcfg: TransformConfig, dims: int, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of a float batch in [0, 1] on its own device, a different random draw
    per sample (parameters from ``generator``, on the CPU): 2D a random resized crop back to the
    input size (one ``grid_sample`` for the whole batch, bilinear) and a horizontal flip; 3D a
    flip along each axis."""
    n = x.shape[0]
    if dims == 2:
        height, width = x.shape[-2:]
        boxes = crop_boxes(n, height, width, tcfg.crop_scale, generator)
        flip = (torch.rand(n, generator=generator) < 0.5) if tcfg.hflip else torch.zeros(n, dtype=torch.bool)
        top, left, h, w = boxes.unbind(1)
        theta = torch.zeros((n, 2, 3))
        theta[:, 0, 0] = torch.where(flip, -w / width, w / width)
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2 * top + h) / height - 1
        size = tcfg.input_size
        grid = F.affine_grid(theta.to(x.device), [n, x.shape[1], size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if tcfg.hflip:
        flips = (torch.rand((3, n), generator=generator) < 0.5).to(x.device)
        for axis in range(3):
            x = torch.where(flips[axis].view(n, 1, 1, 1, 1), x.flip(axis + 2), x)
    return x


class BatchLoader:
    """Batches of one split, made whole batches at a time on the trial's device.

    The split's images are resized once to the input size and kept as ``uint8``: on ``device``
    (``store="device"``: a GPU holds them once per trial instead of copying every batch), or on the
    host (``store="host"``: pinned memory when ``device`` is a GPU, for splits too large for the
    trial's share of the card; each batch is gathered there and copied over). Images in the data
    cache (``rows`` of a :class:`~ttl_search.data.cache.CachedImages`) stay on disk and are read
    (and, when the cache holds another size, resized) a batch at a time, so the loader's memory
    does not grow with the split; for a GPU store they are copied over a chunk at a time. Each
    batch is then converted to float in [0, 1], augmented (training, :func:`augment_batch`), mapped
    to ``in_channels`` and normalised on ``device``. Training batches follow a seeded shuffle, and their
    augmentation draws from a generator seeded by ``(seed, epoch, batch)``: the same seed gives
    the same batches, epoch by epoch, on any device. Evaluation: no shuffle, no augmentation.
    Every pass advances the epoch (:meth:`set_epoch` sets it).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, tcfg: TransformConfig, *, train: bool,
                 batch_size: int, dims: int, seed: int = 0, device: torch.device | str = "cpu",
                 store: str = "device", rows: torch.Tensor | None = None) -> None:
        if store not in STORES:
            raise ConfigError(f"store must be one of {', '.join(STORES)}, got {store!r}")
        if dims not in (2, 3):
            raise ConfigError(f"dims must be 2 or 3, got {dims!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if images.dtype != torch.uint8 or images.ndim != dims + 2:
            raise DataError(
                f"images must be uint8 N x C x {'D x ' if dims == 3 else ''}H x W for {dims}D data, "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        samples = images.shape[0] if rows is None else rows.shape[0]
        if samples != labels.shape[0]:
            raise DataError(f"{samples} images but {labels.shape[0]} labels")
        channels = int(images.shape[1])
        mappable = channels in (1, tcfg.in_channels) or (channels == 3 and tcfg.in_channels == 1)
        if not mappable:
            raise ConfigError(
                f"cannot map {channels}-channel images to transform.in_channels={tcfg.in_channels}"
            )
        self.device = torch.device(device)
        self.store = store
        """Where the images are kept: ``device`` or ``host``."""
        home = self.device if store == "device" else torch.device("cpu")
        self._pinned = home.type == "cpu" and self.device.type == "cuda"
        self.rows: torch.Tensor | None = None
        """Rows of the cached ``images`` that are this split's samples (data cache), read a batch
        at a time; None: ``images`` holds the samples, resized, where ``store`` says."""
        self._resize = False
        """Whether each batch read from the cache is resized to the input size."""
        if rows is None:
            resized = resize_images(images, tcfg.input_size, dims)
            self.images = resized.pin_memory() if self._pinned else resized.to(home)
        elif home.type != "cpu":  # cached, but the split fits the trial's share of the card
            self.images = _copy_rows(images, rows, tcfg.input_size, dims, home)
        else:
            self.images, self.rows = images, rows.to(torch.int64)
            self._resize = tuple(images.shape[2:]) != (tcfg.input_size,) * dims
        """uint8 images at the input size, where ``store`` says (or the cache's)."""
        self.labels = labels.to(home)
        """int64 labels, beside the images."""
        self.tcfg = tcfg
        self.dims = dims
        self.train = bool(train)
        self.augment = bool(train and tcfg.augment)
        """Whether training batches are augmented."""
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        """The next pass's epoch: seeds its shuffle and augmentation."""
        shape = (1, -1) + (1,) * dims
        self._mean = torch.tensor(tcfg.mean, dtype=torch.float32, device=self.device).view(shape)
        self._std = torch.tensor(tcfg.std, dtype=torch.float32, device=self.device).view(shape)

    def __len__(self) -> int:
        return math.ceil(int(self.labels.shape[0]) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next pass."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        n = int(self.labels.shape[0])
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix_seed(self.seed, epoch, 0x5EED)))
            order = order.to(self.labels.device)
        for batch, start in enumerate(range(0, n, self.batch_size)):
            if self.train:
                index = order[start:start + self.batch_size]
                x, y = self._gather(index), self.labels.index_select(0, index)
            elif self.rows is not None:
                index = torch.arange(start, min(n, start + self.batch_size))
                x, y = self._gather(index), self.labels[start:start + self.batch_size]
            else:
                x, y = self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield self.transform(x, torch.Generator().manual_seed(_mix_seed(self.seed, epoch, batch))), y

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """The images of samples ``index``; gathered into pinned memory when they are copied to a
        GPU per batch (an asynchronous copy needs a pinned source); read from the cache (and
        resized to the input size) when cached."""
        if self.rows is not None:
            rows = self.rows.index_select(0, index)
            if self._resize:
                batch = resize_images(self.images.read(rows), self.tcfg.input_size, self.dims)
                return batch.pin_memory() if self._pinned else batch
            if not self._pinned:
                return self.images.read(rows)
            out = torch.empty((len(rows), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=True)
            return self.images.read(rows, out=out)
        if not self._pinned:
            return self.images.index_select(0, index)
        out = torch.empty((len(index), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=True)
        return torch.index_select(self.images, 0, index, out=out)

    def transform(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A ``uint8`` batch as model input: float, augmented (training, from ``generator``),
        channels mapped, normalised."""
        x = images.float().div_(255)
        if self.augment and generator is not None:
            x = augment_batch(x, self.tcfg, self.dims, generator)
        target = self.tcfg.in_channels
        if x.shape[1] != target:
            x = x.expand(-1, target, *x.shape[2:]) if x.shape[1] == 1 else x.mean(dim=1, keepdim=True)
        return (x - self._mean) / self._std


def _copy_rows(images: Any, rows: torch.Tensor, size: int, dims: int, home: torch.device) -> torch.Tensor:
    """The ``rows`` of cached ``images`` (:class:`~ttl_search.data.cache.CachedImages`) resized to
    ``size`` and copied to ``home`` (a GPU), a chunk at a time (the host never holds the whole
    split)."""
    out = torch.empty((len(rows), images.shape[1], *(size,) * dims), dtype=torch.uint8, device=home)
    step = max(1, (1 << 27) // max(1, math.prod(images.shape[1:])))
    for start in range(0, len(rows), step):
        chunk = images.read(rows[start:start + step])
        out[start:start + step] = resize_images(chunk, size, dims).to(home)
    return out


def make_loader(
    split: Split, tcfg: TransformConfig, *, train: bool, batch_size: int, seed: int, dims: int,
    device: torch.device | str = "cpu", store: str = "device",
) -> BatchLoader:
    """The batches of ``split`` on ``device`` (see :class:`BatchLoader`).

    Training: seeded shuffle and (``tcfg.augment``) seeded augmentation, both reproducible
    from ``seed`` (same seed -> same batches, epoch by epoch). Evaluation: no augmentation, no
    shuffle. The last batch may be smaller. ``store``: where the images are kept (``device``, or
    ``host`` with a copy per batch).
    """
    return BatchLoader(split.images, split.labels, tcfg, train=train, batch_size=batch_size, dims=dims, seed=seed,
                       device=device, store=store, rows=split.rows)
