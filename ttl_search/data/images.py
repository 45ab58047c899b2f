"""Decoding image files into arrays, and turning a table of (path, label, split, group) into splits."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DataError, choices
from .config import DataConfig, DatasetSplits, SPLITS, Split, _GRAY_MODES
from .dicom import is_dicom_path, read_dicom
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


def _decode_image(path: Path, size: int, window: tuple[float, float] | None = None) -> np.ndarray:
    """Decode one image, resize it to ``size x size`` (bilinear); ``(H, W)`` gray or ``(H, W, 3)``.

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


def _decode_images(
    paths: Sequence[Path], size: int, grayscale: bool | None, source: str,
    window: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Decode ``paths`` once (threads) into a ``uint8`` ``N x C x size x size`` tensor; ``window``
    is the study's DICOM window (``data.window``)."""
    start = time.monotonic()
    log.info("%s: decoding %d images at %dx%d", source, len(paths), size, size)
    dicoms = sum(is_dicom_path(p) for p in paths)
    if dicoms:
        log.info("%s: %d of %d images are DICOM; window: %s", source, dicoms, len(paths),
                 f"data.window center {window[0]:g}, width {window[1]:g}" if window else
                 "each file's VOI LUT or window center/width, else its min..max")
    elif window is not None:
        log.warning("%s: data.window is set but no image is DICOM; it is not used", source)
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda p: _decode_image(p, size, window), paths))
    all_gray = all(a.ndim == 2 for a in arrays)
    gray = all_gray if grayscale is None else grayscale
    out = np.empty((len(arrays), 1 if gray else 3, size, size), dtype=np.uint8)
    luma = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    for i, arr in enumerate(arrays):
        if gray:
            out[i, 0] = arr if arr.ndim == 2 else np.rint(arr.astype(np.float32) @ luma).clip(0, 255)
        else:
            out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    log.info(
        "%s: decoded %d images (%s) in %.1f s",
        source, len(arrays), "grayscale" if gray else "RGB", time.monotonic() - start,
    )
    return torch.from_numpy(out)


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
    images = _decode_images(table.paths, cfg.image_size, cfg.grayscale, source, cfg.window_values())
    labels = torch.from_numpy(table.labels.astype(np.int64))
    parts = {
        split: Split(images[torch.from_numpy(idx)], labels[torch.from_numpy(idx)],
                     table.groups[idx] if table.groups is not None else None)
        for split, idx in indices.items()
    }
    return DatasetSplits(
        name=name,
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
        num_classes=len(table.class_names),
        class_names=table.class_names,
        dims=2,
        channels=int(images.shape[1]),
        task=_task_for(len(table.class_names)),
        source=source,
        md5=md5,
    )
