"""NIfTI volumes through the folder and CSV loaders: real AdrenalMNIST3D volumes written as real
NIfTI files by nibabel (in several orientations, .nii and .nii.gz, uint8 and CT-like int16 with
scl_slope/scl_inter in Hounsfield units) reach the model exactly as from the .npz, and the same
trial gives the same metrics; nibabel's own sample files read; every bad file is one line naming
it, before a study is created; the resample and intensity settings; a study from a NIfTI manifest
(studies/nifti_manifest.yaml) runs end to end."""

from __future__ import annotations

import gzip
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel", reason="nibabel is a core requirement (setup.cfg); install it")

from ttl_search.data import DataConfig, Split, TransformConfig, load_data, make_loader  # noqa: E402
from ttl_search.data.nifti import read_nifti, read_volume  # noqa: E402
from ttl_search.errors import ConfigError, DataError  # noqa: E402

from studyutil import REPO, cli  # noqa: E402

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
# stored = 4 * p + 100 (int16), scl_slope 0.5, scl_inter -1000: HU = 2 * p - 950; the window
# [-695, 510] spans -950..-440 (510 HU for 255 steps), so it gives back p exactly
SLOPE, INTERCEPT = 0.5, -1000.0
CT_WINDOW = [-695.0, 510.0]
ORIENTATIONS = ("RAS", "LPS", "SRA")


# --------------------------------------------------------------------------- writing NIfTI


def oriented(volume: np.ndarray, orientation: str) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of a file that stores the RAS+ ``volume`` in ``orientation``: RAS as it is,
    LPS flipped along its first two axes, SRA with its axes permuted (array axis 0 runs inferior to
    superior, 1 left to right, 2 posterior to anterior)."""
    if orientation == "RAS":
        return volume, np.eye(4)
    if orientation == "LPS":
        n = volume.shape
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])
        affine[:3, 3] = [n[0] - 1, n[1] - 1, 0]
        return volume[::-1, ::-1].copy(), affine
    affine = np.zeros((4, 4))
    affine[0, 1] = affine[1, 2] = affine[2, 0] = affine[3, 3] = 1.0
    return volume.transpose(2, 0, 1).copy(), affine


def write_nifti(path: Path, volume: np.ndarray, *, orientation: str = "RAS", ct: bool = False) -> Path:
    """A real NIfTI-1 file of the RAS+ uint8 ``volume``: uint8 as it is, or (``ct``) int16 stored
    values with scl_slope/scl_inter that make Hounsfield units 2 * p - 950."""
    data, affine = oriented(volume, orientation)
    if ct:
        img = nib.Nifti1Image((4 * data.astype(np.int16) + 100).astype(np.int16), affine)
        img.header.set_slope_inter(SLOPE, INTERCEPT)
    else:
        img = nib.Nifti1Image(data.astype(np.uint8), affine)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def adrenal_subset(npz: Path, per_class: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first ``per_class`` volumes of each class of each split: (volumes, labels)."""
    data = np.load(npz)
    out = {}
    for split in ("train", "val", "test"):
        labels = data[f"{split}_labels"][:, 0].astype(np.int64)
        idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in (0, 1)]))
        out[split] = (data[f"{split}_images"][idx], labels[idx])
    return out


def write_adrenal_niftis(root: Path, subset, *, ct: bool = False, splits: bool = True) -> Path:
    """The subset as NIfTI files under ``root`` (orientations and .nii/.nii.gz in turn) and a
    manifest ``root/manifest.csv`` (path,label[,split],group: two volumes per patient)."""
    lines = ["path,label,split,group" if splits else "path,label,group"]
    k = 0
    for split, (volumes, labels) in subset.items():
        for i, (volume, label) in enumerate(zip(volumes, labels)):
            name = f"{split}/{i:03d}{'.nii.gz' if k % 2 else '.nii'}"
            write_nifti(root / name, volume, orientation=ORIENTATIONS[k % 3], ct=ct)
            group = f"{split}-P{i // 2:02d}"
            lines.append(f"{name},{label},{split},{group}" if splits else f"{name},{label},{group}")
            k += 1
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def batches(split: Split) -> list[torch.Tensor]:
    """What a 3D model receives: the eval loader's normalised 1-channel batches at 16^3."""
    loader = make_loader(split, TransformConfig(16, in_channels=1, mean=(0.5,), std=(0.5,)), train=False,
                         batch_size=5, seed=0, dims=3)
    return [x for x, _ in loader]


