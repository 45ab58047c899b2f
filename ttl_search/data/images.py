"""Decoding image files into arrays, and turning a table of (path, label, split, group) into splits."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError, choices
from .config import _GRAY_MODES, SPLITS, DataConfig, DatasetSplits, Split
from .dicom import is_dicom_path, read_dicom
from .nifti import intensity_description, is_nifti_path, read_volume
from .splits import _stratified_split

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- image decoding


def _to_uint8_gray(img: Any) -> Any:
    """A grayscale PIL image in mode ``L``; 16/32-bit integer images are scaled from 16 bits."""
    from PIL import Image

    if img.mode in ("1", "L", "LA"):
        return img.convert("L")
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.clip(arr, 0, 255)
    elif arr.max(initial=0) > 255:
        arr = np.clip(arr, 0, 65535) / 257.0
    return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")


def _decode_2d(path: Path, size: int, window: tuple[float, float] | None = None) -> np.ndarray:
    """Decode one 2D image, resize it to ``size x size`` (bilinear); ``(H, W)`` gray or ``(H, W, 3)``.

    DICOM files (:func:`~ttl_search.data.dicom.is_dicom_path`) are made 8-bit first (rescale,
    ``window`` or the file's VOI, MONOCHROME1 inverted: :mod:`ttl_search.data.dicom`).
    """
    from PIL import Image, UnidentifiedImageError

    if is_dicom_path(path):
        img = Image.fromarray(read_dicom(path, window))
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8).copy()
    try:
        with Image.open(path) as img:
            img.load()
            img = _to_uint8_gray(img) if img.mode in _GRAY_MODES else img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file not found") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image, corrupt or not an image ({exc})") from exc


def is_volume_path(path: Path) -> bool:
    """Whether the sample at ``path`` is a 3D volume (a NIfTI file, :mod:`.nifti`, or a folder of
    DICOM slices, :mod:`.dicom_series`), not a 2D image."""
    return is_nifti_path(path) or path.is_dir()


def _decode_sample(path: Path, cfg: DataConfig) -> np.ndarray:
    """Decode one sample of a folder or manifest as ``uint8`` at ``S = cfg.image_size``: ``(S, S)``
    grayscale or ``(S, S, 3)`` RGB for a 2D image, ``(S, S, S)`` for a 3D volume
    (:func:`is_volume_path`: NIfTI or a DICOM series folder, :func:`~ttl_search.data.nifti.read_volume`).

    The result depends only on the file and on ``cfg``'s decoding settings (``image_size``,
    ``window``; for volumes also ``intensity``, ``percentiles``, ``resample``), so it may be cached
    per file. Errors are one-line :class:`DataError` errors naming the file.
    """
    if is_volume_path(path):
        return read_volume(path, cfg)
    return _decode_2d(path, cfg.image_size, cfg.window_values())


def _check_kinds(paths: Sequence[Path], cfg: DataConfig, source: str) -> bool:
    """Whether ``paths`` are volumes (True) or 2D images (False), before decoding; a mix is refused,
    and so is ``data.grayscale: false`` (RGB) for volumes."""
    volumes = [is_volume_path(p) for p in paths]
    if volumes and all(volumes):
        if cfg.grayscale is False:
            raise ConfigError(f"data.grayscale: false asks for RGB, but {source} holds 3D volumes, which have "
                              "one channel; set data.grayscale to null or true")
        return True
    if any(volumes):
        image = next(p for p, v in zip(paths, volumes) if not v)
        volume = next(p for p, v in zip(paths, volumes) if v)
        raise DataError(f"{source}: mixes 2D images ({volumes.count(False)}, e.g. {image}) and 3D volumes "
                        f"({volumes.count(True)}, e.g. {volume}); a dataset is either 2D or 3D")
    return False


def _log_decoding(paths: Sequence[Path], cfg: DataConfig, source: str, volumes: bool) -> None:
    """Say what decoding ``paths`` (``volumes`` or 2D images) with ``cfg`` will do (how many DICOM
    files, which window; for volumes how they are resampled and windowed)."""
    size, window = cfg.image_size, cfg.window_values()
    if volumes:
        series = sum(p.is_dir() for p in paths)
        log.info("%s: %d volumes at %dx%dx%d (%s, reoriented to RAS+; resample: %s; intensity: %s)",
                 source, len(paths), size, size, size,
                 f"{series} DICOM series folders, {len(paths) - series} NIfTI" if series else "NIfTI",
                 cfg.resample, intensity_description(cfg))
        return
    log.info("%s: %d images at %dx%d", source, len(paths), size, size)
    dicoms = sum(is_dicom_path(p) for p in paths)
    if dicoms:
        log.info("%s: %d of %d images are DICOM; window: %s", source, dicoms, len(paths),
                 f"data.window center {window[0]:g}, width {window[1]:g}" if window else
                 "each file's VOI LUT or window center/width, else its min..max")
    elif window is not None:
        log.warning("%s: data.window is set but no image is DICOM; it is not used", source)
    unused = [f"data.{key}" for key, value, default in (("resample", cfg.resample, "plain"),
                                                       ("intensity", cfg.intensity, "auto")) if value != default]
    if unused:
        log.warning("%s: %s set but no image is a volume; not used", source, " and ".join(unused))


def _decode_images(paths: Sequence[Path], cfg: DataConfig, source: str, volumes: bool = False) -> torch.Tensor:
    """Decode ``paths`` once (threads, :func:`_decode_sample`) into an in-memory ``uint8`` tensor:
    ``N x C x S x S`` for 2D images (``C`` by ``cfg.grayscale``: 1 or 3; auto: 1 when every image
    is gray), ``N x 1 x S x S x S`` for ``volumes``."""
    start = time.monotonic()
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda p: _decode_sample(p, cfg), paths))
    gray = all(a.ndim == 2 for a in arrays) if cfg.grayscale is None else cfg.grayscale
    out = np.empty((len(arrays), *_sample_channels(arrays[0], gray, volumes).shape), dtype=np.uint8)
    for i, arr in enumerate(arrays):
        out[i] = _sample_channels(arr, gray, volumes)
    log.info("%s: decoded %d images (%s) in %.1f s", source, len(arrays),
             "grayscale" if out.shape[1] == 1 else "RGB", time.monotonic() - start)
    return torch.from_numpy(out)


_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def _sample_channels(arr: np.ndarray, gray: bool, volume: bool = False) -> np.ndarray:
    """One decoded sample (:func:`_decode_sample`) channel first: a ``volume`` ``(1, S, S, S)``; a
    2D image ``(1, S, S)`` when ``gray`` (RGB to luma) or ``(3, S, S)`` (gray to 3 equal channels)."""
    if volume or arr.ndim == 2 and gray:
        return arr[None]
    if gray:
        return np.rint(arr.astype(np.float32) @ _LUMA).clip(0, 255).astype(np.uint8)[None]
    return np.broadcast_to(arr[None], (3, *arr.shape)) if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _images_of(paths: Sequence[Path], cfg: DataConfig, source: str) -> tuple[Any, bool]:
    """The decoded images of ``paths`` and whether they are read from the data cache
    (``cfg.cache``, :mod:`.cache`) rather than held in memory."""
    volumes = _check_kinds(paths, cfg, source)
    if not cfg.cache:
        _log_decoding(paths, cfg, source, volumes)
        return _decode_images(paths, cfg, source, volumes), False
    from .cache import cached_images

    return cached_images(paths, cfg, source, lambda p: _decode_sample(p, cfg), volumes,
                         before_build=lambda: _log_decoding(paths, cfg, source, volumes)), True


def _task_for(num_classes: int) -> str:
    return "binary-class" if num_classes == 2 else "multi-class"


@dataclass
class _Table:
    """Samples of a folder or manifest before decoding."""

    paths: list[Path]
    """Image file of each sample."""
    labels: np.ndarray
    """int64 class index of each sample."""
    splits: np.ndarray | None
    """Split name of each sample, or None when the data has no own splits."""
    groups: np.ndarray | None
    """Group (patient) of each sample, or None."""
    class_names: list[str]
    """Class name of each class index."""


def _split_table(table: _Table, cfg: DataConfig, source: str) -> dict[str, np.ndarray]:
    """Indices of each split: the table's own, or a stratified (group-aware) seeded split."""
    if table.splits is None:
        fractions = (1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction)
        parts = _stratified_split(table.labels, fractions, cfg.seed, table.groups)
        log.info(
            "%s: no own splits; stratified%s split %.2g/%.2g/%.2g (seed %d)",
            source, " group" if table.groups is not None else "", *fractions, cfg.seed,
        )
        return dict(zip(SPLITS, parts))
    present = set(table.splits.tolist())
    if "train" not in present or "test" not in present:
        raise DataError(
            f"{source}: own splits need at least train and test, found {choices(sorted(present))}"
        )
    out = {name: np.flatnonzero(table.splits == name) for name in SPLITS}
    if "val" not in present:
        train = out["train"]
        groups = table.groups[train] if table.groups is not None else None
        keep, val = _stratified_split(
            table.labels[train], (1 - cfg.val_fraction, cfg.val_fraction), cfg.seed, groups
        )
        out["train"], out["val"] = train[keep], train[val]
        log.info("%s: no val split; carved %d samples out of train (val_fraction %.2g)",
                 source, len(val), cfg.val_fraction)
    if table.groups is not None:
        owners: dict[Any, set[str]] = {}
        for group, split in zip(table.groups.tolist(), table.splits.tolist()):
            owners.setdefault(group, set()).add(split)
        crossing = [g for g, s in owners.items() if len(s) > 1]
        if crossing:
            log.warning("%s: %d groups appear in several own splits (e.g. %r)",
                        source, len(crossing), crossing[0])
    return out


def _build_from_table(
    table: _Table, cfg: DataConfig, name: str, source: str, md5: str | None
) -> DatasetSplits:
    if not table.paths:
        raise DataError(f"{source}: no images found")
    indices = _split_table(table, cfg, source)
    images, mapped = _images_of(table.paths, cfg, source)
    whole = Split(images, torch.from_numpy(table.labels.astype(np.int64)), table.groups,
                  torch.arange(len(table.paths)) if mapped else None)
    parts = {split: whole.take(idx) for split, idx in indices.items()}
    return DatasetSplits(
        name=name,
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
        num_classes=len(table.class_names),
        class_names=table.class_names,
        dims=images.dim() - 2,
        channels=int(images.shape[1]),
        task=_task_for(len(table.class_names)),
        source=source,
        md5=md5,
    )
