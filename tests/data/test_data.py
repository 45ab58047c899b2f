"""Tests of ttl_search.data: MedMNIST files (real ones from ../shared/datasets), folder and CSV
data made in tmp_path, splitting, loaders and the error messages."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ttl_search.data import BatchLoader, DataConfig, Split, TransformConfig, load_data, make_loader
from ttl_search.data import medmnist, splits
from ttl_search.data.medmnist import dataset_md5, medmnist_filename, medmnist_sizes
from ttl_search.errors import ConfigError, DataError

BREAST_MD5 = "750601b1f35ba3300ea97c75c52ff8f6"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- helpers


def write_npz(
    path: Path,
    counts: tuple[int, int, int] = (20, 6, 8),
    *,
    num_classes: int = 2,
    shape: tuple[int, ...] = (28, 28),
    seed: int = 0,
    drop: tuple[str, ...] = (),
    labels: dict[str, np.ndarray] | None = None,
) -> Path:
    """A small MedMNIST-like npz (uint8 images, (N, 1) uint8 labels)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in zip(("train", "val", "test"), counts):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % num_classes).astype(np.uint8)[:, None]
    arrays.update(labels or {})
    for key in drop:
        del arrays[key]
    np.savez_compressed(path, **arrays)
    return path


def write_png(path: Path, *, value: int, mode: str = "L", size: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    if mode == "RGB":
        arr = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    else:
        arr = rng.integers(0, 256, (size, size + 4), dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def make_folder(root: Path, classes=("benign", "malignant"), per_class: int = 10, splits=None) -> Path:
    for split in splits or [None]:
        for c, name in enumerate(classes):
            for i in range(per_class):
                base = root / split if split else root
                write_png(base / name / f"{i}.png", value=1000 * c + i + (100 if split else 0))
    return root


def cfg_for(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


# --------------------------------------------------------------------------- MedMNIST (real files)


def test_breastmnist_by_path(breastmnist: Path) -> None:
    d = load_data(cfg_for(breastmnist))
    assert (len(d.train), len(d.val), len(d.test)) == (546, 78, 156)
    assert d.num_classes == 2 and d.class_names == ["malignant", "normal, benign"]
    assert (d.dims, d.channels, d.task, d.name) == (2, 1, "binary-class", "breastmnist")
    assert d.md5 == BREAST_MD5 and d.source == str(breastmnist)
    assert d.train.pixels().shape == (546, 1, 28, 28) and d.train.pixels().dtype == torch.uint8
    assert d.train.labels.shape == (546,) and d.train.labels.dtype == torch.int64
    assert torch.bincount(d.train.labels).tolist() == [147, 399]
    assert torch.bincount(d.test.labels).tolist() == [42, 114]


def test_breastmnist_by_root_and_env(shared_datasets_dir: Path, monkeypatch) -> None:
    d = load_data(DataConfig(root=str(shared_datasets_dir), download=False))
    assert (len(d.train), len(d.val), len(d.test)) == (546, 78, 156)
    assert d.md5 == BREAST_MD5 and d.source == str(shared_datasets_dir / "breastmnist.npz")
    monkeypatch.setenv("TTL_SEARCH_DATA", str(shared_datasets_dir))
    d2 = load_data(DataConfig(dataset="BreastMNIST", download=False))
    assert torch.equal(d2.train.pixels(), d.train.pixels())


def test_adrenalmnist3d(adrenalmnist3d: Path) -> None:
    d = load_data(DataConfig(dataset="adrenalmnist3d", path=str(adrenalmnist3d)))
    assert (len(d.train), len(d.val), len(d.test)) == (1188, 98, 298)
    assert d.dims == 3 and d.channels == 1 and d.num_classes == 2
    assert d.train.pixels().shape == (1188, 1, 28, 28, 28)
    assert torch.bincount(d.val.labels).tolist() == [76, 22]


def test_train_fraction_stratified_and_seeded(breastmnist: Path) -> None:
    a = load_data(cfg_for(breastmnist, train_fraction=0.1, seed=3))
    b = load_data(cfg_for(breastmnist, train_fraction=0.1, seed=3))
    c = load_data(cfg_for(breastmnist, train_fraction=0.1, seed=4))
    assert torch.equal(a.train.pixels(), b.train.pixels()) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.train.pixels(), c.train.pixels())
    counts = torch.bincount(a.train.labels).tolist()
    assert counts == [15, 40]  # round(0.1 * 147), round(0.1 * 399)
    assert (len(a.val), len(a.test)) == (78, 156)  # only train is subsampled


def test_train_fraction_keeps_one_per_class(breastmnist: Path) -> None:
    d = load_data(cfg_for(breastmnist, train_fraction=0.001))
    assert torch.bincount(d.train.labels).tolist() == [1, 1]


def test_medmnist_names_and_sizes() -> None:
    assert medmnist_filename("breastmnist", 28) == "breastmnist.npz"
    assert medmnist_filename("breastmnist", 64) == "breastmnist_64.npz"
    assert medmnist_filename("adrenalmnist3d", 64) == "adrenalmnist3d_64.npz"
    assert medmnist_sizes("pathmnist") == [28, 64, 128, 224]
    assert medmnist_sizes("synapsemnist3d") == [28, 64]


def test_bad_dataset_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        DataConfig(dataset="brestmnist")
    msg = str(err.value)
    assert "brestmnist" in msg
    for name in ("breastmnist", "chestmnist", "organmnist3d", "synapsemnist3d", "folder", "csv"):
        assert name in msg


def test_bad_size_lists_valid_sizes() -> None:
    with pytest.raises(ConfigError, match=r"adrenalmnist3d.*128.*valid sizes: 28, 64$"):
        DataConfig(dataset="adrenalmnist3d", size=128)
    with pytest.raises(ConfigError, match=r"valid sizes: 28, 64, 128, 224"):
        DataConfig(dataset="breastmnist", size=32)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"train_fraction": 0.0}, "train_fraction"),
        ({"train_fraction": 1.5}, "train_fraction"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "test_fraction"),
        ({"image_size": 0}, "image_size"),
        ({"dataset": "folder"}, "data.path"),
    ],
)
def test_bad_config_values(kw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        DataConfig(**kw)


# --------------------------------------------------------------------------- MedMNIST errors


def test_missing_file_offline(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_data(DataConfig(root=str(tmp_path), download=False))
    msg = str(err.value)
    expected = str(tmp_path / "breastmnist.npz")
    assert expected in msg and "not found" in msg and "zenodo.org" in msg and BREAST_MD5 in msg


def test_missing_explicit_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="not found") as err:
        load_data(cfg_for(missing))
    assert str(missing) in str(err.value)


def test_download_verifies_md5(tmp_path: Path, breastmnist: Path, monkeypatch) -> None:
    urls = []

    def fake_open(url: str, timeout: float):
        urls.append(url)
        return open(breastmnist, "rb")

    monkeypatch.setattr(medmnist, "_open_url", fake_open)
    d = load_data(DataConfig(root=str(tmp_path / "cache")))
    assert urls and "zenodo.org" in urls[0] and "breastmnist.npz" in urls[0]
    assert (tmp_path / "cache" / "breastmnist.npz").is_file() and d.md5 == BREAST_MD5
    assert len(d.train) == 546
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["breastmnist.npz"]


def test_download_corrupt_is_rejected(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(medmnist, "_open_url", lambda url, timeout: io.BytesIO(b"not the file"))
    with pytest.raises(DataError) as err:
        load_data(DataConfig(root=str(tmp_path)))
    msg = str(err.value)
    assert str(tmp_path / "breastmnist.npz") in msg and "md5 mismatch" in msg and BREAST_MD5 in msg
    assert list(tmp_path.iterdir()) == []  # no partial file left


def test_download_failure_says_where_to_put_file(tmp_path: Path, monkeypatch) -> None:
    import urllib.error

    def offline(url: str, timeout: float):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(medmnist, "_open_url", offline)
    with pytest.raises(DataError) as err:
        load_data(DataConfig(root=str(tmp_path)))
    msg = str(err.value)
    assert "download failed" in msg and "no network" in msg
    assert f"put it at {tmp_path / 'breastmnist.npz'}" in msg


def test_md5_mismatch(tmp_path: Path, breastmnist: Path) -> None:
    copy = tmp_path / "breastmnist.npz"
    copy.write_bytes(breastmnist.read_bytes() + b"\0")
    with pytest.raises(DataError) as err:
        load_data(cfg_for(copy))
    msg = str(err.value)
    assert str(copy) in msg and "md5 mismatch" in msg
    assert f"expected {BREAST_MD5}" in msg and f"actual {dataset_md5(copy)}" in msg
    # the same copy loads when verification is off
    assert len(load_data(cfg_for(copy, verify_md5=False)).train) == 546


def test_wrong_npz_keys(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "x.npz", drop=("val_images", "test_labels"))
    with pytest.raises(DataError) as err:
        load_data(cfg_for(path, verify_md5=False))
    msg = str(err.value)
    assert str(path) in msg and "missing keys val_images, test_labels" in msg


def test_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 this is no zip")
    with pytest.raises(DataError, match="not a readable .npz") as err:
        load_data(cfg_for(path, verify_md5=False))
    assert str(path) in str(err.value)


def test_labels_out_of_range(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "x.npz", labels={"test_labels": np.full((8, 1), 2, np.uint8)})
    with pytest.raises(DataError) as err:
        load_data(cfg_for(path, verify_md5=False))
    msg = str(err.value)
    assert str(path) in msg and "test_labels" in msg and "out of range [0, 2)" in msg


def test_empty_split(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "x.npz", counts=(20, 0, 8))
    with pytest.raises(DataError) as err:
        load_data(cfg_for(path, verify_md5=False))
    msg = str(err.value)
    assert str(path) in msg and "val split is empty" in msg


def test_multi_label_keeps_label_matrix(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = {f"{s}_labels": rng.integers(0, 2, (n, 14), dtype=np.uint8) for s, n in
              (("train", 20), ("val", 6), ("test", 8))}
    path = write_npz(tmp_path / "chest.npz", labels=labels)
    d = load_data(DataConfig(dataset="chestmnist", path=str(path), verify_md5=False, train_fraction=0.5))
    assert d.task == "multi-label, binary-class" and d.num_classes == 14
    assert d.train.labels.shape == (10, 14) and d.train.labels.dtype == torch.int64
    x, y = next(iter(make_loader(d.val, TransformConfig(28), train=False, batch_size=4, seed=0, dims=2)))
    assert y.shape == (4, 14)


# --------------------------------------------------------------------------- folder


def test_folder_without_splits(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", per_class=10)
    cfg = DataConfig(dataset="folder", path=str(root), image_size=16, seed=1)
    d = load_data(cfg)
    assert d.class_names == ["benign", "malignant"] and d.num_classes == 2 and d.name == "imgs"
    assert d.channels == 1 and d.train.pixels().shape[1:] == (1, 16, 16) and d.md5 is None
    assert (len(d.train), len(d.val), len(d.test)) == (14, 2, 4)
    for split in (d.train, d.val, d.test):
        assert torch.bincount(split.labels).tolist()[0] == torch.bincount(split.labels).tolist()[1]
    again = load_data(cfg)
    assert torch.equal(again.test.pixels(), d.test.pixels())
    other = load_data(DataConfig(dataset="folder", path=str(root), image_size=16, seed=2))
    assert not torch.equal(other.test.pixels(), d.test.pixels())


def test_folder_with_own_splits_and_rgb(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=2, splits=("train", "val", "test"))
    write_png(root / "train" / "a" / "rgb.png", value=7, mode="RGB")
    d = load_data(DataConfig(dataset="folder", path=str(root), image_size=8))
    assert (len(d.train), len(d.val), len(d.test)) == (7, 6, 6)
    assert d.channels == 3 and d.task == "multi-class" and d.class_names == ["a", "b", "c"]
    gray = load_data(DataConfig(dataset="folder", path=str(root), image_size=8, grayscale=True))
    assert gray.channels == 1 and gray.train.pixels().shape == (7, 1, 8, 8)


def test_folder_corrupt_image(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", per_class=5)
    bad = root / "malignant" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset="folder", path=str(root)))
    msg = str(err.value)
    assert str(bad) in msg and "cannot decode image" in msg


def test_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as err:
        load_data(DataConfig(dataset="folder", path=str(tmp_path / "none")))
    assert str(tmp_path / "none") in str(err.value)


# --------------------------------------------------------------------------- csv


def write_manifest(path: Path, rows: list[dict], columns: list[str]) -> Path:
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_with_groups_keeps_groups_together(tmp_path: Path) -> None:
    rows = []
    rng = np.random.default_rng(0)
    for patient in range(30):
        label = "tumour" if patient % 3 == 0 else "normal"
        for k in range(int(rng.integers(1, 4))):
            name = f"img/p{patient}_{k}.png"
            write_png(tmp_path / name, value=patient * 10 + k, size=8)
            rows.append({"path": name, "label": label, "group": f"P{patient:03d}"})
    manifest = write_manifest(tmp_path / "manifest.csv", rows, ["path", "label", "group"])
    d = load_data(DataConfig(dataset="csv", path=str(manifest), image_size=8, seed=5))
    assert d.class_names == ["normal", "tumour"] and d.name == "manifest"
    assert d.md5 == dataset_md5(manifest)
    assert len(d.train) + len(d.val) + len(d.test) == len(rows)
    assert min(len(d.train), len(d.val), len(d.test)) > 0
    # recover each image's group by its pixels and check no group crosses splits
    key_to_group = {}
    for r in rows:
        arr = np.asarray(Image.open(tmp_path / r["path"]).convert("L").resize((8, 8), Image.Resampling.BILINEAR))
        key_to_group[arr.tobytes()] = r["group"]
    owner: dict[str, str] = {}
    for split_name in ("train", "val", "test"):
        for img in getattr(d, split_name).pixels():
            group = key_to_group[img[0].numpy().tobytes()]
            assert owner.setdefault(group, split_name) == split_name, f"group {group} crosses splits"
    for split in (d.train, d.val, d.test):
        assert set(split.labels.tolist()) == {0, 1}


def test_group_split_function() -> None:
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(200), rng.integers(1, 6, 200))
    labels = (groups % 4 == 0).astype(np.int64)
    parts = splits._stratified_split(labels, (0.7, 0.1, 0.2), seed=0, groups=groups.astype(object))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    sets = [set(groups[p].tolist()) for p in parts]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    for part, frac in zip(parts, (0.7, 0.1, 0.2)):
        assert abs(len(part) / len(labels) - frac) < 0.05
        assert abs(labels[part].mean() - labels.mean()) < 0.08


def test_tiny_split_fills_every_part() -> None:
    train, val, test = splits._stratified_split(np.array([0, 0, 1, 1]), (0.7, 0.1, 0.2), seed=0)
    assert len(val) == 1 and len(test) == 1 and sorted(np.array([0, 0, 1, 1])[train]) == [0, 1]


def test_too_few_images_for_splits(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", per_class=1)
    with pytest.raises(DataError, match="split is empty") as err:
        load_data(DataConfig(dataset="folder", path=str(root)))
    assert str(root) in str(err.value)


def test_csv_int_labels_and_own_splits(tmp_path: Path) -> None:
    rows = []
    for i in range(12):
        write_png(tmp_path / f"{i}.png", value=i, size=8)
        split = "train" if i < 8 else "test"
        rows.append({"path": f"{i}.png", "label": 1 + i % 2, "split": split})
    manifest = write_manifest(tmp_path / "m.csv", rows, ["path", "label", "split"])
    d = load_data(DataConfig(dataset="csv", path=str(manifest), image_size=8, val_fraction=0.25))
    assert d.class_names == ["1", "2"] and set(d.train.labels.tolist()) == {0, 1}
    assert (len(d.train), len(d.val), len(d.test)) == (6, 2, 4)  # val carved out of train


def test_csv_missing_column(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.csv", [{"file": "a.png", "label": 0}], ["file", "label"])
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset="csv", path=str(manifest)))
    msg = str(err.value)
    assert str(manifest) in msg and "missing columns path" in msg and "required columns: path, label" in msg


def test_csv_row_with_missing_file(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", value=1)
    rows = [{"path": "a.png", "label": 0}, {"path": "gone.png", "label": 1}]
    manifest = write_manifest(tmp_path / "m.csv", rows, ["path", "label"])
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset="csv", path=str(manifest)))
    msg = str(err.value)
    assert str(manifest) in msg and "row 2" in msg and str(tmp_path / "gone.png") in msg and "not found" in msg


def test_csv_bad_split_value(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", value=1)
    rows = [{"path": "a.png", "label": 0, "split": "train"}, {"path": "a.png", "label": 1, "split": "dev"}]
    manifest = write_manifest(tmp_path / "m.csv", rows, ["path", "label", "split"])
    with pytest.raises(DataError, match=r"row 2 .*'dev'; valid: train, val, test"):
        load_data(DataConfig(dataset="csv", path=str(manifest)))


# --------------------------------------------------------------------------- loaders


def test_eval_loader_shapes_and_normalisation(breastmnist: Path) -> None:
    d = load_data(cfg_for(breastmnist))
    tcfg = TransformConfig(input_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    loader = make_loader(d.val, tcfg, train=False, batch_size=32, seed=0, dims=2)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [32, 32, 14]  # drop_last is false
    x, y = batches[0]
    assert x.shape == (32, 3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(torch.cat([b[1] for b in batches]), d.val.labels)  # no shuffle
    resized = torch.nn.functional.interpolate(d.val.pixels()[:1].float(), size=(64, 64), mode="bilinear",
                                              align_corners=False, antialias=True)
    gray = resized.round().clamp(0, 255)[0, 0] / 255
    expected = torch.stack([(gray - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    # the uint8 resize may round one gray level differently from the float reference
    torch.testing.assert_close(x[0], expected, atol=1.01 / 255 / min(IMAGENET_STD), rtol=0)
    # un-normalising gives back the same gray image in every channel
    un = x[0] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(un[0], un[1], atol=1e-5, rtol=0)
    assert 0 <= un.min() and un.max() <= 1 + 1e-5


def test_train_loader_augmentation_is_reproducible(breastmnist: Path) -> None:
    d = load_data(cfg_for(breastmnist))
    tcfg = TransformConfig(input_size=32)

    def epochs(seed: int, n: int = 2):
        loader = make_loader(d.train, tcfg, train=True, batch_size=16, seed=seed, dims=2)
        out = []
        for _ in range(n):
            out.append(next(iter(loader)))
        return out

    (a1, ya1), (a2, ya2) = epochs(0)
    (b1, yb1), (b2, yb2) = epochs(0)
    (c1, yc1), _ = epochs(1)
    assert torch.equal(a1, b1) and torch.equal(ya1, yb1)
    assert torch.equal(a2, b2)
    assert not torch.equal(a1, c1)
    assert not torch.equal(a1, a2)  # epochs differ (shuffle and augmentation)
    # augmentation really changes pixels: compare with the plain view of the same samples
    train = BatchLoader(d.train.pixels(), d.train.labels, tcfg, train=True, batch_size=16, dims=2, seed=0)
    batch = train.images[:16]
    plain = train.transform(batch)
    augmented = train.transform(batch, torch.Generator().manual_seed(3))
    assert augmented.shape == plain.shape == (16, 3, 32, 32)
    assert torch.equal(augmented, train.transform(batch, torch.Generator().manual_seed(3)))
    changed = (augmented - plain).flatten(1).abs().amax(dim=1) > 1e-4
    assert changed.sum() >= 12  # a draw per sample: (nearly) every image is cropped or flipped


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_batched_augmentation_on_the_device_is_seeded_per_sample_and_in_range(device: str) -> None:
    """Crops and flips of a whole batch at once: the same generator seed gives the same batch (on
    any device), each sample gets its own draw, values stay in the images' range, and a crop of
    the whole image without a flip is the identity."""
    from ttl_search.data.transforms import augment_batch, crop_boxes

    g = torch.Generator().manual_seed(0)
    images = torch.rand((64, 1, 32, 32), generator=g).to(device)
    tcfg = TransformConfig(input_size=32, in_channels=1, mean=(0.5,), std=(0.5,), crop_scale=(0.3, 1.0))
    out = augment_batch(images, tcfg, 2, torch.Generator().manual_seed(7))
    assert out.shape == images.shape and out.device.type == device
    assert torch.equal(out, augment_batch(images, tcfg, 2, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, augment_batch(images, tcfg, 2, torch.Generator().manual_seed(8)))
    assert 0 <= out.min() and out.max() <= 1
    boxes = crop_boxes(4096, 32, 32, (0.3, 1.0), torch.Generator().manual_seed(1))
    top, left, h, w = boxes.unbind(1)
    assert (h >= 1).all() and (w >= 1).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    assert area.min() >= 0.3 - 0.05 and area.max() <= 1.0 and 0.55 < area.mean() < 0.75  # ~ U(0.3, 1)
    assert len({tuple(b) for b in boxes.tolist()}) > 1000  # a draw per sample
    whole = TransformConfig(input_size=32, in_channels=1, mean=(0.5,), std=(0.5,), crop_scale=(1.0, 1.0),
                            hflip=False)
    # aspect ratios other than 1 cannot cover the whole image at scale 1: such tries fall back to it
    torch.testing.assert_close(augment_batch(images, whole, 2, torch.Generator().manual_seed(2)), images,
                               atol=1e-5, rtol=0)
    volumes = torch.rand((16, 1, 8, 8, 8), generator=g).to(device)
    flipped = augment_batch(volumes, tcfg, 3, torch.Generator().manual_seed(4))
    # the same values, moved: compared sorted, not summed (a sum's rounding depends on the order)
    assert flipped.shape == volumes.shape and torch.equal(flipped.flatten().sort()[0], volumes.flatten().sort()[0])
    assert any(not torch.equal(a, b) for a, b in zip(flipped, volumes))
    for a, b in zip(flipped, volumes):  # each volume is itself flipped along some of its axes
        assert any(torch.equal(a, b.flip(axes)) for axes in ([], [1], [2], [3], [1, 2], [1, 3], [2, 3], [1, 2, 3]))


def test_training_batches_live_on_the_loader_device(breastmnist: Path) -> None:
    d = load_data(cfg_for(breastmnist))
    loader = make_loader(d.train, TransformConfig(input_size=32), train=True, batch_size=16, seed=0, dims=2,
                         device="cpu")
    assert loader.images.dtype == torch.uint8 and loader.images.shape[-2:] == (32, 32)
    assert len(loader) == -(-len(d.train.labels) // 16)
    seen = torch.cat([y for _, y in loader])
    assert torch.equal(seen.sort()[0], d.train.labels.sort()[0])  # every sample once per epoch


def test_a_split_kept_on_the_host_gives_the_same_batches_on_the_device(breastmnist: Path) -> None:
    """``store="host"`` (a split too large for the trial's share of the GPU) keeps the images in
    host memory and copies each batch to the device: the batches are those of ``store="device"``
    (here the device is the CPU; on CUDA the host copy is pinned)."""
    d = load_data(cfg_for(breastmnist))
    tcfg = TransformConfig(input_size=32)
    made = {store: make_loader(d.train, tcfg, train=True, batch_size=64, seed=3, dims=2, store=store)
            for store in ("device", "host")}
    assert made["host"].store == "host" and made["host"].images.device.type == "cpu"
    for (xa, ya), (xb, yb) in zip(made["device"], made["host"]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ConfigError, match="store must be one of device, host"):
        make_loader(d.val, tcfg, train=False, batch_size=64, seed=0, dims=2, store="disk")


def test_3d_loader(adrenalmnist3d: Path) -> None:
    d = load_data(DataConfig(dataset="adrenalmnist3d", path=str(adrenalmnist3d)))
    tcfg = TransformConfig(input_size=32, in_channels=1, mean=(0.5,), std=(0.5,))
    x, y = next(iter(make_loader(d.train, tcfg, train=True, batch_size=8, seed=0, dims=3)))
    assert x.shape == (8, 1, 32, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    assert -1 - 1e-6 <= x.min() and x.max() <= 1 + 1e-6
    again = next(iter(make_loader(d.train, tcfg, train=True, batch_size=8, seed=0, dims=3)))[0]
    assert torch.equal(x, again)
    x3, _ = next(iter(make_loader(d.test, TransformConfig(32), train=False, batch_size=4, seed=0, dims=3)))
    assert x3.shape == (4, 3, 32, 32, 32)


def test_rgb_to_one_channel_and_channel_errors() -> None:
    images = torch.zeros((2, 3, 8, 8), dtype=torch.uint8)
    images[:, 0] = 255
    split = Split(images, torch.tensor([0, 1]))
    tcfg = TransformConfig(input_size=8, in_channels=1, mean=(0.0,), std=(1.0,), augment=False)
    x, _ = next(iter(make_loader(split, tcfg, train=True, batch_size=2, seed=0, dims=2)))
    assert x.shape == (2, 1, 8, 8)
    torch.testing.assert_close(x, torch.full_like(x, 1 / 3))
    with pytest.raises(ConfigError, match="cannot map 3-channel images"):
        make_loader(split, TransformConfig(input_size=8, in_channels=2, mean=(0.0,), std=(1.0,)),
                    train=False, batch_size=2, seed=0, dims=2)
    with pytest.raises(ConfigError, match="transform.mean has 3 values"):
        TransformConfig(input_size=8, in_channels=1)
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader(split, TransformConfig(input_size=8), train=False, batch_size=0, seed=0, dims=2)
