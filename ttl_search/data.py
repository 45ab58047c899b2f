"""Data loading for trials: MedMNIST files, ImageFolder trees and CSV manifests.

:func:`load_data` turns a :class:`DataConfig` into :class:`DatasetSplits`: train, validation and
test images held in memory as ``uint8`` tensors (decoded once), channel first, with ``int64``
labels. :func:`make_loader` wraps one :class:`Split` in a :class:`TensorImageDataset` that
resizes the images once to the model's input size and, per sample, converts to float, maps
channels, normalises and (for training) augments.

Sources:

* MedMNIST (``dataset`` = an official name such as ``breastmnist`` or ``adrenalmnist3d``): the
  official ``.npz`` file, read from ``path``, or from ``root`` under MedMNIST's file name
  (``breastmnist.npz`` for size 28, ``breastmnist_64.npz`` for 64, ...), downloaded there from
  the official (zenodo) url when absent. The official md5 is verified, also for local files.
  MedMNIST files carry their own train/val/test splits.
* ``folder``: an ImageFolder tree, ``path/{train,val,test}/<class>/<image>`` (own splits;
  ``val`` may be missing, then it is carved out of ``train``) or ``path/<class>/<image>``
  (stratified, seeded split).
* ``csv``: a manifest with columns ``path,label`` and optional ``split`` (train/val/test) and
  ``group`` (e.g. patient id; a group is never spread over several splits when this module
  splits). Relative paths resolve against the manifest's folder.

Every error a user can cause is a :class:`~ttl_search.errors.DataError` (data) or
:class:`~ttl_search.errors.ConfigError` (configuration value); messages name the file (or the
configuration key) and the problem.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import ConfigError, DataError, choices

log = logging.getLogger(__name__)

FOLDER = "folder"
CSV = "csv"
SPLITS = ("train", "val", "test")
NPZ_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
DATA_ENV = "TTL_SEARCH_DATA"
DEFAULT_DATA_ROOT = "~/.ttl-search/data"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
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
    """Seed of the splits and of the ``train_fraction`` subsample."""
    image_size: int = 64
    """folder/csv only: images are decoded once and resized to this square size."""
    grayscale: bool | None = None
    """folder/csv only: 1 channel (True), RGB (False), or auto (None: 1 channel when every
    image is a grayscale mode such as ``L`` or ``I``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ConfigError(f"data.dataset must be a non-empty name, got {self.dataset!r}")
        self.dataset = self.dataset.strip().lower()
        if self.dataset not in (FOLDER, CSV):
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
        if not _is_int(self.image_size) or self.image_size < 1:
            raise ConfigError(f"data.image_size must be a positive integer, got {self.image_size!r}")
        if self.grayscale not in (None, True, False):
            raise ConfigError(f"data.grayscale must be true, false or null, got {self.grayscale!r}")


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

    def __len__(self) -> int:
        return int(self.labels.shape[0])


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


# --------------------------------------------------------------------------- MedMNIST metadata


@dataclass(frozen=True)
class MedMNISTFile:
    """Official file of one MedMNIST dataset at one size."""

    name: str
    """Dataset name (``breastmnist``)."""
    size: int
    """Image size (28, 64, 128 or 224)."""
    filename: str
    """File name as MedMNIST names it (``breastmnist.npz``, ``breastmnist_64.npz``)."""
    url: str
    """Official download url."""
    md5: str
    """Official md5 of the file."""
    info: Mapping[str, Any]
    """The dataset's entry in ``medmnist.INFO``."""


@lru_cache(maxsize=1)
def _medmnist_info() -> Mapping[str, Mapping[str, Any]]:
    try:
        from medmnist.info import INFO
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "MedMNIST datasets need the medmnist package for their metadata "
            f"(pip install --no-deps medmnist==3.0.2): {exc}"
        ) from exc
    return INFO


def medmnist_names() -> list[str]:
    """The official MedMNIST dataset names (2D and 3D)."""
    return list(_medmnist_info())


def medmnist_sizes(name: str) -> list[int]:
    """The image sizes MedMNIST publishes for ``name`` (ConfigError for an unknown name)."""
    info = _medmnist_dataset_info(name)
    return sorted(28 if key == "url" else int(key[4:]) for key in info if key.startswith("url"))


