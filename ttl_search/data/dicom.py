"""DICOM (2D) images: read with pydicom, made into the 8-bit image a trial's loader takes.

A grayscale image (``MONOCHROME1``/``MONOCHROME2``) goes through the DICOM grayscale pipeline:

1. the pixel data is decoded (a compressed transfer syntax through pydicom's decoder plugins: JPEG
   baseline by Pillow; JPEG lossless, JPEG-LS and JPEG 2000 by ``pylibjpeg`` with its
   ``pylibjpeg-libjpeg``/``pylibjpeg-openjpeg`` plugins or by ``python-gdcm``; a file whose
   plugin is missing is refused with the packages to install);
2. the modality LUT: Rescale Slope/Intercept (or a Modality LUT Sequence) turn stored values into
   the modality's unit, Hounsfield units for CT;
3. the VOI (window), first that applies: the study's ``data.window`` (``[center, width]`` or a
   preset: ``center - width/2`` becomes 0, ``center + width/2`` becomes 255), else the file's VOI
   LUT Sequence (its output range from the LUT Descriptor's bits), else the file's first Window
   Center/Width with its VOI LUT Function (``LINEAR``, the default; ``LINEAR_EXACT``; ``SIGMOID``),
   else the image's own min..max. A window clips what lies outside it, as windows do; the
   min..max mapping clips nothing. 12/16-bit data is never cut to its low 8 bits: the windowed
   values in 0..1 are scaled to 0..255 and rounded;
4. ``MONOCHROME1`` (0 is white) is inverted, so a high value is bright in every image.

A colour image (``RGB``, ``YBR_*`` converted to RGB by pydicom, ``PALETTE COLOR`` through its
palette) is taken as it is, scaled from its bits stored (or the palette's bits) to 8 bits.
Multi-frame files, files without pixel data and other photometric interpretations are refused.
Every error is a :class:`~ttl_search.errors.DataError` of one line that names the file.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, choices
from .config import DICOM_EXTENSIONS, IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")
PHOTOMETRICS = MONOCHROME + COLOUR
"""Photometric interpretations read."""
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
"""VOI LUT Functions of a file's window (DICOM PS3.3 C.11.2.1.2)."""
DECODER_HINT = ("pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
                "(JPEG lossless, JPEG-LS, JPEG 2000), or pip install python-gdcm")
"""What to install for a compressed transfer syntax pydicom cannot decode as installed."""

_READ_ERRORS = (EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                NotImplementedError, RuntimeError, OverflowError, struct.error)
"""What pydicom raises on a truncated or corrupt file (its parser has no single error type)."""