# --------------------------------------------------------------------------- equivalence on real pixels


def test_adrenalmnist3d_as_nifti_reaches_the_model_with_the_npz_pixels(tmp_path: Path, adrenalmnist3d: Path) -> None:
    subset = adrenal_subset(adrenalmnist3d)
    manifest = write_adrenal_niftis(tmp_path / "nifti", subset)
    raw = nib.load(tmp_path / "nifti" / "train" / "001.nii.gz")
    assert nib.aff2axcodes(raw.affine) == ("L", "P", "S")  # really stored in another orientation
    assert nib.aff2axcodes(nib.load(tmp_path / "nifti" / "train" / "002.nii").affine) == ("S", "R", "A")
    d = load_data(DataConfig(dataset="csv", path=str(manifest), image_size=28))
    assert d.dims == 3 and d.channels == 1 and d.class_names == ["0", "1"]
    for split in ("train", "val", "test"):
        volumes, labels = subset[split]
        got = getattr(d, split)
        assert torch.equal(got.pixels(), torch.from_numpy(volumes)[:, None])
        assert torch.equal(got.labels, torch.from_numpy(labels))
        want = batches(Split(torch.from_numpy(volumes)[:, None], torch.from_numpy(labels)))
        have = batches(got)
        assert len(have) == len(want) and all(torch.equal(a, b) for a, b in zip(have, want))


def test_ct_volumes_in_hounsfield_units_with_a_study_window_give_the_npz_pixels(tmp_path: Path,
                                                                                adrenalmnist3d: Path) -> None:
    subset = adrenal_subset(adrenalmnist3d, per_class=2)
    manifest = write_adrenal_niftis(tmp_path / "ct", subset, ct=True)
    raw = nib.load(tmp_path / "ct" / "train" / "000.nii")
    assert raw.get_data_dtype() == np.int16 and raw.dataobj.slope == SLOPE and raw.dataobj.inter == INTERCEPT
    d = load_data(DataConfig(dataset="csv", path=str(manifest), image_size=28, window=CT_WINDOW))
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(d, split).pixels(), torch.from_numpy(subset[split][0])[:, None])
    # without the window: each volume's own min..max, which stretches these volumes' values
    d = load_data(DataConfig(dataset="csv", path=str(manifest), image_size=28))
    volume = subset["train"][0][0].astype(np.float64)
    expected = np.rint((volume - volume.min()) / (volume.max() - volume.min()) * 255)
    assert np.array_equal(d.train.pixels()[0, 0].numpy(), expected.astype(np.uint8))


def test_the_same_trial_from_nifti_files_and_from_the_npz_gives_the_same_metrics(tmp_path: Path,
                                                                                  adrenalmnist3d: Path) -> None:
    from ttl_search.train.trial import TrialConfig, run_trial

    subset = adrenal_subset(adrenalmnist3d, per_class=8)
    manifest = write_adrenal_niftis(tmp_path / "nifti", subset)
    npz = tmp_path / "subset.npz"  # the same real volumes as a MedMNIST-layout file (in tmp_path only)
    np.savez(npz, **{f"{split}_{kind}": (volumes if kind == "images" else labels[:, None].astype(np.uint8))
                     for split, (volumes, labels) in subset.items() for kind in ("images", "labels")})
    common = {"backbone": "test_cnn3d", "weights": "none", "input_size": 16, "max_epochs": 2, "batch_size": 8,
              "latency_repeats": 1, "device": "cpu"}
    from_nifti = run_trial(TrialConfig(**common, data=DataConfig(dataset="csv", path=str(manifest), image_size=28)))
    from_npz = run_trial(TrialConfig(**common, data=DataConfig(dataset="adrenalmnist3d", path=str(npz),
                                                               verify_md5=False)))
    assert from_nifti.status == from_npz.status == "complete" and "auroc" in from_nifti.test
    assert from_nifti.val == from_npz.val and from_nifti.test == from_npz.test


