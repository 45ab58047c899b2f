"""The on-disk preprocessing cache of folder and manifest data: every image (or volume) is decoded,
windowed and resized once per (files, settings) into a ``uint8`` ``.npy`` array that trials
read a batch at a time, so a trial's memory does not grow with the dataset and concurrent trials on
a node share the page cache.

An entry is a folder ``<cache dir>/<family>-<files>/`` holding ``images.npy`` (``N x C x S x S``,
or ``N x 1 x S x S x S`` for volumes, in the table's row order) and ``meta.json``:

* ``family`` hashes the data's source (folder or manifest path) and every setting that changes the
  pixels (:data:`PIXEL_SETTINGS_EXCLUDED` lists those that do not: splits, seeds, fractions, ...);
* ``files`` hashes each image file's path, size and modification time, in row order.

A changed file or setting gives another key, hence a new entry; the older entries of the same
family are then removed. An entry is built in a temporary folder beside it and renamed into place
only when complete (a half-written cache is never used), under a lock file, so concurrent trials
on a node wait for one build instead of decoding twice. An entry that cannot be read is rebuilt.

The cache folder is ``data.cache_dir``, else env ``TTL_SEARCH_CACHE``, else
``~/.ttl-search/cache``: a folder every node reaches (shared storage) is built once for the
cluster; a node-local one is built once per node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import DataError
from .config import DataConfig

log = logging.getLogger(__name__)

CACHE_ENV = "TTL_SEARCH_CACHE"
DEFAULT_CACHE_DIR = "~/.ttl-search/cache"
FORMAT_VERSION = 1
"""Bumped when the layout or the decoding rules change (old entries are then not used)."""
PIXEL_SETTINGS_EXCLUDED = frozenset({
    "dataset", "path", "root", "download", "verify_md5", "train_fraction", "val_fraction", "test_fraction",
    "seed", "folds", "fold", "cache", "cache_dir",
})
""":class:`DataConfig` fields that do not change the decoded pixels (every other field is part of
an entry's key, so a new decoding setting invalidates entries without being listed here)."""
IMAGES_FILE = "images.npy"
META_FILE = "meta.json"
CHUNK = 256
"""Samples decoded at a time: the build holds about this many decoded samples in memory."""

Decoder = Callable[[Path], np.ndarray]
"""Decodes one file: ``(S, S)`` gray, ``(S, S, 3)`` RGB, or ``(S, S, S)`` a volume, ``uint8``."""


def cache_dir(cfg: DataConfig) -> Path:
    """The cache folder of ``cfg`` (``data.cache_dir``, env ``TTL_SEARCH_CACHE``, the default)."""
    return Path(cfg.cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def pixel_settings(cfg: DataConfig) -> dict[str, object]:
    """The settings of ``cfg`` that change the decoded pixels."""
    return {k: v for k, v in asdict(cfg).items() if k not in PIXEL_SETTINGS_EXCLUDED}


def _file_stats(paths: Sequence[Path], source: str) -> list[tuple[str, int, int]]:
    """Path, size and modification time of each sample's file (of every file in a sample that is a
    folder, e.g. a DICOM series: a slice rewritten in place changes the key)."""
    out = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                st = file.stat()
            except OSError as exc:
                raise DataError(f"{file}: cannot read the image file ({exc.strerror or exc})") from exc
            out.append((str(file.resolve()), st.st_size, st.st_mtime_ns))
    return out


def entry_key(paths: Sequence[Path], cfg: DataConfig, source: str) -> tuple[str, str]:
    """``(family, files)`` hashes of the entry for ``paths`` decoded with ``cfg`` (see the module)."""
    family = _digest({"format": FORMAT_VERSION, "source": str(Path(source).resolve()),
                      "settings": pixel_settings(cfg)})
    return family, _digest(_file_stats(paths, source))


class CachedImages:
    """The images of a cache entry, read from its ``.npy`` file a few rows at a time (``pread``
    into the caller's tensor): the process holds only what it reads, while the kernel's page
    cache, shared by every process of the node, keeps the file's recently read pages.

    Stands in for a ``uint8`` images tensor where a split is mapped (:attr:`Split.rows
    <ttl_search.data.config.Split.rows>`): it has the tensor's ``shape``, ``dtype``, ``ndim`` and
    ``dim()``, and :meth:`read` gathers rows.
    """

    def __init__(self, path: Path, complete: bool = True) -> None:
        self.path = Path(path)
        """The entry's ``images.npy``."""
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            self._offset = f.tell()
        if dtype != np.uint8 or fortran or len(shape) not in (4, 5):
            raise ValueError(f"{self.path}: not a C-ordered uint8 N x C x ... array")
        self.shape = torch.Size(shape)
        """``N x C x S x S`` or ``N x 1 x S x S x S``."""
        self.dtype = torch.uint8
        self.ndim = len(shape)
        self._row = int(np.prod(shape[1:]))
        if complete and os.path.getsize(self.path) < self._offset + self._row * shape[0]:
            raise ValueError(f"{self.path}: truncated")
        self._fd = os.open(self.path, os.O_RDONLY)

    def dim(self) -> int:
        return self.ndim

    def read(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The images at ``rows`` (int64), in that order, as a tensor (``out`` when given, e.g.
        pinned memory); runs of consecutive rows are read in one call."""
        index = rows.tolist()
        out = torch.empty((len(index), *self.shape[1:]), dtype=torch.uint8) if out is None else out
        flat = out.numpy().reshape(len(index), self._row) if len(index) else None
        start = 0
        while start < len(index):
            end = start + 1
            while end < len(index) and index[end] == index[end - 1] + 1:
                end += 1
            view = memoryview(flat[start:end]).cast("B")
            offset, done = self._offset + index[start] * self._row, 0
            while done < len(view):
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if got <= 0:
                    raise DataError(f"{self.path}: the data cache file ended early; remove it to rebuild")
                done += got
            start = end
        return out

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["path"])

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __repr__(self) -> str:
        return f"CachedImages({str(self.path)!r}, shape={tuple(self.shape)})"


def _open(entry: Path, count: int) -> CachedImages | None:
    """The entry's images, or None when the entry is missing or unreadable."""
    try:
        meta = json.loads((entry / META_FILE).read_text())
        images = CachedImages(entry / IMAGES_FILE)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if images.shape[0] != count or meta.get("count") != count:
        log.warning("%s: cache entry does not match its data (%s, %d expected); rebuilding", entry,
                    tuple(images.shape), count)
        return None
    return images


class _Writer:
    """Appends samples to a new ``.npy`` file of ``count`` samples, in order (plain writes: the
    builder's memory holds one chunk, not the file)."""

    def __init__(self, path: Path, count: int, sample_shape: tuple[int, ...]) -> None:
        self.path, self.count, self.written = path, count, 0
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close())
        np.lib.format.write_array_header_1_0(
            self.file, {"descr": "|u1", "fortran_order": False, "shape": (count, *sample_shape)})

    def write(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows, dtype=np.uint8).tobytes())
        self.written += len(rows)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _build(entry: Path, paths: Sequence[Path], decode: Decoder, grayscale: bool | None, volumes: bool,
           source: str, meta: dict[str, object]) -> None:
    """Decode ``paths`` chunk by chunk into a temporary folder, then rename it to ``entry``; each
    sample channel first as :func:`~ttl_search.data.images._decode_images` makes it."""
    from .images import _sample_channels

    tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    writer: _Writer | None = None
    try:
        gray = grayscale
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(paths), CHUNK):
                arrays = list(pool.map(decode, paths[start:start + CHUNK]))
                if writer is None:
                    gray = True if volumes else (all(a.ndim == 2 for a in arrays) if grayscale is None else grayscale)
                    writer = _Writer(tmp / IMAGES_FILE, len(paths), _sample_channels(arrays[0], gray, volumes).shape)
                elif grayscale is None and gray and not volumes and any(a.ndim == 3 for a in arrays):
                    gray = False  # the first RGB image: the images before it become 3 equal channels
                    writer = _widen(writer)
                writer.write(np.stack([_sample_channels(arr, gray, volumes) for arr in arrays]))
        if writer is None or writer.written != len(paths):
            raise DataError(f"{source}: the data cache build wrote {writer.written if writer else 0} of "
                            f"{len(paths)} images")
        writer.close()
        (tmp / META_FILE).write_text(json.dumps({**meta, "count": len(paths), "gray": gray}, indent=1))
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / META_FILE).exists():  # another node built it meanwhile: use theirs
                raise
    finally:
        if writer is not None and not writer.file.closed:
            try:
                writer.file.close()
            except OSError:  # e.g. no space left to flush the last bytes: the build has failed anyway
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def _widen(gray: _Writer) -> _Writer:
    """A writer of 3-channel samples holding the gray samples written so far as 3 equal channels."""
    gray.close()
    moved = gray.path.with_name("gray.npy")
    gray.path.rename(moved)
    source = CachedImages(moved, complete=False)  # holds ``gray.written`` of its rows
    out = _Writer(gray.path, gray.count, (3, *source.shape[2:]))
    for start in range(0, gray.written, CHUNK):
        rows = source.read(torch.arange(start, min(gray.written, start + CHUNK))).numpy()
        out.write(np.broadcast_to(rows, (len(rows), 3, *rows.shape[2:])))
    del source
    moved.unlink()
    return out