def _medmnist_dataset_info(name: str) -> Mapping[str, Any]:
    info = _medmnist_info()
    if name not in info:
        raise ConfigError(
            f"data.dataset: unknown dataset {name!r}; valid: {choices([*info, FOLDER, CSV])}"
        )
    return info[name]


def medmnist_entry(name: str, size: int) -> MedMNISTFile:
    """The official file of MedMNIST dataset ``name`` at ``size``.

    Raises :class:`ConfigError` for an unknown name (listing the valid names) or a size the
    dataset is not published at (listing its sizes).
    """
    info = _medmnist_dataset_info(name)
    sizes = medmnist_sizes(name)
    if not _is_int(size) or size not in sizes:
        raise ConfigError(
            f"data.size: {name} is not published at size {size!r}; valid sizes: {choices(sizes)}"
        )
    suffix = "" if size == 28 else f"_{size}"
    return MedMNISTFile(
        name=name,
        size=int(size),
        filename=f"{name}{suffix}.npz",
        url=str(info[f"url{suffix}"]),
        md5=str(info[f"MD5{suffix}"]),
        info=info,
    )


def medmnist_filename(name: str, size: int) -> str:
    """MedMNIST's file name of ``name`` at ``size``: ``breastmnist.npz``, ``breastmnist_64.npz``."""
    return medmnist_entry(name, size).filename


def default_data_root() -> Path:
    """Env ``TTL_SEARCH_DATA`` if set, else ``~/.ttl-search/data``."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT).expanduser()


def _is_3d(info: Mapping[str, Any]) -> bool:
    return str(info.get("python_class", "")).endswith("3D")


# --------------------------------------------------------------------------- md5 and download

_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def dataset_md5(path: str | os.PathLike[str]) -> str:
    """md5 hex digest of a file (cached per process by path, size and mtime)."""
    p = Path(path)
    try:
        stat = p.stat()
        key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in _MD5_CACHE:
            return _MD5_CACHE[key]
        digest = hashlib.md5()
        with p.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"{p}: cannot read file to compute its md5 ({exc.strerror or exc})") from exc
    _MD5_CACHE[key] = digest.hexdigest()
    return _MD5_CACHE[key]


def _verify_md5(path: Path, entry: MedMNISTFile) -> str:
    actual = dataset_md5(path)
    if actual != entry.md5:
        raise DataError(
            f"{path}: md5 mismatch for {entry.filename}: expected {entry.md5} (official), "
            f"actual {actual}; the file is corrupt or another version (set "
            "data.verify_md5=false to accept it anyway)"
        )
    return actual


def _open_url(url: str, timeout: float) -> Any:
    """Open ``url`` for reading (a seam for tests)."""
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - official https url


def _download(entry: MedMNISTFile, dest: Path) -> None:
    """Download ``entry`` to ``dest`` atomically, verifying the official md5 on the way."""
    hint = f"download {entry.url} by hand and put it at {dest} (or set data.path to the file)"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as exc:
        raise DataError(f"{dest}: cannot create the data folder ({exc.strerror or exc}); {hint}") from exc
    tmp = Path(tmp_name)
    log.info("downloading %s from %s", dest, entry.url)
    start = time.monotonic()
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, _open_url(entry.url, DOWNLOAD_TIMEOUT_S) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if actual != entry.md5:
            raise DataError(
                f"{dest}: md5 mismatch after downloading {entry.url}: expected {entry.md5}, "
                f"actual {actual}; try again or {hint}"
            )
        os.replace(tmp, dest)
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"{dest}: not found locally and the download failed ({reason}); {hint}") from exc
    log.info("downloaded %s (%d bytes) in %.1f s", dest, dest.stat().st_size, time.monotonic() - start)


def _locate_medmnist(cfg: DataConfig, entry: MedMNISTFile) -> Path:
    """The local file to read for ``entry``, downloading it into the root when allowed."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if path.is_dir():
            raise DataError(
                f"{path}: is a folder; data.path must be the {entry.filename} file "
                "(use data.root for a folder of MedMNIST files)"
            )
        if not path.is_file():
            raise DataError(
                f"{path}: file not found (data.path); get {entry.filename} from {entry.url}"
            )
        return path
    root = Path(cfg.root).expanduser() if cfg.root else default_data_root()
    path = root / entry.filename
    if path.is_file():
        return path
    if not cfg.download:
        raise DataError(
            f"{path}: file not found and data.download is false; download {entry.url} "
            f"(md5 {entry.md5}) and put it at {path}, or set data.path to the file"
        )
    _download(entry, path)
    return path


