"""NIfTI volumes (3D): read with nibabel, made into the ``S x S x S`` ``uint8`` volume a trial's
loader takes (``S`` = ``data.image_size``).

A file whose name ends in ``.nii`` or ``.nii.gz`` (any case) goes through these steps:

1. its header is checked to be NIfTI-1 or NIfTI-2 (single file; a ``.nii.gz`` must be gzip) and
   nibabel reads it, applying the header's ``scl_slope``/``scl_inter`` (so CT comes in Hounsfield
   units when the file says so);
2. it is reoriented to nibabel's closest canonical orientation (RAS+: the array's first axis runs
   from the patient's left to right, the second from posterior to anterior, the third from
   inferior to superior) by axis flips and permutations only (no interpolation). The volume tensor's ``D, H, W``
   axes are these three axes in this order;
3. the volume must be 3D: trailing axes of length 1 (``X x Y x Z x 1``) are dropped, a 4D series
   (e.g. fMRI, more than one volume) or a 2D image (an axis of one voxel) is refused. Complex or RGB
   data is refused. Non-finite voxels (NaN, inf) take the lowest finite value;
4. intensity to 0..1 (first that applies): the study's ``data.window`` ``[center, width]`` or CT
   preset (``center - width/2`` becomes 0, ``center + width/2`` becomes 1, clipped outside), else
   ``data.intensity``: ``auto`` (a file stored as ``uint8`` without scaling keeps its own values,
   ``v / 255``; any other file its own min..max), ``minmax`` (its own min..max, nothing clipped) or
   ``percentile`` (its values at ``data.percentiles``, default ``[0.5, 99.5]``, become 0 and 1,
   clipped outside);
5. resampling to ``S^3`` (``data.resample``): ``plain`` (default) resizes the voxel grid
   trilinearly (``torch.nn.functional.interpolate``, ``align_corners=False``), ignoring the voxel
   spacing; a volume already ``S^3`` is taken voxel for voxel. ``spacing`` is spacing-aware: with
   ``L`` the longest physical extent (voxels x spacing, in mm) of the three axes, each axis is
   resized trilinearly to ``round(S * extent / L)`` voxels (cube voxels of ``L / S`` mm) and the
   volume is padded with 0 (black, after step 4), centred, to ``S^3``: the anatomy keeps its
   proportions. A volume already ``S^3`` with isotropic spacing is again taken voxel for voxel;
6. ``round(255 * value)`` as ``uint8``.

A folder of DICOM slices (one series, :mod:`.dicom_series`) named by a manifest row is a volume
too: its slices are sorted and stacked by :func:`~ttl_search.data.dicom_series.read_dicom_series`
(Hounsfield units for CT), then steps 2 and 4 to 6 apply as to a NIfTI file.

Every error is a :class:`~ttl_search.errors.DataError` of one line that names the file.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .config import NIFTI_EXTENSIONS, DataConfig
from .dicom import _linear, _one_line

log = logging.getLogger(__name__)

_READ_ERRORS = (EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                RuntimeError, OverflowError, MemoryError, struct.error, zlib.error)
"""What nibabel (and gzip/zlib below it) raises on a truncated or corrupt file."""


def is_nifti_path(path: Path) -> bool:
    """Whether ``path`` is read as NIfTI: its name ends in ``.nii`` or ``.nii.gz`` (any case)."""
    return path.name.lower().endswith(NIFTI_EXTENSIONS)


def _nibabel(path: Path) -> Any:
    try:
        import nibabel
    except ImportError as exc:
        raise DataError(f"{path}: reading NIfTI files needs nibabel (pip install nibabel)") from exc
    return nibabel


def _header_class(path: Path, nib: Any) -> Any:
    """The nibabel image class of ``path`` from its first bytes: NIfTI-1 or NIfTI-2 single file."""
    if not path.is_file():
        raise DataError(f"{path}: NIfTI file not found")
    try:
        with open(path, "rb") as raw:
            magic = raw.read(2)
        if path.name.lower().endswith(".gz"):
            if magic != b"\x1f\x8b":
                raise DataError(f"{path}: not a NIfTI file (a .nii.gz file must be gzip-compressed)")
            with gzip.open(path, "rb") as handle:
                head = handle.read(544)
        else:
            with open(path, "rb") as handle:
                head = handle.read(544)
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read NIfTI file, truncated or corrupt ({_one_line(exc)})") from exc
    if len(head) >= 348:
        sizes = {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]}
        if 348 in sizes and head[344:348] == b"n+1\0":
            return nib.Nifti1Image
        if 540 in sizes and head[4:8] == b"n+2\0":
            return nib.Nifti2Image
        if 348 in sizes and head[344:348] == b"ni1\0":
            raise DataError(f"{path}: a NIfTI-1 header/image pair (.hdr/.img); convert it to one .nii or .nii.gz file")
    if len(head) < 348 and head[:4] in (b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00",
                                        b"\x00\x00\x02\x1c"):
        raise DataError(f"{path}: cannot read NIfTI file, truncated or corrupt (the header ends after "
                        f"{len(head)} bytes)")
    raise DataError(f"{path}: not a NIfTI file (no NIfTI-1 or NIfTI-2 header)")


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The volume of NIfTI file ``path`` reoriented to RAS+ and its voxel spacing (mm).

    The array is 3D: ``uint8`` when the file stores ``uint8`` without scaling, else ``float32``
    (``scl_slope``/``scl_inter`` applied; non-finite voxels set to the lowest finite value).
    """
    nib = _nibabel(path)
    klass = _header_class(path, nib)
    try:
        img = klass.from_filename(str(path))
        shape = tuple(int(n) for n in img.shape)
        dtype = img.get_data_dtype()
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read NIfTI file, truncated or corrupt ({_one_line(exc)})") from exc
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    dims = "x".join(str(n) for n in img.shape)
    if len(shape) > 3:
        raise DataError(f"{path}: {len(shape)}D NIfTI (shape {dims}); expected one 3D volume per file "
                        "(split a series into one file per volume)")
    if len(shape) < 3 or min(shape) < 2:
        raise DataError(f"{path}: a 2D NIfTI image (shape {dims}); expected a 3D volume (at least 2 voxels "
                        "along each axis)")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise DataError(f"{path}: NIfTI data type {dtype} is not supported; expected integer or float voxels")
    try:
        if len(img.shape) > 3:
            img = img.slicer[(slice(None),) * 3 + (0,) * (len(img.shape) - 3)]
        canonical = nib.as_closest_canonical(img)
        data = np.asanyarray(canonical.dataobj)
        zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3])
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read NIfTI file, truncated or corrupt ({_one_line(exc)})") from exc
    data = np.asarray(data)
    if data.dtype == np.uint8:
        return data, zooms
    values = data.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            raise DataError(f"{path}: NIfTI volume has no finite values")
        values[~finite] = values[finite].min()
    return values, zooms


