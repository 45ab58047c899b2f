"""ImageFolder trees: ``path/{train,val,test}/<class>/<image>`` or ``path/<class>/<image>``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import DataError, choices
from .config import DataConfig, DatasetSplits, IMAGE_EXTENSIONS, SPLITS
from .images import _Table, _build_from_table

log = logging.getLogger(__name__)

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