# --------------------------------------------------------------------------- npz reading


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The six MedMNIST arrays of an ``.npz`` file."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not an .npz archive but a single .npy array")
        with loaded as npz:
            present = set(npz.files)
            missing = [key for key in NPZ_KEYS if key not in present]
            if missing:
                raise DataError(
                    f"{path}: missing keys {choices(missing)} (present: "
                    f"{choices(sorted(present)) or 'none'}); a MedMNIST file has {choices(NPZ_KEYS)}"
                )
            return {key: npz[key] for key in NPZ_KEYS}
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as exc:
        raise DataError(f"{path}: not a readable .npz file, corrupt or truncated ({exc})") from exc


def _images_channel_first(
    array: np.ndarray, *, dims: int, channels: int, path: Path, key: str
) -> torch.Tensor:
    """``(N,H,W)``/``(N,H,W,C)`` (2D) or ``(N,D,H,W)`` (3D) uint8 -> channel-first tensor."""
    if array.dtype != np.uint8:
        raise DataError(f"{path}: {key} must be uint8, got {array.dtype}")
    if array.ndim == dims + 1:
        array = array[:, None]
    elif array.ndim == dims + 2 and array.shape[-1] in (1, 3):
        array = np.moveaxis(array, -1, 1)
    else:
        expected = "(N, H, W) or (N, H, W, C)" if dims == 2 else "(N, D, H, W)"
        raise DataError(f"{path}: {key} has shape {array.shape}, expected {expected} for {dims}D data")
    if array.shape[1] != channels:
        raise DataError(f"{path}: {key} has {array.shape[1]} channels, expected {channels}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _labels_tensor(
    array: np.ndarray, *, n: int, num_classes: int, multi_label: bool, path: Path, key: str
) -> torch.Tensor:
    """Validated labels: ``(N,)`` int64, or ``(N, L)`` 0/1 for multi-label data."""
    if array.dtype.kind not in "iub":
        raise DataError(f"{path}: {key} must be integers, got {array.dtype}")
    if array.shape[:1] != (n,):
        raise DataError(f"{path}: {key} has {array.shape[0] if array.ndim else 0} labels for {n} images")
    labels = array.astype(np.int64)
    if multi_label:
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise DataError(f"{path}: {key} has shape {array.shape}, expected (N, {num_classes})")
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            raise DataError(
                f"{path}: {key} has multi-label values outside {{0, 1}} (e.g. {labels[bad][0]})"
            )
        return torch.from_numpy(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{path}: {key} has shape {array.shape}, expected (N,) or (N, 1)")
    out_of_range = (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        raise DataError(
            f"{path}: {key} has {int(out_of_range.sum())} labels out of range [0, {num_classes}) "
            f"(e.g. {int(labels[out_of_range][0])})"
        )
    return torch.from_numpy(np.ascontiguousarray(labels))


def _load_medmnist(cfg: DataConfig) -> DatasetSplits:
    entry = medmnist_entry(cfg.dataset, cfg.size)
    path = _locate_medmnist(cfg, entry)
    md5 = _verify_md5(path, entry) if cfg.verify_md5 else None
    arrays = _read_npz(path)
    info = entry.info
    dims = 3 if _is_3d(info) else 2
    channels = int(info["n_channels"])
    task = str(info["task"])
    class_names = [str(info["label"][k]) for k in sorted(info["label"], key=int)]
    splits: dict[str, Split] = {}
    for name in SPLITS:
        images = _images_channel_first(
            arrays[f"{name}_images"], dims=dims, channels=channels, path=path, key=f"{name}_images"
        )
        labels = _labels_tensor(
            arrays[f"{name}_labels"],
            n=images.shape[0],
            num_classes=len(class_names),
            multi_label=task == MULTI_LABEL,
            path=path,
            key=f"{name}_labels",
        )
        splits[name] = Split(images, labels)
    spatial = tuple(splits["train"].images.shape[2:])
    if spatial and spatial != (entry.size,) * dims:
        log.warning("%s: images are %s, not %s as data.size says", path, spatial, entry.size)
    return DatasetSplits(
        name=entry.name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=len(class_names),
        class_names=class_names,
        dims=dims,
        channels=channels,
        task=task,
        source=str(path),
        md5=md5,
    )


# --------------------------------------------------------------------------- splitting


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *salt])


