"""CSV manifests: columns ``path,label`` and optional ``split`` and ``group``; a path names an image
file Pillow reads, a 2D DICOM file (:mod:`.dicom`), a NIfTI volume (``.nii``/``.nii.gz``,
:mod:`.nifti`) or a folder holding one DICOM series, read as a volume (:mod:`.dicom_series`). A
manifest lists either 2D images or volumes, not both; rows of one ``group`` (e.g. a patient) are
kept in one split when ttl-search splits."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ..errors import DataError, choices
from .config import DataConfig, DatasetSplits, MANIFEST_OPTIONAL, MANIFEST_REQUIRED, SPLITS
from .images import _Table, _build_from_table
from .medmnist import dataset_md5

log = logging.getLogger(__name__)

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
        if not value or not (path.is_file() or path.is_dir()):
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
