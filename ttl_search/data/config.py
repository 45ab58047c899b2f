"""Data settings (:class:`DataConfig`), the constants of every source, and what loading returns
(:class:`Split`, :class:`DatasetSplits`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError, choices

log = logging.getLogger(__name__)

FOLDER = "folder"
CSV = "csv"
SPLITS = ("train", "val", "test")
SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing"),
}
"""Folder names (case-insensitive) an ImageFolder tree may give each split."""
NPZ_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
DATA_ENV = "TTL_SEARCH_DATA"
DEFAULT_DATA_ROOT = "~/.ttl-search/data"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DICOM_EXTENSIONS = (".dcm", ".dicom")
"""File suffixes read as DICOM (a file without a suffix is DICOM when it has the ``DICM`` preamble)."""
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
"""File name endings (any case) read as NIfTI volumes (:mod:`.nifti`)."""
RESAMPLE_MODES = ("plain", "spacing")
"""``data.resample``: how a volume becomes ``image_size`` cubed (:mod:`.nifti`)."""
INTENSITY_MODES = ("auto", "minmax", "percentile")
"""``data.intensity``: how a volume's values become 0..255 when ``data.window`` is not set."""
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (50.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
"""Named CT windows, ``(center, width)`` in Hounsfield units (the usual radiology values)."""
MANIFEST_REQUIRED = ("path", "label")
MANIFEST_OPTIONAL = ("split", "group")
MULTI_LABEL = "multi-label, binary-class"
DOWNLOAD_TIMEOUT_S = 60.0
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
"""Aspect-ratio range of the random resized crop (torchvision's default)."""

_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

# --------------------------------------------------------------------------- configuration


@dataclass
class DataConfig:
    """Where a trial's data comes from and how it is split and subsampled."""

    dataset: str = "breastmnist"
    """A MedMNIST name (``medmnist.INFO``: ``pathmnist`` ... ``synapsemnist3d``), ``folder``
    (ImageFolder tree at ``path``) or ``csv`` (manifest at ``path``)."""
    size: int = 28
    """MedMNIST image size: 28/64/128/224 for 2D sets, 28/64 for 3D sets."""
    path: str | None = None
    """Explicit MedMNIST ``.npz`` file, ImageFolder root or CSV manifest."""
    root: str | None = None
    """Folder of MedMNIST files; default: env ``TTL_SEARCH_DATA``, else ``~/.ttl-search/data``."""
    download: bool = True
    """Download a MedMNIST file missing from ``root`` from its official url (md5 verified)."""
    verify_md5: bool = True
    """Verify the official md5 of MedMNIST files, local ones included."""
    train_fraction: float = 1.0
    """Stratified, seeded subsample of the training split (0 < f <= 1; >= 1 sample per class)."""
    val_fraction: float = 0.1
    """Share of the validation split, only for data without its own splits."""
    test_fraction: float = 0.2
    """Share of the test split, only for data without its own splits."""
    seed: int = 0
    """Seed of the splits, the cross-validation folds and the ``train_fraction`` subsample."""
    folds: int = 1
    """k-fold cross-validation when > 1: train and validation are pooled and split into ``folds``
    stratified, seeded folds; fold ``fold`` validates and the others train (the test split is left
    alone). Set by the study's ``selection.folds``."""
    fold: int = 0
    """The validating fold (0-based) when ``folds`` > 1; the search sets it per trial."""
    image_size: int = 64
    """folder/csv only: images are decoded once and resized to this square size."""
    grayscale: bool | None = None
    """folder/csv only: 1 channel (True), RGB (False), or auto (None: 1 channel when every
    image is a grayscale mode such as ``L`` or ``I``)."""
    window: str | list[float] | None = None
    """folder/csv DICOM files and volumes only: the intensity window that maps a grayscale image to 0..255,
    applied after the file's rescale slope/intercept (so in Hounsfield units for CT):
    ``[center, width]`` (``center - width/2`` becomes 0 and ``center + width/2`` becomes 255;
    values outside are clipped, as a window means) or a named CT preset (``lung``,
    ``mediastinum``, ``abdomen``, ``bone``, ``brain``). None: the file's own VOI LUT or window
    centre/width, and for a file without one its own min..max (nothing clipped). Volumes take it
    too (NIfTI values after the header's scl_slope/scl_inter, DICOM series after the slices'
    rescale: Hounsfield units for CT); it wins over ``intensity``, which must then stay ``auto``."""
    resample: str = "plain"
    """folder/csv volumes only (NIfTI files, DICOM series folders): how a volume (reoriented to
    RAS+) becomes ``image_size`` cubed.
    ``plain``: trilinear resize of the voxel grid, ignoring the voxel spacing (a volume already at
    that size is taken as it is, voxel for voxel). ``spacing``: spacing-aware: with ``L`` the
    longest physical extent (voxels x spacing, mm) of the three axes, each axis is resized
    trilinearly to ``round(image_size * extent / L)`` voxels and the volume is padded, centred, with
    0 (after the intensity mapping) to ``image_size`` cubed: a voxel of the result is a cube of
    ``L / image_size`` mm and the anatomy keeps its proportions."""
    intensity: str = "auto"
    """folder/csv volumes only, when ``window`` is not set: how a volume's values become 0..255.
    ``auto``: a file stored as uint8 without scaling keeps its own values, any other its own
    min..max. ``minmax``: the volume's min..max, always. ``percentile``: the volume's values at
    ``percentiles`` become 0 and 255, values outside are clipped (robust to outliers, e.g. MR)."""
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    """``[low, high]`` percentiles (0..100, low < high) of ``intensity: percentile``."""
    cache: bool = True
    """folder/csv only: decode every image (or volume) once into the on-disk data cache
    (:mod:`.cache`: a ``uint8`` array per (files, settings) under ``cache_dir``) that trials read
    a batch at a time: a trial's memory stays flat in the dataset's size
    and concurrent trials on a node share the page cache. False: decode into each process's
    memory (as MedMNIST files always are)."""
    cache_dir: str | None = None
    """Folder of the data cache; default: env ``TTL_SEARCH_CACHE``, else ``~/.ttl-search/cache``
    (resolved on each node: a folder every node reaches is built once for the cluster)."""

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ConfigError(f"data.dataset must be a non-empty name, got {self.dataset!r}")
        self.dataset = self.dataset.strip().lower()
        if self.dataset not in (FOLDER, CSV):
            from .medmnist import (
                medmnist_entry,  # (medmnist reads this module's constants)
            )

            medmnist_entry(self.dataset, self.size)  # validates name and size
        elif not self.path:
            raise ConfigError(f"data.path is required for data.dataset={self.dataset!r}")
        _check_fraction("data.train_fraction", self.train_fraction, low_open=True, high_open=False)
        _check_fraction("data.val_fraction", self.val_fraction, low_open=True, high_open=True)
        _check_fraction("data.test_fraction", self.test_fraction, low_open=True, high_open=True)
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                "data.val_fraction + data.test_fraction must be below 1, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        if not _is_int(self.seed):
            raise ConfigError(f"data.seed must be an integer, got {self.seed!r}")
        if not _is_int(self.folds) or self.folds < 1:
            raise ConfigError(f"data.folds must be a positive integer (1: no cross-validation), got {self.folds!r}")
        if not _is_int(self.fold) or not 0 <= self.fold < self.folds:
            raise ConfigError(f"data.fold must be an integer in 0..{self.folds - 1}, got {self.fold!r}")
        if not _is_int(self.image_size) or self.image_size < 1:
            raise ConfigError(f"data.image_size must be a positive integer, got {self.image_size!r}")
        if self.cache not in (True, False):
            raise ConfigError(f"data.cache must be true or false, got {self.cache!r}")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir.strip()):
            raise ConfigError(f"data.cache_dir must be a folder path or null, got {self.cache_dir!r}")
        if self.grayscale not in (None, True, False):
            raise ConfigError(f"data.grayscale must be true, false or null, got {self.grayscale!r}")
        if self.window is not None:
            if self.dataset not in (FOLDER, CSV):
                raise ConfigError(f"data.window applies to DICOM files of data.dataset={FOLDER} or {CSV}, "
                                  f"not to {self.dataset!r}; remove it")
            self.window = _check_window(self.window)
        self.resample = _check_choice("data.resample", self.resample, RESAMPLE_MODES)
        self.intensity = _check_choice("data.intensity", self.intensity, INTENSITY_MODES)
        self.percentiles = _check_percentiles(self.percentiles)
        if self.dataset not in (FOLDER, CSV):
            for key, value, default in (("resample", self.resample, "plain"),
                                        ("intensity", self.intensity, "auto")):
                if value != default:
                    raise ConfigError(f"data.{key} applies to volumes of data.dataset={FOLDER} or {CSV}, "
                                      f"not to {self.dataset!r}; remove it")
        if self.window is not None and self.intensity != "auto":
            raise ConfigError(f"data.window and data.intensity={self.intensity!r} both set how volumes become "
                              "0..255; keep one (data.intensity: auto with a window)")

    def window_values(self) -> tuple[float, float] | None:
        """``(center, width)`` of :attr:`window` (a preset resolved), or None."""
        if self.window is None:
            return None
        if isinstance(self.window, str):
            return WINDOW_PRESETS[self.window]
        center, width = self.window
        return float(center), float(width)


