"""DICOM through the folder and CSV loaders: real BreastMNIST pixels written as real DICOM files
(12-bit stored, rescaled, windowed back to the original 8-bit values) reach the model exactly as
from the .npz; pydicom's own sample files read; every bad file is one line naming it, before a
study is created; ``data.window`` settings; the ImageFolder split folder names."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom", reason="pydicom is a core requirement (setup.cfg); install it")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from ttl_search.data import DataConfig, Split, TransformConfig, load_data, make_loader  # noqa: E402
from ttl_search.data.config import WINDOW_PRESETS  # noqa: E402
from ttl_search.data.dicom import read_dicom  # noqa: E402
from ttl_search.errors import ConfigError, DataError  # noqa: E402

from studyutil import REPO, cli  # noqa: E402

# stored = 4 * p + 100 (12 bits), rescaled = 0.5 * stored - 1000 = 2 * p - 950: the file's LINEAR
# window (center -694.5, width 511) spans -950..-440 over 510 steps, so it gives back p exactly
SLOPE, INTERCEPT = 0.5, -1000.0
FILE_WINDOW = (-694.5, 511.0)
STUDY_WINDOW = [-695.0, 510.0]  # data.window: center -/+ width/2 = -950 / -440, the same mapping


# --------------------------------------------------------------------------- writing DICOM


def write_dicom(path: Path, stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                slope: float | None = SLOPE, intercept: float | None = INTERCEPT,
                window: tuple[float, float] | None = FILE_WINDOW, **elements) -> Path:
    """A real CT Image DICOM file (preamble, file meta, explicit VR little endian, 16 bits allocated)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "TEST"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def encode(pixels: np.ndarray, *, monochrome1: bool = False) -> np.ndarray:
    """The stored 12-bit values that rescale and window back to the 8-bit ``pixels``."""
    values = 255 - pixels.astype(np.int64) if monochrome1 else pixels.astype(np.int64)
    return (4 * values + 100).astype(np.uint16)


def breast_subset(npz: Path, per_class: int = 6) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first ``per_class`` images of each class of each split: (images, labels)."""
    data = np.load(npz)
    out = {}
    for split in ("train", "val", "test"):
        labels = data[f"{split}_labels"][:, 0].astype(np.int64)
        idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in (0, 1)]))
        out[split] = (data[f"{split}_images"][idx], labels[idx])
    return out


def write_breast_dicoms(root: Path, subset, *, monochrome1: bool = False, window=FILE_WINDOW,
                        suffix: str = ".dcm") -> Path:
    """The subset as DICOM files under ``root`` and a manifest ``root/manifest.csv`` (path,label,split)."""
    lines = ["path,label,split"]
    for split, (images, labels) in subset.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            name = f"{split}/{i:03d}{suffix}"
            write_dicom(root / name, encode(image, monochrome1=monochrome1),
                        photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2", window=window)
            lines.append(f"{name},{label},{split}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def batches(split: Split) -> list[torch.Tensor]:
    """What the model receives: the eval loader's normalised 3-channel batches at 28 px."""
    loader = make_loader(split, TransformConfig(28, in_channels=3), train=False, batch_size=5, seed=0, dims=2)
    return [x for x, _ in loader]


# --------------------------------------------------------------------------- equivalence on real pixels


def test_breastmnist_as_dicom_reaches_the_model_with_the_npz_pixels(tmp_path: Path, breastmnist: Path) -> None:
    subset = breast_subset(breastmnist)
    manifest = write_breast_dicoms(tmp_path / "dicom", subset)
    raw = pydicom.dcmread(tmp_path / "dicom" / "train" / "000.dcm")
    assert raw.pixel_array.dtype == np.uint16 and int(raw.pixel_array.max()) > 255  # really 12-bit data
    d = load_data(DataConfig(dataset="csv", path=str(manifest), image_size=28))
    assert d.channels == 1 and d.class_names == ["0", "1"]
    for split in ("train", "val", "test"):
        images, labels = subset[split]
        got = getattr(d, split)
        assert torch.equal(got.pixels(), torch.from_numpy(images)[:, None])
        assert torch.equal(got.labels, torch.from_numpy(labels))
        want = batches(Split(torch.from_numpy(images)[:, None], torch.from_numpy(labels)))
        have = batches(got)
        assert len(have) == len(want) and all(torch.equal(a, b) for a, b in zip(have, want))