def intensity_description(cfg: DataConfig) -> str:
    """How :func:`read_volume` maps values to 0..255 under ``cfg`` (for logs)."""
    window = cfg.window_values()
    if window is not None:
        return f"data.window center {window[0]:g}, width {window[1]:g}"
    if cfg.intensity == "percentile":
        return f"percentiles {cfg.percentiles[0]:g}..{cfg.percentiles[1]:g}"
    if cfg.intensity == "minmax":
        return "each volume's min..max"
    return "uint8 files as stored, others their min..max"


def _to_unit(path: Path, data: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Step 4 of the module docstring: ``float32`` in 0..1."""
    window = cfg.window_values()
    if window is None and cfg.intensity == "auto" and data.dtype == np.uint8:
        return data.astype(np.float32) / 255.0
    values = data.astype(np.float32, copy=False)
    if window is not None:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    elif cfg.intensity == "percentile":
        low, high = np.percentile(values, cfg.percentiles)
    else:
        low, high = values.min(), values.max()
    return _linear(values, float(low), float(high)).astype(np.float32, copy=False)


def _resize(values: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear resize of a 3D ``float32`` array (``align_corners=False``); unchanged at its size."""
    if values.shape == shape:
        return values
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def _resample(path: Path, values: np.ndarray, zooms: tuple[float, float, float], cfg: DataConfig) -> np.ndarray:
    """Step 5 of the module docstring: ``S^3``."""
    size = cfg.image_size
    if cfg.resample == "plain":
        return _resize(values, (size,) * 3)
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise DataError(f"{path}: voxel spacing {zooms} is not positive; data.resample: spacing needs it "
                        "(or use data.resample: plain)")
    extents = [n * z for n, z in zip(values.shape, zooms)]
    longest = max(extents)
    inner = tuple(max(1, min(size, round(size * e / longest))) for e in extents)
    resized = _resize(values, inner)
    if inner == (size,) * 3:
        return resized
    out = np.zeros((size,) * 3, dtype=np.float32)
    starts = [(size - n) // 2 for n in inner]
    out[tuple(slice(s, s + n) for s, n in zip(starts, inner))] = resized
    return out


def read_series(folder: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The volume of the DICOM series in ``folder`` (:mod:`.dicom_series`) reoriented to RAS+ as
    :func:`read_nifti` does, ``float32`` (after the Modality LUT), and its voxel spacing (mm)."""
    from .dicom_series import read_dicom_series

    nib = _nibabel(folder)
    volume, affine = read_dicom_series(folder)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
    return np.asarray(canonical.dataobj, dtype=np.float32), tuple(float(z) for z in canonical.header.get_zooms()[:3])


def read_volume(path: Path, cfg: DataConfig) -> np.ndarray:
    """The volume of NIfTI file ``path`` (or of the DICOM series in folder ``path``,
    :func:`read_series`) as ``uint8`` ``(S, S, S)``, ``S = cfg.image_size``, by the steps of the
    module docstring (``cfg``'s ``window``, ``intensity``, ``percentiles``, ``resample``)."""
    data, zooms = read_series(path) if path.is_dir() else read_nifti(path)
    unit = _resample(path, _to_unit(path, data, cfg), zooms, cfg)
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
