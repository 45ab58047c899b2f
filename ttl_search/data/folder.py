"""ImageFolder trees: ``path/{train,val,test}/<class>/<image>`` or ``path/<class>/<image>``.

Split folders may carry the usual names (case-insensitive, :data:`SPLIT_FOLDER_NAMES`):
``train``/``training``, ``val``/``valid``/``validation``/``dev``, ``test``/``testing``. Images are
the files with an image suffix (:data:`IMAGE_EXTENSIONS`), a DICOM suffix
(:data:`DICOM_EXTENSIONS`), or no suffix and DICOM's ``DICM`` preamble; or NIfTI volumes
(``.nii``/``.nii.gz``, :data:`NIFTI_EXTENSIONS`, :mod:`.nifti`). A tree holds either 2D images or
volumes, not both."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, choices
from .config import (
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    NIFTI_EXTENSIONS,
    SPLIT_FOLDER_NAMES,
    DataConfig,
    DatasetSplits,
)
from .dicom import has_dicom_preamble
from .images import _build_from_table, _Table
from .nifti import is_nifti_path

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- folder


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS or suffix in DICOM_EXTENSIONS or is_nifti_path(path):
        return True
    return not suffix and path.name.upper() != "DICOMDIR" and has_dicom_preamble(path)


def _class_images(class_dir: Path) -> list[Path]:
    files = sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith(".") and _is_image(p))
    if not files:
        raise DataError(
            f"{class_dir}: class folder has no images "
            f"({choices(IMAGE_EXTENSIONS + DICOM_EXTENSIONS + NIFTI_EXTENSIONS)}, or DICOM files without a suffix)"
        )
    return files


_SPLIT_OF_NAME = {name: split for split, names in SPLIT_FOLDER_NAMES.items() for name in names}


def _valid_split_names() -> str:
    return "; ".join(f"{split}: {choices(names)}" for split, names in SPLIT_FOLDER_NAMES.items())


def _split_folders(root: Path, top: list[Path]) -> dict[str, Path] | None:
    """The split of each top folder when ``root`` has a training-split folder (any of its usual
    names, case-insensitive), else None (the top folders are classes)."""
    if not any(_SPLIT_OF_NAME.get(d.name.lower()) == "train" for d in top):
        return None
    unexpected = [d.name for d in top if d.name.lower() not in _SPLIT_OF_NAME]
    if unexpected:
        raise DataError(
            f"{root}: has a training-split folder, so its subfolders must be splits; unexpected: "
            f"{choices(unexpected)} (valid names, any case: {_valid_split_names()})"
        )
    by_split: dict[str, list[Path]] = {}
    for d in top:
        by_split.setdefault(_SPLIT_OF_NAME[d.name.lower()], []).append(d)
    for split, dirs in by_split.items():
        if len(dirs) > 1:
            raise ConfigError(
                f"{root}: folders {choices(d.name for d in dirs)} all name the {split} split; keep one "
                f"(valid names, any case: {_valid_split_names()})"
            )
    mapping = {split: by_split[split][0] for split in SPLIT_FOLDER_NAMES if split in by_split}
    log.info("%s: split folders %s", root,
             ", ".join(f"{d.name} -> {split}" for split, d in mapping.items()))
    return mapping


def _scan_folder(root: Path) -> _Table:
    if not root.is_dir():
        raise DataError(f"{root}: ImageFolder root not found or not a folder (data.path)")
    top = _visible_dirs(root)
    split_dirs = _split_folders(root, top)
    if split_dirs is not None:
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