def test_a_patient_stays_in_one_split_and_a_nifti_imagefolder_reads(tmp_path: Path, adrenalmnist3d: Path) -> None:
    subset = adrenal_subset(adrenalmnist3d, per_class=4)
    manifest = write_adrenal_niftis(tmp_path / "nifti", subset, splits=False)
    group_of = {}
    for split, (volumes, _) in subset.items():
        for i, volume in enumerate(volumes):
            group_of[volume.tobytes()] = f"{split}-P{i // 2:02d}"
    d = load_data(DataConfig(dataset="csv", path=str(manifest), image_size=28, val_fraction=0.2, test_fraction=0.3))
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        part = getattr(d, split)
        assert len(part) > 0
        for volume in part.pixels()[:, 0].numpy():
            group = group_of[volume.tobytes()]
            assert seen.setdefault(group, split) == split, f"{group} is in {seen[group]} and {split}"
    # an ImageFolder tree of volumes: path/<class>/<file>
    for k, (volume, label) in enumerate(zip(*subset["train"])):
        write_nifti(tmp_path / "tree" / f"class{label}" / f"v{k}.nii.gz", volume, orientation=ORIENTATIONS[k % 3])
    d = load_data(DataConfig(dataset="folder", path=str(tmp_path / "tree"), image_size=28, cache=False))
    assert d.dims == 3 and d.class_names == ["class0", "class1"]
    assert len(d.train) + len(d.val) + len(d.test) == len(subset["train"][1])


# --------------------------------------------------------------------------- nibabel's sample files


def _sample(name: str) -> Path:
    path = NIBABEL_DATA / name
    if not path.is_file():
        pytest.skip(f"nibabel does not ship {name} in this version")
    return path


def test_nibabel_sample_files_read_correctly(tmp_path: Path) -> None:
    path = _sample("anatomical.nii")  # int16, big-endian, stored LAS
    img = nib.load(path)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    data, zooms = read_nifti(path)
    assert data.dtype == np.float32 and zooms == (2.0, 2.0, 2.0)
    assert np.array_equal(data, img.get_fdata()[::-1].astype(np.float32))  # L -> R: the first axis flipped
    volume = read_volume(path, DataConfig(dataset="csv", path="m.csv", image_size=16))
    assert volume.shape == (16, 16, 16) and volume.dtype == np.uint8 and volume.max() > 0
    same = read_volume(_sample("anatomical.nii"), DataConfig(dataset="csv", path="m.csv", image_size=33,
                                                               intensity="minmax", resample="spacing"))
    assert same.shape == (33, 33, 33)
    path = _sample("standard.nii.gz")  # uint8, RAS, anisotropic voxels (1, 3, 2) mm
    data, zooms = read_nifti(path)
    assert data.dtype == np.uint8 and zooms == (1.0, 3.0, 2.0)
    assert np.array_equal(data, np.asarray(nib.load(path).dataobj))
    # a 3D NIfTI-2 file: the first volume of nibabel's 4D NIfTI-2 sample, saved again
    four = nib.load(_sample("example_nifti2.nii.gz"))
    assert isinstance(four, nib.Nifti2Image) and len(four.shape) == 4
    first = nib.Nifti2Image(np.asarray(four.dataobj)[..., 0], four.affine)
    nib.save(first, tmp_path / "nifti2-first.nii.gz")
    data, _ = read_nifti(tmp_path / "nifti2-first.nii.gz")
    assert data.shape == four.shape[:3]


def test_orientations_are_made_ras(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, (5, 6, 7), dtype=np.uint8)
    img = nib.Nifti1Image(volume, np.diag([2.0, 3.0, 4.0, 1.0]))
    for codes in (("L", "P", "S"), ("P", "I", "R"), ("S", "L", "A"), ("A", "S", "L")):
        ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                               nib.orientations.axcodes2ornt(codes))
        moved = img.as_reoriented(ornt)
        assert nib.aff2axcodes(moved.affine) == codes
        path = tmp_path / f"orient-{''.join(codes)}.nii"
        nib.save(moved, path)
        data, zooms = read_nifti(path)
        assert np.array_equal(data, volume) and zooms == (2.0, 3.0, 4.0), codes


# --------------------------------------------------------------------------- resample and intensity


def _cfg(size: int, **kwargs) -> DataConfig:
    return DataConfig(dataset="csv", path="m.csv", image_size=size, **kwargs)


