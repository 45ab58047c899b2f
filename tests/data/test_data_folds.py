"""k-fold cross-validation of the data (``DataConfig.folds`` / ``DataConfig.fold``): the real
BreastMNIST file (546 train / 78 val / 156 test) from ../shared/datasets, tiny npz and CSV data
made in tmp_path for the error cases."""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ttl_search.data import DataConfig, DatasetSplits, Split, load_data
from ttl_search.errors import ConfigError

POOLED = 546 + 78  # BreastMNIST train + val
POOLED_COUNTS = [147 + 21, 399 + 57]  # per class: malignant, normal/benign


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _load(path: str, **kw) -> DatasetSplits:
    """BreastMNIST loaded once per (path, settings); the tests only read the result."""
    return load_data(DataConfig(path=path, **kw))


def load(path: Path, **kw) -> DatasetSplits:
    return _load(str(path), **kw)


def sample_keys(split: Split) -> Counter:
    """Multiset of (content hash, label) of a split's samples (BreastMNIST has a duplicate image,
    so a multiset, not a set)."""
    return Counter(
        (hashlib.sha1(img.numpy().tobytes()).hexdigest(), int(label))
        for img, label in zip(split.pixels(), split.labels)
    )


def write_npz(path: Path, labels: dict[str, np.ndarray], shape=(28, 28)) -> Path:
    """A MedMNIST-like npz with the given labels per split ((N, 1) or (N, L) uint8)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, y in labels.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (len(y), *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = y.astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return path


def column(values) -> np.ndarray:
    return np.asarray(values)[:, None]


# --------------------------------------------------------------------------- BreastMNIST


def test_default_is_no_cross_validation(breastmnist: Path) -> None:
    cfg = DataConfig(path=str(breastmnist))
    assert (cfg.folds, cfg.fold) == (1, 0)
    d = load(breastmnist)
    assert (len(d.train), len(d.val), len(d.test)) == (546, 78, 156)


def test_val_folds_partition_train_plus_val(breastmnist: Path) -> None:
    base = load(breastmnist)
    pooled = sample_keys(base.train) + sample_keys(base.val)
    assert sum(pooled.values()) == POOLED
    vals = [sample_keys(load(breastmnist, folds=3, fold=f).val) for f in range(3)]
    # the union of the validation folds is exactly train + val (as a multiset: no sample twice)
    assert vals[0] + vals[1] + vals[2] == pooled
    # pairwise disjoint (samples whose image occurs once in train + val)
    unique = {k for k, n in pooled.items() if n == 1}
    for i in range(3):
        for j in range(i + 1, 3):
            assert not (set(vals[i]) & set(vals[j]) & unique), f"folds {i} and {j} share samples"
    # each fold's training split is the rest of train + val
    for f in range(3):
        d = load(breastmnist, folds=3, fold=f)
        assert sample_keys(d.train) + vals[f] == pooled
        assert not (set(sample_keys(d.train)) & set(vals[f]) & unique)


@pytest.mark.parametrize("k", [3, 5])
def test_folds_are_balanced_and_stratified(breastmnist: Path, k: int) -> None:
    sizes, per_class = [], []
    for f in range(k):
        d = load(breastmnist, folds=k, fold=f)
        assert len(d.train) + len(d.val) == POOLED
        sizes.append(len(d.val))
        counts = torch.bincount(d.val.labels, minlength=2).tolist()
        per_class.append(counts)
        # every class is split as evenly as it can be: floor or ceil of n_c / k per fold
        for c, n in enumerate(POOLED_COUNTS):
            assert counts[c] in (n // k, -(-n // k)), (f, c, counts)
        assert torch.bincount(d.train.labels, minlength=2).tolist() == [
            n - m for n, m in zip(POOLED_COUNTS, counts)
        ]
    assert max(sizes) - min(sizes) <= 2  # at most the number of classes
    assert [sum(col) for col in zip(*per_class)] == POOLED_COUNTS
    if k == 3:  # 168 and 456 divide by 3: identical folds
        assert per_class == [[56, 152]] * 3


def test_test_split_is_untouched(breastmnist: Path) -> None:
    base = load(breastmnist)
    for kw in ({"folds": 3, "fold": 0}, {"folds": 3, "fold": 2}, {"folds": 5, "fold": 4, "seed": 7},
               {"folds": 3, "fold": 1, "train_fraction": 0.5}):
        d = load(breastmnist, **kw)
        assert torch.equal(d.test.pixels(), base.test.pixels()), kw
        assert torch.equal(d.test.labels, base.test.labels), kw


def test_fold_assignment_is_seeded(breastmnist: Path) -> None:
    a = load_data(DataConfig(path=str(breastmnist), folds=3, fold=1, seed=3))
    b = load_data(DataConfig(path=str(breastmnist), folds=3, fold=1, seed=3))
    c = load_data(DataConfig(path=str(breastmnist), folds=3, fold=1, seed=4))
    assert torch.equal(a.val.pixels(), b.val.pixels()) and torch.equal(a.val.labels, b.val.labels)
    assert torch.equal(a.train.pixels(), b.train.pixels()) and torch.equal(a.train.labels, b.train.labels)
    assert sample_keys(a.val) != sample_keys(c.val)
    assert sample_keys(a.train) != sample_keys(c.train)
    # another seed still gives stratified folds of the same sizes
    assert torch.bincount(c.val.labels).tolist() == [56, 152]
    # and the folds are not simply the dataset's own validation split
    base = load(breastmnist)
    assert sample_keys(a.val) != sample_keys(base.val)


def test_train_fraction_applies_after_folding(breastmnist: Path) -> None:
    folded = load(breastmnist, folds=3, fold=1)
    sub = load(breastmnist, folds=3, fold=1, train_fraction=0.25)
    # validation is the whole fold; only the fold's training split is subsampled
    assert torch.equal(sub.val.pixels(), folded.val.pixels()) and torch.equal(sub.val.labels, folded.val.labels)
    assert torch.bincount(sub.train.labels).tolist() == [28, 76]  # round(0.25 * 112), round(0.25 * 304)
    kept, folded_train = sample_keys(sub.train), sample_keys(folded.train)
    assert all(folded_train[key] >= n for key, n in kept.items())  # a subset of the fold's train
    assert not (set(kept) & set(sample_keys(folded.val)))


# --------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"folds": 3, "fold": 3}, r"data\.fold must be an integer in 0\.\.2"),
        ({"folds": 3, "fold": 7}, r"data\.fold must be an integer in 0\.\.2"),
        ({"folds": 3, "fold": -1}, r"data\.fold must be an integer in 0\.\.2"),
        ({"fold": 1}, r"data\.fold must be an integer in 0\.\.0"),
        ({"folds": 2, "fold": 0.5}, r"data\.fold must be an integer"),
        ({"folds": 0}, r"data\.folds must be a positive integer"),
        ({"folds": -2}, r"data\.folds must be a positive integer"),
        ({"folds": 2.0}, r"data\.folds must be a positive integer"),
        ({"folds": True}, r"data\.folds must be a positive integer"),
    ],
)
def test_bad_fold_settings(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DataConfig(**kw)


def test_valid_fold_settings() -> None:
    assert (DataConfig(folds=5, fold=4).folds, DataConfig(folds=5, fold=4).fold) == (5, 4)
    assert DataConfig(folds=np.int64(3), fold=np.int64(2)).fold == 2


def test_more_folds_than_the_rarest_class(tmp_path: Path) -> None:
    # class 1 has 2 samples in train + val (1 + 1), plenty in test
    path = write_npz(tmp_path / "tiny.npz", {
        "train": column([0] * 10 + [1]), "val": column([0] * 4 + [1]), "test": column([0, 1] * 4)})
    with pytest.raises(ConfigError) as err:
        load_data(DataConfig(path=str(path), verify_md5=False, folds=3, fold=0))
    msg = str(err.value)
    assert "rarest class has 2 samples" in msg and "3 folds" in msg and "selection.folds" in msg
    # as many folds as the rarest class has samples works: one of them in every fold
    for fold in range(2):
        d = load_data(DataConfig(path=str(path), verify_md5=False, folds=2, fold=fold))
        assert torch.bincount(d.val.labels).tolist()[1] == 1
        assert torch.bincount(d.train.labels).tolist()[1] == 1
        assert len(d.train) + len(d.val) == 16 and len(d.test) == 8


def test_folds_reject_multi_label_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 2, (n, 14)) for s, n in (("train", 20), ("val", 6), ("test", 8))}
    path = write_npz(tmp_path / "chest.npz", labels)
    with pytest.raises(ConfigError, match="single-label"):
        load_data(DataConfig(dataset="chestmnist", path=str(path), verify_md5=False, folds=2, fold=1))
    # without folds the same file loads
    assert len(load_data(DataConfig(dataset="chestmnist", path=str(path), verify_md5=False)).val) == 6


def _grouped_manifest(tmp_path: Path) -> tuple[Path, dict[bytes, str]]:
    """30 patients, 3 images each (every third patient a tumour): (manifest, pixels -> patient)."""
    rows, owner = [], {}
    (tmp_path / "img").mkdir()
    for patient in range(30):
        for k in range(3):
            name = f"img/p{patient}_{k}.png"
            arr = np.random.default_rng(patient * 10 + k).integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(arr, mode="L").save(tmp_path / name)
            label = "tumour" if patient % 3 == 0 else "normal"
            rows.append(f"{name},{label},P{patient:03d}")
            owner[arr.tobytes()] = f"P{patient:03d}"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,group\n" + "\n".join(rows) + "\n")
    return manifest, owner


def test_folds_of_csv_data_partition_train_plus_val(tmp_path: Path) -> None:
    manifest, owner = _grouped_manifest(tmp_path)
    base = load_data(DataConfig(dataset="csv", path=str(manifest), image_size=8))
    pooled = {img[0].numpy().tobytes() for img in torch.cat([base.train.pixels(), base.val.pixels()])}
    vals = []
    for fold in range(3):
        d = load_data(DataConfig(dataset="csv", path=str(manifest), image_size=8, folds=3, fold=fold))
        assert torch.equal(d.test.pixels(), base.test.pixels())
        vals.append({img[0].numpy().tobytes() for img in d.val.pixels()})
        assert len(vals[-1]) == len(d.val)
    assert set().union(*vals) == pooled and sum(map(len, vals)) == len(pooled)


def test_folds_keep_groups_together(tmp_path: Path) -> None:
    manifest, owner = _grouped_manifest(tmp_path)
    for fold in range(3):
        d = load_data(DataConfig(dataset="csv", path=str(manifest), image_size=8, folds=3, fold=fold))
        groups = {name: {owner[img[0].numpy().tobytes()] for img in getattr(d, name).pixels()}
                  for name in ("train", "val", "test")}
        assert not groups["train"] & groups["val"], f"fold {fold}: patients in train and val"
        assert not groups["test"] & (groups["train"] | groups["val"])