def has_dicom_preamble(path: Path) -> bool:
    """Whether ``path`` starts with DICOM's 128-byte preamble and ``DICM``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom_path(path: Path) -> bool:
    """Whether ``path`` is read as DICOM: a DICOM suffix, or no image suffix and the ``DICM`` preamble."""
    suffix = path.suffix.lower()
    if suffix in DICOM_EXTENSIONS:
        return True
    return suffix not in IMAGE_EXTENSIONS and has_dicom_preamble(path)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _pydicom(path: Path) -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise DataError(f"{path}: reading DICOM files needs pydicom (pip install pydicom)") from exc
    return pydicom


def read_dataset(path: Path) -> Any:
    """The pydicom dataset of ``path``, checked to be a one-frame image this module can read and
    whose pixel data can be decoded with the plugins installed (the pixels are not decoded)."""
    pydicom = _pydicom(path)
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        raise DataError(f"{path}: DICOM file not found")
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:  # no preamble: an old (ACR-NEMA style) file is still read
            ds = _read_forced(pydicom, path)
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        frames = ds.get("NumberOfFrames", 1)
        frames = int(frames) if frames not in (None, "") else 1
    except DataError:
        raise
    except (InvalidDicomError, *_READ_ERRORS) as exc:
        raise DataError(f"{path}: cannot read DICOM file, truncated or corrupt ({_one_line(exc)})") from exc
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (not an image; modality "
                        f"{ds.get('Modality', 'unknown')})")
    if photometric not in PHOTOMETRICS:
        raise DataError(f"{path}: unsupported photometric interpretation {photometric or '(missing)'!r}; "
                        f"valid: {choices(PHOTOMETRICS)}")
    if frames != 1:
        raise DataError(f"{path}: multi-frame DICOM ({frames} frames); 2D data needs one frame per file")
    _check_decoder(path, ds)
    return ds


def _read_forced(pydicom: Any, path: Path) -> Any:
    """A file without the DICM preamble, accepted only when it holds DICOM image elements."""
    not_dicom = f"{path}: not a DICOM file (no DICM preamble and no DICOM image elements)"
    try:
        ds = pydicom.dcmread(path, force=True)
        if "PixelData" in ds and "Rows" in ds and "Columns" in ds:
            return ds
    except _READ_ERRORS as exc:
        raise DataError(not_dicom) from exc
    raise DataError(not_dicom)


def _syntax(ds: Any) -> Any:
    """The transfer syntax UID of ``ds`` (implicit VR little endian when its file meta has none)."""
    from pydicom.uid import ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID", ImplicitVRLittleEndian) if meta is not None else ImplicitVRLittleEndian


def _check_decoder(path: Path, ds: Any) -> None:
    """Refuse a compressed transfer syntax whose decoder plugins are all missing."""
    from pydicom.pixels import get_decoder

    syntax = _syntax(ds)
    if not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DataError(f"{path}: pixel data compressed as {syntax.name} ({syntax}), which pydicom "
                        "cannot decode; convert the file to an uncompressed transfer syntax") from exc
    if not decoder.is_available:
        raise DataError(f"{path}: pixel data compressed as {syntax.name} ({syntax}) and no decoder "
                        f"for it is installed; install one: {DECODER_HINT}")


def read_dicom(path: Path, window: tuple[float, float] | None = None) -> np.ndarray:
    """The image of DICOM file ``path`` as ``uint8``: ``(H, W)`` grayscale or ``(H, W, 3)`` RGB.

    ``window`` is the study's ``(center, width)``; None uses the file's (module docstring).
    """
    ds = read_dataset(path)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    try:
        arr = ds.pixel_array
    except _READ_ERRORS as exc:
        syntax = _syntax(ds)
        if syntax.is_compressed:  # e.g. 12-bit JPEG, which Pillow (the plugin installed) cannot decode
            raise DataError(f"{path}: pixel data compressed as {syntax.name} ({syntax}) could not be decoded "
                            f"by the plugins installed ({_one_line(exc)}); if the file is not corrupt, install "
                            f"another decoder: {DECODER_HINT}") from exc
        raise DataError(f"{path}: cannot decode the DICOM pixel data, truncated or corrupt "
                        f"({_one_line(exc)})") from exc
    if photometric in MONOCHROME:
        if arr.ndim != 2:
            raise DataError(f"{path}: {photometric} pixel data has shape {arr.shape}; expected rows x columns")
        return _grayscale(path, ds, arr, photometric, window)
    return _colour(path, ds, arr, photometric)


def _grayscale(path: Path, ds: Any, arr: np.ndarray, photometric: str,
               window: tuple[float, float] | None) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    try:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        if window is not None:
            center, width = window
            scaled = _linear(values, center - width / 2, center + width / 2)
        elif "VOILUTSequence" in ds and len(ds.VOILUTSequence):
            scaled = _voi_lut(path, ds, values)
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            scaled = _file_window(path, ds, values)
        else:
            scaled = _linear(values, float(values.min(initial=0)), float(values.max(initial=0)))
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot apply the DICOM rescale or VOI LUT ({_one_line(exc)})") from exc
    out = np.rint(scaled * 255.0).astype(np.uint8)
    return 255 - out if photometric == "MONOCHROME1" else out


def _voi_lut(path: Path, ds: Any, values: np.ndarray) -> np.ndarray:
    """The file's first VOI LUT (PS3.3 C.11.2.1.1) as 0..1: a value below the first mapped one takes
    the first entry, one past the last entry the last; the output range is the LUT Descriptor's bits.
    (Read here: pydicom 3.0's ``apply_voi`` indexes an 8-bit LUT of more than 256 entries modulo 256.)"""
    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    if not 8 <= bits <= 16:
        raise DataError(f"{path}: VOI LUT of {bits} bits per entry; valid: 8 to 16 (or set data.window)")
    data = item.LUTData
    if isinstance(data, bytes):  # OW
        order = "<" if _syntax(ds).is_little_endian else ">"
        lut = np.frombuffer(data, dtype=np.uint8 if len(data) == entries else np.dtype(f"{order}u2"))
    else:
        lut = np.atleast_1d(np.asarray(list(data) if hasattr(data, "__iter__") else data, dtype=np.float64))
    if len(lut) < entries:
        raise DataError(f"{path}: VOI LUT has {len(lut)} entries, its descriptor says {entries}")
    index = np.clip(np.floor(values) - first, 0, entries - 1).astype(np.int64)
    return np.clip(lut[index].astype(np.float64) / (2.0 ** bits - 1), 0.0, 1.0)


def _first(value: Any) -> float:
    """The first of a multi-valued element (a file may list several windows), as float."""
    from pydicom.multival import MultiValue

    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0]
    return float(value)


def _file_window(path: Path, ds: Any, values: np.ndarray) -> np.ndarray:
    """The file's first Window Center/Width with its VOI LUT Function, as 0..1 (PS3.3 C.11.2.1.2)."""
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in VOI_FUNCTIONS:
        raise DataError(f"{path}: unknown VOI LUT Function {function!r}; valid: {choices(VOI_FUNCTIONS)} "
                        "(or set data.window)")
    if not np.isfinite([center, width]).all() or width < (1 if function == "LINEAR" else 0) or width == 0:
        raise DataError(f"{path}: invalid window (center {center}, width {width}) for {function}; "
                        "set data.window: [center, width] in the study")
    if function == "LINEAR":
        return _linear(values, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)
    if function == "LINEAR_EXACT":
        return _linear(values, center - width / 2, center + width / 2)
    return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))


def _linear(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``low`` -> 0, ``high`` -> 1, linear between, clipped outside; a step when low == high."""
    if high <= low:
        return (values > low).astype(np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _colour(path: Path, ds: Any, arr: np.ndarray, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except _READ_ERRORS as exc:
            raise DataError(f"{path}: cannot apply the DICOM palette ({_one_line(exc)})") from exc
        bits = 16 if arr.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored", 8) or 8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DataError(f"{path}: {photometric} pixel data has shape {arr.shape}; expected rows x columns x 3")
    if bits <= 8:
        return np.ascontiguousarray(arr, dtype=np.uint8)
    scaled = np.clip(arr.astype(np.float64) / (2.0 ** bits - 1), 0, 1)
    return np.rint(scaled * 255.0).astype(np.uint8)