def test_resample_plain_and_spacing(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cube = rng.integers(0, 256, (8, 8, 8), dtype=np.uint8)
    flat = nib.Nifti1Image(cube, np.diag([1.0, 1.0, 0.5, 1.0]))  # 8 x 8 x 4 mm
    nib.save(flat, tmp_path / "flat.nii")
    nib.save(nib.Nifti1Image(cube, np.eye(4)), tmp_path / "cube.nii")
    for mode in ("plain", "spacing"):  # S^3 with unit spacing: voxel for voxel
        assert np.array_equal(read_volume(tmp_path / "cube.nii", _cfg(8, resample=mode)), cube)
    assert np.array_equal(read_volume(tmp_path / "flat.nii", _cfg(8)), cube)  # plain ignores spacing
    spaced = read_volume(tmp_path / "flat.nii", _cfg(8, resample="spacing"))
    # the 4 mm axis spans 4 of the 8 output voxels (1 mm each), centred, padded with 0
    assert (spaced[:, :, :2] == 0).all() and (spaced[:, :, 6:] == 0).all()
    inner = torch.nn.functional.interpolate(torch.from_numpy(cube / 255.0).float()[None, None], size=(8, 8, 4),
                                            mode="trilinear", align_corners=False)[0, 0].numpy()
    assert np.array_equal(spaced[:, :, 2:6], np.rint(inner * 255).astype(np.uint8))
    # plain to another size: trilinear
    small = read_volume(tmp_path / "cube.nii", _cfg(4))
    want = torch.nn.functional.interpolate(torch.from_numpy(cube / 255.0).float()[None, None], size=(4, 4, 4),
                                           mode="trilinear", align_corners=False)[0, 0].numpy()
    assert np.array_equal(small, np.rint(want * 255).astype(np.uint8))


def test_intensity_modes(tmp_path: Path) -> None:
    values = np.arange(1000, dtype=np.float32).reshape(10, 10, 10) - 500  # -500 .. 499
    nib.save(nib.Nifti1Image(values, np.eye(4)), tmp_path / "f.nii.gz")
    path = tmp_path / "f.nii.gz"
    auto = read_volume(path, _cfg(10))
    assert np.array_equal(auto, read_volume(path, _cfg(10, intensity="minmax")))
    assert np.array_equal(auto, np.rint((values + 500) / 999 * 255).astype(np.uint8))
    pct = read_volume(path, _cfg(10, intensity="percentile", percentiles=[10, 90]))
    low, high = np.percentile(values, [10, 90])
    want = np.rint(np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    assert np.abs(pct.astype(int) - want.astype(int)).max() <= 1 and pct.min() == 0 and pct.max() == 255
    assert (pct == 0).sum() > 50 and (pct == 255).sum() > 50  # the tails are clipped
    windowed = read_volume(path, _cfg(10, window=[0, 200]))  # -100 .. 100 -> 0 .. 255
    assert np.array_equal(windowed, np.rint(np.clip((values + 100) / 200, 0, 1) * 255).astype(np.uint8))
    values[0, 0, 0] = np.nan  # a non-finite voxel takes the lowest finite value
    nib.save(nib.Nifti1Image(values, np.eye(4)), tmp_path / "nan.nii")
    assert read_volume(tmp_path / "nan.nii", _cfg(10))[0, 0, 0] == 0


def test_volume_settings() -> None:
    cfg = _cfg(16, resample="Spacing", intensity="PERCENTILE", percentiles=[1, 99])
    assert (cfg.resample, cfg.intensity, cfg.percentiles) == ("spacing", "percentile", [1.0, 99.0])
    assert (_cfg(16).resample, _cfg(16).intensity, _cfg(16).percentiles) == ("plain", "auto", [0.5, 99.5])
    with pytest.raises(ConfigError, match="data.resample must be one of plain, spacing"):
        _cfg(16, resample="spline")
    with pytest.raises(ConfigError, match="data.intensity must be one of auto, minmax, percentile"):
        _cfg(16, intensity="zscore")
    for bad in ([99, 1], [0.5], [-1, 50], [50, 101], ["a", 2], [True, 50], 5):
        with pytest.raises(ConfigError, match=r"data.percentiles must be \[low, high\] with 0 <= low < high <= 100"):
            _cfg(16, percentiles=bad)
    with pytest.raises(ConfigError, match="data.window and data.intensity='percentile' both set"):
        _cfg(16, window="abdomen", intensity="percentile")
    with pytest.raises(ConfigError, match="data.resample applies to volumes of data.dataset=folder or csv"):
        DataConfig(dataset="adrenalmnist3d", resample="spacing")
    with pytest.raises(ConfigError, match="data.window applies to DICOM files"):
        DataConfig(dataset="adrenalmnist3d", window="abdomen")


# --------------------------------------------------------------------------- bad files


def _good(path: Path) -> Path:
    return write_nifti(path, np.arange(512, dtype=np.int64).reshape(8, 8, 8).astype(np.uint8))


def _not_nifti(path: Path) -> None:
    path.write_bytes(b"this is a text file, not a volume\n" * 20)


def _truncated(path: Path) -> None:
    data = _good(path).read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _truncated_gz(path: Path) -> None:
    _good(path)
    data = gzip.compress(path.read_bytes())
    path.write_bytes(data[: len(data) // 2])


def _header_only(path: Path) -> None:
    path.write_bytes(_good(path).read_bytes()[:200])


def _not_gzip(path: Path) -> None:
    _good(path.with_name("plain.nii"))
    path.write_bytes(path.with_name("plain.nii").read_bytes())


def _four_d(path: Path) -> None:
    path.write_bytes(_sample("example4d.nii.gz").read_bytes())  # nibabel's own 4D sample


def _four_d_nifti2(path: Path) -> None:
    path.write_bytes(_sample("example_nifti2.nii.gz").read_bytes())


def _two_d(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 1), np.uint8), np.eye(4)), path)


def _complex(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.complex64), np.eye(4)), path)