def test_monochrome1_and_a_study_window_give_the_same_pixels(tmp_path: Path, breastmnist: Path) -> None:
    subset = breast_subset(breastmnist, per_class=3)
    inverted = write_breast_dicoms(tmp_path / "mono1", subset, monochrome1=True)
    d = load_data(DataConfig(dataset="csv", path=str(inverted), image_size=28))
    assert torch.equal(d.test.pixels(), torch.from_numpy(subset["test"][0])[:, None])
    # the files' own window is wrong on purpose: data.window wins over it
    wrong = write_breast_dicoms(tmp_path / "wrong", subset, window=(0.0, 4000.0))
    assert not torch.equal(load_data(DataConfig(dataset="csv", path=str(wrong), image_size=28)).train.pixels(),
                           torch.from_numpy(subset["train"][0])[:, None])
    d = load_data(DataConfig(dataset="csv", path=str(wrong), image_size=28, window=STUDY_WINDOW))
    assert torch.equal(d.train.pixels(), torch.from_numpy(subset["train"][0])[:, None])


def test_dicom_imagefolder_with_suffixless_files_and_validation_folder(tmp_path: Path, breastmnist: Path,
                                                                       caplog) -> None:
    subset = breast_subset(breastmnist, per_class=3)
    names = {"train": "Training", "val": "Validation", "test": "Testing"}
    for split, (images, labels) in subset.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            write_dicom(tmp_path / "tree" / names[split] / f"class{label}" / f"IM{i:04d}", encode(image))
    (tmp_path / "tree" / "Training" / "class0" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # not an image
    with caplog.at_level(logging.INFO, logger="ttl_search.data"):
        d = load_data(DataConfig(dataset="folder", path=str(tmp_path / "tree"), image_size=28))
    assert "Training -> train, Validation -> val, Testing -> test" in caplog.text
    assert d.class_names == ["class0", "class1"]
    for split in ("train", "val", "test"):
        images, labels = subset[split]
        order = np.argsort(labels, kind="stable")  # the folder lists class0's files, then class1's
        assert torch.equal(getattr(d, split).pixels(), torch.from_numpy(images[order])[:, None])


def test_ttl_search_train_from_a_dicom_manifest(tmp_path: Path, breastmnist: Path) -> None:
    manifest = write_breast_dicoms(tmp_path / "dicom", breast_subset(breastmnist, per_class=8))
    out = tmp_path / "result.json"
    run = cli("train", "--quiet", "--format", "json", "--output", out, "--set", "backbone=test_cnn",
              "--set", "weights=none", "--set", "data.dataset=csv", "--set", f"data.path={manifest}",
              "--set", "data.image_size=28", "--set", "input_size=28", "--set", "max_epochs=1",
              "--set", "batch_size=8", "--set", "latency_repeats=1", "--set", "device=cpu")
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["status"] == "complete" and result["config"]["data"]["dataset"] == "csv"
    assert 0.0 <= result["test"]["auroc"] <= 1.0 and result["input_size"] == 28


def test_the_same_trial_from_dicom_files_and_from_the_npz_gives_the_same_metrics(tmp_path: Path,
                                                                                  breastmnist: Path) -> None:
    from ttl_search.train.trial import TrialConfig, run_trial

    subset = breast_subset(breastmnist, per_class=8)
    manifest = write_breast_dicoms(tmp_path / "dicom", subset)
    npz = tmp_path / "subset.npz"  # the same real pixels as a MedMNIST-layout file (in tmp_path only)
    np.savez(npz, **{f"{split}_{kind}": (images if kind == "images" else labels[:, None].astype(np.uint8))
                     for split, (images, labels) in subset.items() for kind in ("images", "labels")})
    common = dict(backbone="test_cnn", weights="none", input_size=28, max_epochs=2, batch_size=8,
                  latency_repeats=1, device="cpu")
    from_dicom = run_trial(TrialConfig(**common, data=DataConfig(dataset="csv", path=str(manifest), image_size=28)))
    from_npz = run_trial(TrialConfig(**common, data=DataConfig(dataset="breastmnist", path=str(npz), verify_md5=False)))
    assert from_dicom.status == from_npz.status == "complete" and "auroc" in from_dicom.test
    assert from_dicom.val == from_npz.val and from_dicom.test == from_npz.test


# --------------------------------------------------------------------------- pydicom's sample files


def _sample(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom does not ship {name} in this version")
    return Path(path)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_pydicom_sample_files_read_correctly(name: str) -> None:
    path = _sample(name)
    ds = pydicom.dcmread(path)
    image = read_dicom(path)
    assert image.dtype == np.uint8 and image.shape == (ds.Rows, ds.Columns)
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if "WindowCenter" in ds:  # the file's LINEAR window, as the standard defines it
        c, w = float(ds.WindowCenter), float(ds.WindowWidth)
        expected = np.clip((values - (c - 0.5 - (w - 1) / 2)) / (w - 1), 0, 1)
    else:  # no window: its min..max
        expected = (values - values.min()) / (values.max() - values.min())
        assert image.min() == 0 and image.max() == 255
    assert np.abs(image.astype(np.int64) - np.rint(expected * 255)).max() == 0
    window = WINDOW_PRESETS["abdomen"]
    windowed = read_dicom(path, window)
    low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    assert (windowed[values <= low] == 0).all() and (windowed[values >= high] == 255).all()


def test_pydicom_lossless_encodings_give_the_same_image() -> None:
    """MR_small written little/big endian, implicit VR, RLE and JPEG 2000 lossless (Pillow decodes
    it): one image; colour: a YBR JPEG baseline (Pillow) and an uncompressed YBR_FULL_422 file come
    within JPEG's loss of the lossless RLE RGB reference."""
    reference = read_dicom(_sample("MR_small.dcm"))
    for name in ("MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        assert np.array_equal(read_dicom(_sample(name)), reference), name
    rgb = read_dicom(_sample("SC_rgb_rle.dcm")).astype(np.int64)
    assert rgb.shape == (100, 100, 3) and rgb[5, 50].tolist() == [255, 0, 0]
    assert np.array_equal(read_dicom(_sample("SC_rgb_rle_16bit.dcm")), rgb)  # 16 bits scaled to 8
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        assert np.abs(read_dicom(_sample(name)).astype(np.int64) - rgb).max() <= 8, name
    palette = read_dicom(_sample("examples_palette.dcm"))
    assert palette.shape == (350, 800, 3) and palette.dtype == np.uint8 and palette.max() > 200


def test_the_file_voi_lut_wins_over_its_window_and_the_first_of_several_windows_is_used(tmp_path: Path) -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    lut = Dataset()  # no rescale: stored 4p + 100 -> LUT entry (x - 100) // 4 of 1024, 8 bits
    lut.LUTDescriptor = [1024, 100, 8]
    lut.add_new(0x00283006, "US", [int(v) for v in np.arange(1024) // 4])  # LUT Data
    path = write_dicom(tmp_path / "voi.dcm", encode(pixels), slope=None, window=(0.0, 1.0), VOILUTSequence=[lut])
    assert np.array_equal(read_dicom(path), pixels)
    path = write_dicom(tmp_path / "two.dcm", encode(pixels), window=None, WindowCenter=[FILE_WINDOW[0], 0.0],
                       WindowWidth=[FILE_WINDOW[1], 100.0])
    assert np.array_equal(read_dicom(path), pixels)
    path = write_dicom(tmp_path / "exact.dcm", encode(pixels), window=tuple(STUDY_WINDOW), VOILUTFunction="LINEAR_EXACT")
    assert np.array_equal(read_dicom(path), pixels)
    path = write_dicom(tmp_path / "odd.dcm", encode(pixels), VOILUTFunction="CUBIC")
    with pytest.raises(DataError, match=r"unknown VOI LUT Function 'CUBIC'; valid: LINEAR, LINEAR_EXACT, SIGMOID"):
        read_dicom(path)


def _plugins_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) for m in ("pylibjpeg", "gdcm", "jpeg_ls"))


def test_compressed_files_without_their_plugin_name_the_package_to_install() -> None:
    lossless = _sample("MR_small_jpeg_ls_lossless.dcm")  # JPEG-LS: pylibjpeg-libjpeg, gdcm or pyjpegls
    twelve_bit = _sample("JPGExtended.dcm")  # 12-bit JPEG: Pillow (installed) cannot
    if _plugins_installed():
        assert np.array_equal(read_dicom(lossless), read_dicom(_sample("MR_small.dcm")))
        return
    for path, problem in ((lossless, "no decoder for it is installed"),
                          (twelve_bit, "could not be decoded by the plugins installed")):
        with pytest.raises(DataError) as err:
            read_dicom(path)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"{path}: pixel data compressed as JPEG") and problem in msg
        assert "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg" in msg and "pip install python-gdcm" in msg


# --------------------------------------------------------------------------- bad files


def _good(path: Path) -> Path:
    return write_dicom(path, encode(np.arange(64, dtype=np.uint8).reshape(8, 8)))


def _not_dicom(path: Path) -> None:
    path.write_bytes(b"this is a text file, not an image\n" * 10)


def _truncated(path: Path) -> None:
    data = _good(path).read_bytes()
    path.write_bytes(data[: len(data) - 40])


def _truncated_sample(path: Path) -> None:
    path.write_bytes(_sample("MR_truncated.dcm").read_bytes())  # pydicom's own truncated file


def _photometric(path: Path) -> None:
    write_dicom(path, encode(np.zeros((8, 8), np.uint8)), photometric="HSV")


def _frames(path: Path) -> None:
    write_dicom(path, np.zeros((16, 8), np.uint16), NumberOfFrames=2, Rows=8)  # two 8 x 8 frames


def _no_pixels(path: Path) -> None:
    _good(path)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("make, message", [
    (_not_dicom, "not a DICOM file"),
    (_truncated, "truncated or corrupt"),
    (_truncated_sample, "truncated or corrupt (The number of bytes of pixel data is less than expected"),
    (_photometric, "unsupported photometric interpretation 'HSV'; valid: MONOCHROME1, MONOCHROME2, RGB"),
    (_frames, "multi-frame DICOM (2 frames)"),
    (_no_pixels, "has no pixel data"),
], ids=["not-dicom", "truncated", "truncated-sample", "photometric", "multi-frame", "no-pixels"])
def test_each_bad_file_is_one_line_naming_it(tmp_path: Path, make, message: str) -> None:
    lines = ["path,label"]
    for i in range(6):
        lines.append(f"{_good(tmp_path / f'ok{i}.dcm').name},{i % 2}")
    bad = tmp_path / "bad.dcm"
    make(bad)
    lines.append("bad.dcm,1")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset="csv", path=str(tmp_path / "m.csv"), image_size=8))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{bad}: ") and message in msg


