"""DICOM series as 3D volumes: a manifest row naming a folder of DICOM slices (one series).

The folder's files (every visible file with a DICOM suffix, or without a suffix and with the
``DICM`` preamble; a ``DICOMDIR`` and other files are skipped) must be single-frame grayscale
(``MONOCHROME2``, as CT, MR and PET are) slices of one series (one Series Instance UID), of the
same size and Image Orientation (Patient), at least 2 of them. Each slice is checked and decoded as
in :mod:`.dicom` and its Rescale Slope/Intercept (Modality LUT) applied, so CT comes in Hounsfield
units. The slices are sorted by their Image Position (Patient) along the slice normal (the cross
product of the orientation's row and column directions); two slices at one position, or slice gaps
that differ by more than 10 %, are refused.

The result is the volume with its affine (from Image Position/Orientation (Patient) and Pixel
Spacing, DICOM's LPS patient axes turned into nibabel's RAS), which :mod:`.nifti` reorients to
RAS+ and maps to 0..255 and ``image_size`` cubed like a NIfTI file (the files' own VOI windows are
not used: ``data.window``, else ``data.intensity``). Every error is a one-line
:class:`~ttl_search.errors.DataError` naming the folder (and the file, when one file is at fault).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .config import DICOM_EXTENSIONS
from .dicom import _READ_ERRORS, _one_line, has_dicom_preamble, read_dataset


def series_files(folder: Path) -> list[Path]:
    """The DICOM files of ``folder`` (not its subfolders), sorted by name."""
    files = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        suffix = path.suffix.lower()
        if suffix in DICOM_EXTENSIONS or (not suffix and path.name.upper() != "DICOMDIR" and has_dicom_preamble(path)):
            files.append(path)
    return files


def _floats(ds: Any, key: str, count: int, path: Path) -> np.ndarray:
    value = ds.get(key)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: invalid {key} {value!r} ({_one_line(exc)})") from exc
    if out is None or out.shape != (count,) or not np.isfinite(out).all():
        raise DataError(f"{path}: a slice of a DICOM series needs {key} ({count} numbers), found {value!r}")
    return out


def read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(volume, affine)`` of the DICOM series in ``folder``: ``float32`` ``(columns, rows, slices)``
    values after the Modality LUT and its RAS affine (see the module docstring)."""
    from pydicom.pixels import apply_modality_lut

    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM series folder not found")
    files = series_files(folder)
    if len(files) < 2:
        raise DataError(f"{folder}: a DICOM series folder needs at least 2 slices (.dcm/.dicom files, or files "
                        f"without a suffix and with the DICM preamble), found {len(files)}")
    slices = []
    for path in files:
        ds = read_dataset(path)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        if photometric != "MONOCHROME2":
            raise DataError(f"{path}: a slice of a DICOM series must be MONOCHROME2 (grayscale, high is bright), "
                            f"found {photometric}")
        orientation = _floats(ds, "ImageOrientationPatient", 6, path)
        position = _floats(ds, "ImagePositionPatient", 3, path)
        spacing = _floats(ds, "PixelSpacing", 2, path)
        slices.append((path, ds, orientation, position, spacing))
    first = slices[0]
    for path, ds, orientation, _, spacing in slices[1:]:
        for what, a, b in (("Series Instance UID", ds.get("SeriesInstanceUID"), first[1].get("SeriesInstanceUID")),
                           ("size", (ds.get("Rows"), ds.get("Columns")), (first[1].get("Rows"), first[1].get("Columns")))):
            if a != b:
                raise DataError(f"{folder}: slices of different {what} ({first[0].name}: {b}, {path.name}: {a}); a "
                                "series folder holds one series")
        if not np.allclose(orientation, first[2], atol=1e-4) or not np.allclose(spacing, first[4], atol=1e-4):
            raise DataError(f"{folder}: slices of different Image Orientation (Patient) or Pixel Spacing "
                            f"({first[0].name}, {path.name}); a series folder holds one series")
    row_dir, col_dir = first[2][:3], first[2][3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DataError(f"{first[0]}: Image Orientation (Patient) {first[2].tolist()} is not two unit, "
                        "orthogonal directions")
    slices.sort(key=lambda s: float(s[3] @ normal))
    offsets = np.asarray([float(s[3] @ normal) for s in slices])
    gaps = np.diff(offsets)
    if (gaps < 1e-4).any():
        i = int(np.argmax(gaps < 1e-4))
        raise DataError(f"{folder}: slices {slices[i][0].name} and {slices[i + 1][0].name} are at the same "
                        "position; a series folder holds one series, one slice per position")
    step = float(np.median(gaps))
    if np.abs(gaps - step).max() > 0.1 * step:
        raise DataError(f"{folder}: uneven slice spacing (gaps {gaps.min():g} to {gaps.max():g} mm); missing slices?")
    planes = []
    for path, ds, *_ in slices:
        try:
            values = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
        except _READ_ERRORS as exc:
            raise DataError(f"{path}: cannot decode the DICOM pixel data, truncated or corrupt "
                            f"({_one_line(exc)})") from exc
        if values.ndim != 2:
            raise DataError(f"{path}: pixel data has shape {values.shape}; expected rows x columns")
        planes.append(values)
    volume = np.stack([p.T for p in planes], axis=-1)  # (columns, rows, slices)
    row_spacing, col_spacing = first[4]  # PixelSpacing: between rows, between columns
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing  # along a row: the next column
    affine[:3, 1] = col_dir * row_spacing  # along a column: the next row
    affine[:3, 2] = (slices[-1][3] - slices[0][3]) / (len(slices) - 1)
    affine[:3, 3] = slices[0][3]
    affine[:2] *= -1  # DICOM's LPS patient axes -> RAS
    return volume, affine