def _check_window(value: object) -> str | list[float]:
    """``data.window`` normalised: a preset name in lower case, or ``[center, width]`` floats."""
    valid = f"valid: [center, width] with width > 0, or a preset: {choices(WINDOW_PRESETS)}"
    if isinstance(value, str):
        name = value.strip().lower()
        if name not in WINDOW_PRESETS:
            raise ConfigError(f"data.window: unknown preset {value!r}; {valid}")
        return name
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
        for v in value
    ):
        center, width = (float(v) for v in value)
        if width > 0:
            return [center, width]
    raise ConfigError(f"data.window must be [center, width] or a preset name, got {value!r}; {valid}")


def _check_choice(key: str, value: object, valid: tuple[str, ...]) -> str:
    """``value`` in lower case when it is one of ``valid``."""
    name = value.strip().lower() if isinstance(value, str) else None
    if name not in valid:
        raise ConfigError(f"{key} must be one of {choices(valid)}, got {value!r}")
    return name


def _check_percentiles(value: object) -> list[float]:
    """``data.percentiles`` as ``[low, high]`` floats with 0 <= low < high <= 100."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
        for v in value
    ):
        low, high = (float(v) for v in value)
        if 0 <= low < high <= 100:
            return [low, high]
    raise ConfigError(f"data.percentiles must be [low, high] with 0 <= low < high <= 100, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_fraction(key: str, value: object, *, low_open: bool, high_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"{key} must be in {interval}, got {value!r}")

# --------------------------------------------------------------------------- results


@dataclass
class Split:
    """Images and labels of one split, held in memory."""

    images: torch.Tensor
    """``uint8``, ``N x C x H x W`` (2D) or ``N x C x D x H x W`` (3D)."""
    labels: torch.Tensor
    """``int64``, shape ``(N,)``; ``(N, L)`` of 0/1 for multi-label data."""
    groups: np.ndarray | None = None
    """Group (e.g. patient) of each sample when the data names them (CSV ``group``), else None;
    cross-validation folds keep a group together."""
    rows: torch.Tensor | None = None
    """For images in the data cache (:mod:`.cache`): ``images`` is the whole cached table (a
    :class:`~ttl_search.data.cache.CachedImages` on disk) and sample ``i`` is its row ``rows[i]``
    (``int64``), read a batch at a time; None: ``images`` holds exactly this split's samples in
    memory. :meth:`pixels` gives the samples either way."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def pixels(self) -> torch.Tensor:
        """This split's images as one in-memory tensor (read from the cache when mapped)."""
        return self.images if self.rows is None else self.images.read(self.rows)

    def take(self, indices: np.ndarray | torch.Tensor) -> Split:
        """The samples at ``indices``; a mapped split stays mapped (only its rows are selected)."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        groups = self.groups[index.numpy()] if self.groups is not None else None
        if self.rows is not None:
            return Split(self.images, self.labels[index], groups, self.rows[index])
        return Split(self.images[index], self.labels[index], groups)

    def join(self, other: Split) -> Split:
        """This split's samples followed by ``other``'s (both mapped from the same cache entry:
        still mapped; else in memory)."""
        groups = (np.concatenate([self.groups, other.groups])
                  if self.groups is not None and other.groups is not None else None)
        labels = torch.cat([self.labels, other.labels])
        if self.rows is not None and other.rows is not None and self.images is other.images:
            return Split(self.images, labels, groups, torch.cat([self.rows, other.rows]))
        return Split(torch.cat([self.pixels(), other.pixels()]), labels, groups)


@dataclass
class DatasetSplits:
    """The three splits of a dataset with what a trial needs to know about it."""

    name: str
    """MedMNIST name, or the folder / manifest name for ``folder`` / ``csv`` data."""
    train: Split
    """Training split (after ``train_fraction``)."""
    val: Split
    """Validation split."""
    test: Split
    """Test split."""
    num_classes: int
    """Number of classes (number of labels for multi-label data)."""
    class_names: list[str]
    """Name of class ``i`` at index ``i``."""
    dims: int
    """Spatial dimensions: 2 or 3."""
    channels: int
    """Image channels as stored: 1 or 3."""
    task: str
    """``binary-class``, ``multi-class``, ``multi-label, binary-class`` or
    ``ordinal-regression`` (MedMNIST's task names)."""
    source: str
    """The file or folder read."""
    md5: str | None
    """md5 of the MedMNIST file or CSV manifest read; None when not computed (folder data,
    or ``verify_md5=False``)."""

    def summary(self) -> str:
        """One line for logs: name, split sizes, classes, shape."""
        shape = "x".join(str(s) for s in self.train.images.shape[1:])
        return (
            f"{self.name}: train/val/test {len(self.train)}/{len(self.val)}/{len(self.test)}, "
            f"{self.num_classes} classes ({self.task}), {self.dims}D {shape}, from {self.source}"
        )