@pytest.mark.parametrize("make, suffix, message", [
    (_not_nifti, ".nii", "not a NIfTI file (no NIfTI-1 or NIfTI-2 header)"),
    (_truncated, ".nii", "truncated or corrupt (Expected 512 bytes, got 412 bytes"),
    (_truncated_gz, ".nii.gz", "truncated or corrupt (Compressed file ended before the end-of-stream marker"),
    (_header_only, ".nii", "truncated or corrupt (the header ends after 200 bytes)"),
    (_not_gzip, ".nii.gz", "not a NIfTI file (a .nii.gz file must be gzip-compressed)"),
    (_four_d, ".nii.gz", "4D NIfTI (shape 128x96x24x2); expected one 3D volume per file"),
    (_four_d_nifti2, ".nii.gz", "4D NIfTI (shape 32x20x12x2)"),
    (_two_d, ".nii", "a 2D NIfTI image (shape 8x8x1); expected a 3D volume"),
    (_complex, ".nii", "NIfTI data type complex64 is not supported"),
], ids=["not-nifti", "truncated", "truncated-gz", "header-only", "not-gzip", "4d", "4d-nifti2", "2d", "complex"])
def test_each_bad_file_is_one_line_naming_it(tmp_path: Path, make, suffix: str, message: str) -> None:
    lines = ["path,label"]
    for i in range(6):
        lines.append(f"{_good(tmp_path / f'ok{i}.nii').name},{i % 2}")
    bad = tmp_path / f"bad{suffix}"
    make(bad)
    lines.append(f"{bad.name},1")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset="csv", path=str(tmp_path / "m.csv"), image_size=8))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{bad}: ") and message in msg, msg


def test_a_manifest_mixing_images_and_volumes_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    lines = ["path,label"]
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 20, np.uint8)).save(tmp_path / f"{i}.png")
        lines += [f"{i}.png,{i % 2}", f"{_good(tmp_path / f'v{i}.nii').name},{i % 2}"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"mixes 2D images \(4, e.g. .*0.png\) and 3D volumes \(4, e.g. .*v0.nii\)"):
        load_data(DataConfig(dataset="csv", path=str(tmp_path / "m.csv"), image_size=8))
    with pytest.raises(ConfigError, match="data.grayscale: false asks for RGB"):
        (tmp_path / "v.csv").write_text("path,label\n" + "\n".join(f"v{i}.nii,{i % 2}" for i in range(4)) + "\n")
        load_data(DataConfig(dataset="csv", path=str(tmp_path / "v.csv"), image_size=8, grayscale=False))