def test_a_bad_file_stops_the_run_before_the_study_exists(tmp_path: Path) -> None:
    from ttl_search.storage import open_storage, study_names

    lines = ["path,label"] + [f"{_good(tmp_path / f'ok{i}.dcm').name},{i % 2}" for i in range(10)]
    _truncated(tmp_path / "cut.dcm")
    (tmp_path / "m.csv").write_text("\n".join(lines + ["cut.dcm,0"]) + "\n")
    url = f"sqlite:///{tmp_path / 's.db'}"
    run = cli("run", REPO / "studies" / "debug.yaml", "--storage", url, "--set", "name=dicom-bad",
              "--set", "trial.data.dataset=csv", "--set", f"trial.data.path={tmp_path / 'm.csv'}",
              "--set", "trial.data.image_size=28")
    assert run.returncode == 2
    (line,) = [line for line in run.stderr.splitlines() if str(tmp_path / "cut.dcm") in line]
    assert "truncated or corrupt" in line
    assert "dicom-bad" not in study_names(open_storage(url))


@pytest.mark.slow
@pytest.mark.integration
def test_a_study_runs_from_a_dicom_manifest(tmp_path: Path, breastmnist: Path) -> None:
    """studies/dicom_manifest.yaml on real BreastMNIST pixels written as DICOM files, as a user runs
    it (`ttl-search run`, then `best`), the images read from the data cache the driver built."""
    import subprocess
    import sys

    from studyutil import cli_env

    manifest = write_breast_dicoms(tmp_path / "dicom", breast_subset(breastmnist, per_class=10))
    url = f"sqlite:///{tmp_path / 's.db'}"
    env = {**cli_env(), "TTL_SEARCH_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "ttl_search", "run", str(REPO / "studies" / "dicom_manifest.yaml"),
                          "--storage", url, "--set", "name=dicom-e2e", "--set", f"trial.data.path={manifest}",
                          "--set", "trial.data.image_size=28", "--set", "trial.backbone=test_cnn",
                          "--set", "trial.weights=none", "--set", "trial.input_size=28", "--set", "trial.max_epochs=1",
                          "--set", "trial.batch_size=8", "--set", "trial.latency_repeats=1", "--set", "trial.device=cpu",
                          "--set", "probe.run=false", "--set", "resources.cpus=1", "--set", "concurrency=1"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (entry,) = [e for e in (tmp_path / "cache").iterdir() if e.is_dir()]  # decoded once, by the driver
    assert np.load(entry / "images.npy", mmap_mode="r").shape == (60, 1, 28, 28)
    best = cli("best", "dicom-e2e", "--storage", url, "--format", "json")
    assert best.returncode == 0, best.stderr
    answer = json.loads(best.stdout)
    assert answer["study"] == "dicom-e2e" and 1 <= int(answer["cut"]) <= 7


# --------------------------------------------------------------------------- data.window


def test_window_settings() -> None:
    cfg = DataConfig(dataset="csv", path="m.csv", window="Lung")
    assert cfg.window == "lung" and cfg.window_values() == (-600.0, 1500.0)
    assert DataConfig(dataset="csv", path="m.csv", window=[40, 400]).window_values() == (40.0, 400.0)
    assert DataConfig(dataset="csv", path="m.csv").window_values() is None
    for bad in ("lungs", [40], [40, 0], [40, -1], ["a", 1], 40, [40, float("nan")], [True, 400]):
        with pytest.raises(ConfigError, match="lung, mediastinum, abdomen, bone, brain"):
            DataConfig(dataset="csv", path="m.csv", window=bad)
    with pytest.raises(ConfigError, match="data.window applies to DICOM files"):
        DataConfig(dataset="breastmnist", window="lung")


def test_window_from_a_study_file_and_an_override() -> None:
    from ttl_search.config import to_dict
    from ttl_search.search.study import load_study_config

    cfg = load_study_config(REPO / "studies" / "dicom_manifest.yaml", ["trial.data.window=bone"])
    assert cfg.trial.data.window == "bone" and cfg.trial.data.window_values() == (400.0, 1800.0)
    cfg = load_study_config(REPO / "studies" / "dicom_manifest.yaml", ["trial.data.window=[-600, 1500]"])
    assert cfg.trial.data.window == [-600.0, 1500.0]
    assert to_dict(load_study_config(None, extra=to_dict(cfg))) == to_dict(cfg)


def test_a_window_without_dicom_files_warns(tmp_path: Path, caplog) -> None:
    from PIL import Image

    lines = ["path,label"]
    for i in range(10):
        Image.fromarray(np.full((8, 8), i * 20, np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{i % 2}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="ttl_search.data"):
        d = load_data(DataConfig(dataset="csv", path=str(tmp_path / "m.csv"), image_size=8, window="lung"))
    assert "data.window is set but no image is DICOM" in caplog.text
    assert sorted(int(split.pixels()[j, 0, 0, 0]) for split in (d.train, d.val, d.test)
                  for j in range(len(split))) == [i * 20 for i in range(10)]  # PNGs as they are