def cached_images(paths: Sequence[Path], cfg: DataConfig, source: str, decode: Decoder,
                  volumes: bool = False, before_build: Callable[[], None] | None = None) -> CachedImages:
    """The images of ``paths`` decoded by ``decode``, from the cache (built first when missing:
    ``before_build``, e.g. a log of what decoding will do, runs then and only then):
    ``N x C x S x S``, or ``N x 1 x S x S x S`` for ``volumes``, ``uint8``, in ``paths``' order,
    read on demand."""
    from filelock import FileLock

    root = cache_dir(cfg)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{root}: cannot create the data cache folder (data.cache_dir, env {CACHE_ENV}): "
                        f"{exc.strerror or exc}; set data.cache_dir to a writable folder, or data.cache: false "
                        "to decode into memory") from exc
    family, files = entry_key(paths, cfg, source)
    entry = root / f"{family}-{files}"
    images = _open(entry, len(paths))
    if images is not None:
        log.info("%s: %d images from the cache %s", source, len(paths), entry)
        return images
    with FileLock(str(root / f"{family}.lock")):
        images = _open(entry, len(paths))
        if images is not None:
            log.info("%s: %d images from the cache %s (built by another process meanwhile)", source, len(paths),
                     entry)
        else:
            shutil.rmtree(entry, ignore_errors=True)
            for old in root.glob(f"{family}-*"):  # the same data and settings, older files
                log.info("%s: removing the outdated cache entry %s", source, old)
                shutil.rmtree(old, ignore_errors=True)
            for stale in root.glob(f".{family}-*.tmp-*"):  # left by a build that was killed
                log.info("%s: removing the unfinished cache build %s", source, stale)
                shutil.rmtree(stale, ignore_errors=True)
            if before_build is not None:
                before_build()
            start = time.monotonic()
            log.info("%s: decoding %d images into the cache %s", source, len(paths), entry)
            try:
                _build(entry, paths, decode, cfg.grayscale, volumes, source,
                       {"source": source, "settings": pixel_settings(cfg), "format": FORMAT_VERSION})
            except OSError as exc:
                raise DataError(f"{root}: cannot write the data cache entry for {source} ({exc.strerror or exc}); "
                                "free some space, set data.cache_dir to another folder, or data.cache: false "
                                "to decode into memory") from exc
            log.info("%s: cached %d images in %.1f s", source, len(paths), time.monotonic() - start)
            images = _open(entry, len(paths))
    if images is None:
        raise DataError(f"{entry}: the data cache entry just built cannot be read; remove it and retry")
    return images