def _stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: int, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """Split sample indices into ``len(fractions)`` parts, stratified by label and seeded.

    ``fractions`` sum to 1. With ``groups``, every group lands in one part (greedy assignment
    of groups, largest first, to the part whose per-class quota is least filled). An empty part
    gets one sample (group) from the largest part when that has more than one. Returns sorted
    index arrays.
    """
    rng = _rng(seed, 1)
    if groups is None:
        assignment = _assign_samples(labels, fractions, rng)
    else:
        assignment = _assign_groups(labels, groups, fractions, rng)
    return [np.flatnonzero(assignment == part) for part in range(len(fractions))]


def _assign_samples(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    assignment = np.zeros(len(labels), dtype=np.int64)
    shares = np.asarray(fractions, dtype=np.float64)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        raw = shares * len(idx)
        counts = np.floor(raw).astype(np.int64)
        for part in np.argsort(-(raw - counts), kind="stable")[: len(idx) - counts.sum()]:
            counts[part] += 1
        assignment[idx] = np.repeat(np.arange(len(shares)), counts)
    for part in range(len(shares)):
        if not (assignment == part).any():
            _fill_empty_part(assignment, labels, part, rng)
    return assignment


def _fill_empty_part(
    assignment: np.ndarray, labels: np.ndarray, part: int, rng: np.random.Generator
) -> None:
    """Move one sample into empty ``part``: from the largest part (later parts first on ties)
    that keeps every class it has, else from the largest part with more than one sample."""
    sizes = np.bincount(assignment, minlength=part + 1)
    donors = sorted(range(len(sizes)), key=lambda q: (-sizes[q], -q))
    best: tuple[int, Any] | None = None
    for donor in donors:
        if sizes[donor] < 2:
            break
        values, counts = np.unique(labels[assignment == donor], return_counts=True)
        choice = (donor, values[int(np.argmax(counts))])
        if counts.max() > 1:
            best = choice
            break
        best = best or choice
    if best is not None:
        donor, cls = best
        assignment[rng.choice(np.flatnonzero((assignment == donor) & (labels == cls)))] = part


def _assign_groups(
    labels: np.ndarray, groups: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    classes, label_idx = np.unique(labels, return_inverse=True)
    group_ids, group_idx = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(group_ids), len(classes)), dtype=np.float64)
    np.add.at(counts, (group_idx, label_idx), 1)
    totals = counts.sum(axis=0)
    targets = np.asarray(fractions, dtype=np.float64)[:, None] * totals[None, :]
    filled = np.zeros_like(targets)
    order = rng.permutation(len(group_ids))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    group_part = np.zeros(len(group_ids), dtype=np.int64)
    for g in order:
        score = ((targets - filled) / np.maximum(totals, 1)[None, :]) @ counts[g]
        part = int(np.argmax(score))
        group_part[g] = part
        filled[part] += counts[g]
    for part in range(len(fractions)):
        n_groups = np.bincount(group_part, minlength=len(fractions))
        donor = int(np.argmax(n_groups))
        if n_groups[part] == 0 and n_groups[donor] > 1:
            donors = np.flatnonzero(group_part == donor)
            group_part[donors[int(np.argmin(counts[donors].sum(axis=1)))]] = part
    return group_part[group_idx]