def test_a_bad_file_stops_the_run_before_the_study_exists(tmp_path: Path) -> None:
    from ttl_search.storage import open_storage, study_names

    lines = ["path,label"] + [f"{_good(tmp_path / f'ok{i}.nii.gz').name},{i % 2}" for i in range(10)]
    _truncated_gz(tmp_path / "cut.nii.gz")
    (tmp_path / "m.csv").write_text("\n".join(lines + ["cut.nii.gz,0"]) + "\n")
    url = f"sqlite:///{tmp_path / 's.db'}"
    run = cli("run", REPO / "studies" / "nifti_manifest.yaml", "--storage", url, "--set", "name=nifti-bad",
              "--set", f"trial.data.path={tmp_path / 'm.csv'}", "--set", "trial.data.image_size=16",
              "--set", "trial.backbone=test_cnn3d", "--set", "trial.weights=none", "--set", "trial.input_size=16",
              "--set", "resources.gpus=0")
    assert run.returncode == 2, run.stderr
    (line,) = [line for line in run.stderr.splitlines() if str(tmp_path / "cut.nii.gz") in line]
    assert "truncated or corrupt" in line
    assert "nifti-bad" not in study_names(open_storage(url))


# --------------------------------------------------------------------------- the study file


def test_nifti_manifest_study_file_and_overrides() -> None:
    from ttl_search.config import to_dict
    from ttl_search.search.study import load_study_config

    cfg = load_study_config(REPO / "studies" / "nifti_manifest.yaml",
                            ["trial.data.window=abdomen", "trial.data.resample=spacing"])
    data = cfg.trial.data
    assert data.dataset == "csv" and data.window_values() == (50.0, 400.0) and data.resample == "spacing"
    cfg = load_study_config(REPO / "studies" / "nifti_manifest.yaml",
                            ["trial.data.window=null", "trial.data.intensity=percentile",
                             "trial.data.percentiles=[1, 99]"])
    assert cfg.trial.data.intensity == "percentile" and cfg.trial.data.percentiles == [1.0, 99.0]
    assert to_dict(load_study_config(None, extra=to_dict(cfg))) == to_dict(cfg)


def test_a_study_runs_from_a_nifti_manifest(tmp_path: Path, adrenalmnist3d: Path, caplog) -> None:
    import os

    from ttl_search.run.driver import run_study
    from ttl_search.search.study import load_study_config

    manifest = write_adrenal_niftis(tmp_path / "nifti", adrenal_subset(adrenalmnist3d, per_class=6))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    url = f"sqlite:///{tmp_path / 's.db'}"
    with caplog.at_level(logging.INFO, logger="ttl_search.data"):
        study = run_study(load_study_config(REPO / "studies" / "nifti_manifest.yaml", [
            f"storage={url}", "name=nifti-e2e", f"trial.data.path={manifest}", "trial.data.image_size=28",
            "trial.data.window=null",
            "trial.backbone=test_cnn3d", "trial.weights=none", "trial.input_size=16", "trial.max_epochs=1",
            "trial.batch_size=8", "trial.latency_repeats=1", "trial.device=cpu", "baselines=[full]",
            "probe.run=false", "resources.cpus=1", "resources.gpus=0", "concurrency=1"]))
    assert "volumes at 28x28x28 (NIfTI, reoriented to RAS+" in caplog.text
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert done and all(0.0 <= t.value <= 1.0 for t in done)


# --------------------------------------------------------------------------- DICOM series folders


