"""Data loading for trials: MedMNIST files, ImageFolder trees and CSV manifests.

:func:`load_data` turns a :class:`DataConfig` into :class:`DatasetSplits`: train, validation and
test images held in memory as ``uint8`` tensors (decoded once), channel first, with ``int64``
labels. :func:`make_loader` wraps one :class:`Split` in a :class:`BatchLoader` that resizes the
images once to the model's input size, keeps them on the trial's device and, a whole batch at a
time, converts to float, (for training) augments, maps channels and normalises.

Sources:

* MedMNIST (``dataset`` = an official name such as ``breastmnist`` or ``adrenalmnist3d``): the
  official ``.npz`` file, read from ``path``, or from ``root`` under MedMNIST's file name
  (``breastmnist.npz`` for size 28, ``breastmnist_64.npz`` for 64, ...), downloaded there from
  the official (zenodo) url when absent. The official md5 is verified, also for local files.
  MedMNIST files carry their own train/val/test splits.
* ``folder``: an ImageFolder tree, ``path/{train,val,test}/<class>/<image>`` (own splits, the
  folders under their usual names in any case: ``training``, ``validation``/``valid``/``dev``,
  ``testing`` too; ``val`` may be missing, then it is carved out of ``train``) or
  ``path/<class>/<image>`` (stratified, seeded split).
* ``csv``: a manifest with columns ``path,label`` and optional ``split`` (train/val/test) and
  ``group`` (e.g. patient id; a group is never spread over several splits when this module
  splits). Relative paths resolve against the manifest's folder.

Folder and manifest images are decoded by Pillow, or, for 2D DICOM files, by pydicom with the
rescale, window (``data.window``, else the file's) and MONOCHROME1 rules of :mod:`.dicom`.
NIfTI files (``.nii``/``.nii.gz``) are 3D volumes for the 3D backbones (:mod:`.nifti`): read by
nibabel, reoriented to RAS+, mapped to 0..255 (``data.window``, else ``data.intensity``:
``auto``/``minmax``/``percentile`` with ``data.percentiles``) and resampled to ``image_size``
cubed (``data.resample``: ``plain`` or spacing-aware ``spacing``), ``N x 1 x S x S x S``; a manifest
row naming a folder of DICOM slices (one series, :mod:`.dicom_series`) is a volume too. A folder
or manifest holds 2D images or volumes, not both.

Every error a user can cause is a :class:`~ttl_search.errors.DataError` (data) or
:class:`~ttl_search.errors.ConfigError` (configuration value); messages name the file (or the
configuration key) and the problem.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DataError
from .config import CSV, FOLDER, DataConfig, DatasetSplits, Split
from .folder import _load_folder
from .manifest import _load_csv
from .medmnist import _load_medmnist, _locate_medmnist, _verify_md5, default_data_root, medmnist_entry
from .splits import _finish
from .transforms import BatchLoader, TransformConfig, make_loader

__all__ = ["DataConfig", "DatasetSplits", "Split", "BatchLoader", "TransformConfig", "default_data_root",
           "ensure_data", "load_data", "make_loader"]
"""The data layer's interface: its submodules are how each source is read."""

log = logging.getLogger(__name__)

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