def _subsample(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified, seeded ``fraction`` of the samples (>= 1 per class).

    Multi-label data (2D labels) is subsampled uniformly at random.
    """
    if fraction >= 1:
        return np.arange(len(labels))
    rng = _rng(seed, 2)
    if labels.ndim != 1:
        keep = max(1, round(fraction * len(labels))) if len(labels) else 0
        return np.sort(rng.permutation(len(labels))[:keep])
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        chosen.append(rng.permutation(idx)[: max(1, round(fraction * len(idx)))])
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def _take(split: Split, indices: np.ndarray) -> Split:
    index = torch.from_numpy(indices.astype(np.int64))
    return Split(split.images[index], split.labels[index])


def _finish(data: DatasetSplits, cfg: DataConfig) -> DatasetSplits:
    """Apply ``train_fraction`` and reject empty splits."""
    if cfg.train_fraction < 1:
        before = len(data.train)
        keep = _subsample(data.train.labels.numpy(), cfg.train_fraction, cfg.seed)
        data.train = _take(data.train, keep)
        log.info(
            "%s: train_fraction %.3g keeps %d of %d training samples",
            data.name, cfg.train_fraction, len(data.train), before,
        )
    for name in SPLITS:
        if len(getattr(data, name)) == 0:
            raise DataError(
                f"{data.source}: the {name} split is empty; every split needs at least one "
                "sample (add data, or change val_fraction/test_fraction/train_fraction)"
            )
    log.info("%s", data.summary())
    return data


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


def _decode_image(path: Path, size: int) -> np.ndarray:
    """Decode one image, resize it to ``size x size`` (bilinear); ``(H, W)`` gray or ``(H, W, 3)``."""
    from PIL import Image, UnidentifiedImageError

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
    paths: Sequence[Path], size: int, grayscale: bool | None, source: str
) -> torch.Tensor:
    """Decode ``paths`` once (threads) into a ``uint8`` ``N x C x size x size`` tensor."""
    start = time.monotonic()
    log.info("%s: decoding %d images at %dx%d", source, len(paths), size, size)
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda p: _decode_image(p, size), paths))
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
    images = _decode_images(table.paths, cfg.image_size, cfg.grayscale, source)
    labels = torch.from_numpy(table.labels.astype(np.int64))
    parts = {
        split: Split(images[torch.from_numpy(idx)], labels[torch.from_numpy(idx)])
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


# --------------------------------------------------------------------------- folder


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_images(class_dir: Path) -> list[Path]:
    files = sorted(
        p for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise DataError(
            f"{class_dir}: class folder has no images ({choices(IMAGE_EXTENSIONS)})"
        )
    return files


def _scan_folder(root: Path) -> _Table:
    if not root.is_dir():
        raise DataError(f"{root}: ImageFolder root not found or not a folder (data.path)")
    top = _visible_dirs(root)
    names = {d.name for d in top}
    if "train" in names:
        unexpected = sorted(names - set(SPLITS))
        if unexpected:
            raise DataError(
                f"{root}: has a train folder, so its subfolders must be splits "
                f"({choices(SPLITS)}); unexpected: {choices(unexpected)}"
            )
        split_dirs = {d.name: d for d in top}
        class_names = sorted({c.name for d in split_dirs.values() for c in _visible_dirs(d)})
        entries = [
            (path, class_names.index(c.name), split)
            for split, d in split_dirs.items()
            for c in _visible_dirs(d)
            for path in _class_images(c)
        ]
    else:
        if not top:
            raise DataError(f"{root}: no class folders; expected {root}/<class>/<image> "
                            f"or {root}/{{train,val,test}}/<class>/<image>")
        class_names = [d.name for d in top]
        entries = [(path, i, None) for i, d in enumerate(top) for path in _class_images(d)]
    if len(class_names) < 2:
        raise DataError(f"{root}: needs at least 2 class folders, found {choices(class_names) or 'none'}")
    own_splits = entries and entries[0][2] is not None
    return _Table(
        paths=[e[0] for e in entries],
        labels=np.asarray([e[1] for e in entries], dtype=np.int64),
        splits=np.asarray([e[2] for e in entries], dtype=object) if own_splits else None,
        groups=None,
        class_names=class_names,
    )


def _load_folder(cfg: DataConfig) -> DatasetSplits:
    root = Path(str(cfg.path)).expanduser()
    table = _scan_folder(root)
    return _build_from_table(table, cfg, name=root.resolve().name, source=str(root), md5=None)


# --------------------------------------------------------------------------- csv


_INT_RE = re.compile(r"^[+-]?\d+$")


def _manifest_labels(raw: list[str], manifest: Path) -> tuple[np.ndarray, list[str]]:
    """Class indices and names: ints are sorted numerically, names alphabetically."""
    for row, value in enumerate(raw, start=1):
        if not value:
            raise DataError(f"{manifest}: row {row} (line {row + 1}) has an empty label")
    if all(_INT_RE.match(v) for v in raw):
        values = sorted({int(v) for v in raw})
        mapping = {v: i for i, v in enumerate(values)}
        if values != list(range(len(values))):
            log.info("%s: integer labels %s mapped to 0..%d", manifest, values, len(values) - 1)
        return np.asarray([mapping[int(v)] for v in raw], dtype=np.int64), [str(v) for v in values]
    names = sorted(set(raw))
    mapping = {v: i for i, v in enumerate(names)}
    return np.asarray([mapping[v] for v in raw], dtype=np.int64), names


def _read_manifest(manifest: Path) -> _Table:
    import pandas as pd

    if not manifest.is_file():
        raise DataError(f"{manifest}: CSV manifest not found (data.path)")
    try:
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{manifest}: cannot read the CSV manifest ({exc})") from exc
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in MANIFEST_REQUIRED if c not in frame.columns]
    if missing:
        raise DataError(
            f"{manifest}: missing columns {choices(missing)}; required columns: "
            f"{choices(MANIFEST_REQUIRED)} (optional: {choices(MANIFEST_OPTIONAL)}); "
            f"found: {choices(frame.columns) or 'none'}"
        )
    if frame.empty:
        raise DataError(f"{manifest}: the manifest has no rows")
    frame = frame.apply(lambda col: col.str.strip())
    base = manifest.parent
    paths: list[Path] = []
    for row, value in enumerate(frame["path"].tolist(), start=1):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if not value or not path.is_file():
            raise DataError(
                f"{manifest}: row {row} (line {row + 1}): image file {path if value else '(empty path)'} "
                "not found (relative paths resolve against the manifest's folder)"
            )
        paths.append(path)
    labels, class_names = _manifest_labels(frame["label"].tolist(), manifest)
    if len(class_names) < 2:
        raise DataError(f"{manifest}: needs at least 2 classes, found {choices(class_names)}")
    splits = None
    if "split" in frame.columns:
        values = frame["split"].str.lower().tolist()
        for row, value in enumerate(values, start=1):
            if value not in SPLITS:
                raise DataError(
                    f"{manifest}: row {row} (line {row + 1}) has split {value!r}; valid: {choices(SPLITS)}"
                )
        splits = np.asarray(values, dtype=object)
    groups = None
    if "group" in frame.columns:
        values = frame["group"].tolist()
        for row, value in enumerate(values, start=1):
            if not value:
                raise DataError(f"{manifest}: row {row} (line {row + 1}) has an empty group")
        groups = np.asarray(values, dtype=object)
    return _Table(paths=paths, labels=labels, splits=splits, groups=groups, class_names=class_names)


def _load_csv(cfg: DataConfig) -> DatasetSplits:
    manifest = Path(str(cfg.path)).expanduser()
    table = _read_manifest(manifest)
    return _build_from_table(
        table, cfg, name=manifest.stem, source=str(manifest), md5=dataset_md5(manifest)
    )


# --------------------------------------------------------------------------- entry point


def ensure_data(cfg: DataConfig) -> str:
    """Check, without decoding, that the data ``cfg`` names can be read: a MedMNIST file is found
    (or downloaded) and its md5 verified; a folder or manifest exists. Returns the path.

    A study calls this once in the driver, so a missing file is one clear error before any trial
    starts (and a download happens once, not in every worker).
    """
    if cfg.dataset in (FOLDER, CSV):
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise DataError(f"{path}: not found (data.path for data.dataset={cfg.dataset})")
        return str(path)
    entry = medmnist_entry(cfg.dataset, cfg.size)
    path = _locate_medmnist(cfg, entry)
    if cfg.verify_md5:
        _verify_md5(path, entry)
    return str(path)


def load_data(cfg: DataConfig) -> DatasetSplits:
    """Load the train/val/test splits ``cfg`` describes into memory.

    Raises :class:`DataError` for missing, corrupt or inconsistent data and
    :class:`ConfigError` for invalid configuration values.
    """
    if cfg.dataset == FOLDER:
        data = _load_folder(cfg)
    elif cfg.dataset == CSV:
        data = _load_csv(cfg)
    else:
        data = _load_medmnist(cfg)
    return _finish(data, cfg)


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