def write_slice(path: Path, stored: np.ndarray, position, orientation=(1, 0, 0, 0, 1, 0), *, spacing=(1.0, 1.0),
                series: str = "1.2.826.0.1.3680043.8.498.1") -> Path:
    """One real CT slice (explicit VR little endian, 16 bits, rescaled to HU 0.5 * stored - 1000)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "CT", "TEST", series
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = SLOPE, INTERCEPT, "HU"
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, volume: np.ndarray, *, flipped: bool = False, seed: int = 0) -> Path:
    """The RAS+ uint8 ``volume`` as a CT series of slices 2 mm apart (HU 2 * p - 950), files named
    in shuffled order. The patient axes are DICOM's LPS: a row of the image runs to the patient's
    left (or, ``flipped``, to the right), a column to posterior (or anterior)."""
    stored = 4 * volume.astype(np.uint16) + 100
    order = np.random.default_rng(seed).permutation(volume.shape[2])
    for k in range(volume.shape[2]):
        plane = stored[:, :, k] if flipped else stored[::-1, ::-1, k]
        orientation = (-1, 0, 0, 0, -1, 0) if flipped else (1, 0, 0, 0, 1, 0)
        write_slice(folder / f"IM{order[k]:04d}", plane.T, (0.0, 0.0, 2.0 * k), orientation)
    return folder


def test_dicom_series_folders_are_volumes_with_the_npz_pixels(tmp_path: Path, adrenalmnist3d: Path) -> None:
    pytest.importorskip("pydicom")
    subset = adrenal_subset(adrenalmnist3d, per_class=2)
    lines = ["path,label,split"]
    for split, (volumes, labels) in subset.items():
        for i, (volume, label) in enumerate(zip(volumes, labels)):
            write_series(tmp_path / split / f"series{i}", volume, flipped=bool(i % 2), seed=i)
            lines.append(f"{split}/series{i},{label},{split}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    d = load_data(DataConfig(dataset="csv", path=str(tmp_path / "m.csv"), image_size=28, window=CT_WINDOW))
    assert d.dims == 3
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(d, split).pixels(), torch.from_numpy(subset[split][0])[:, None])
    # the slices are 2 mm apart: spacing-aware resampling keeps the proportions (28 x 28 x 56 mm):
    # the 56 mm axis spans the 28 voxels, the 28 mm axes 14 voxels, centred, padded with 0
    volume = read_volume(tmp_path / "train" / "series0", _cfg(28, window=CT_WINDOW, resample="spacing"))
    for axis in (0, 1):
        assert (volume.take(range(7), axis) == 0).all() and (volume.take(range(21, 28), axis) == 0).all()
    assert volume[7:21, 7:21].any()

    # from the data cache, as in memory; a slice rewritten in place gives a new cache entry
    cfg = DataConfig(dataset="csv", path=str(tmp_path / "m.csv"), image_size=28, window=CT_WINDOW)
    memory = load_data(DataConfig(**{**cfg.__dict__, "cache": False}))
    assert d.train.rows is not None and torch.equal(d.train.pixels(), memory.train.pixels())
    series = tmp_path / "train" / "series0"
    volume = subset["train"][0][0].copy()
    volume[:, :, :] = 0
    write_series(series, volume, seed=0)
    later = time.time() + 5
    for f in series.iterdir():
        os.utime(f, (later, later))
    again = load_data(cfg)
    assert not torch.equal(again.train.pixels()[0], d.train.pixels()[0])
    assert torch.equal(again.train.pixels(), load_data(DataConfig(**{**cfg.__dict__, "cache": False})).train.pixels())


def _series_one_slice(folder: Path) -> None:
    write_slice(folder / "a.dcm", np.zeros((4, 4), np.uint16), (0, 0, 0))


def _series_same_position(folder: Path) -> None:
    for name in ("a.dcm", "b.dcm"):
        write_slice(folder / name, np.zeros((4, 4), np.uint16), (0, 0, 0))


def _series_two_series(folder: Path) -> None:
    write_slice(folder / "a.dcm", np.zeros((4, 4), np.uint16), (0, 0, 0))
    write_slice(folder / "b.dcm", np.zeros((4, 4), np.uint16), (0, 0, 1), series="1.2.3.4")


def _series_uneven(folder: Path) -> None:
    for k, z in enumerate((0, 1, 2, 5)):
        write_slice(folder / f"{k}.dcm", np.zeros((4, 4), np.uint16), (0, 0, z))


@pytest.mark.parametrize("make, message", [
    (_series_one_slice, "a DICOM series folder needs at least 2 slices"),
    (_series_same_position, "slices a.dcm and b.dcm are at the same position"),
    (_series_two_series, "slices of different Series Instance UID"),
    (_series_uneven, "uneven slice spacing (gaps 1 to 3 mm)"),
], ids=["one-slice", "same-position", "two-series", "uneven"])
def test_each_bad_series_is_one_line_naming_it(tmp_path: Path, make, message: str) -> None:
    pytest.importorskip("pydicom")
    rng = np.random.default_rng(0)
    lines = ["path,label"]
    for i in range(6):
        write_series(tmp_path / f"ok{i}", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        lines.append(f"ok{i},{i % 2}")
    make(tmp_path / "bad")
    (tmp_path / "m.csv").write_text("\n".join(lines + ["bad,1"]) + "\n")
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset="csv", path=str(tmp_path / "m.csv"), image_size=4))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'bad'}") and message in msg, msg
