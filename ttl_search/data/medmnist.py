"""MedMNIST: official file names and md5s, download, reading an ``.npz`` into splits."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import ConfigError, DataError, choices
from .config import (
    CSV, DATA_ENV, DEFAULT_DATA_ROOT, DOWNLOAD_TIMEOUT_S, DataConfig, DatasetSplits, FOLDER, MULTI_LABEL, NPZ_KEYS, SPLITS, Split, _is_int,
)

log = logging.getLogger(__name__)

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
