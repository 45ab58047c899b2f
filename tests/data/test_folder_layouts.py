"""ImageFolder split folders under their usual names (any case), which folder became which split,
and the refusals: two folders for one split, a stray folder beside the splits."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ttl_search.data import DataConfig, load_data
from ttl_search.errors import ConfigError, DataError

VALID = "train: train, training; val: val, valid, validation, dev; test: test, testing"


def make_tree(root: Path, counts: dict[str, int], classes=("benign", "malignant")) -> Path:
    """``root/<folder>/<class>/<i>.png`` with ``counts[folder]`` images per class."""
    for folder, n in counts.items():
        for c, name in enumerate(classes):
            for i in range(n):
                path = root / folder / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((6, 6), 10 * c + i, np.uint8)).save(path)
    return root


@pytest.mark.parametrize("train, val, test", [
    ("train", "validation", "test"),
    ("train", "valid", "test"),
    ("train", "dev", "test"),
    ("training", "val", "testing"),
    ("Training", "Validation", "Testing"),
    ("TRAIN", "Val", "TEST"),
])
def test_usual_split_names_are_accepted_and_logged(tmp_path: Path, caplog, train: str, val: str, test: str) -> None:
    root = make_tree(tmp_path / "set", {train: 4, val: 2, test: 3})
    with caplog.at_level(logging.INFO, logger="ttl_search.data"):
        d = load_data(DataConfig(dataset="folder", path=str(root), image_size=6))
    assert (len(d.train), len(d.val), len(d.test)) == (8, 4, 6)
    assert d.class_names == ["benign", "malignant"]
    assert f"split folders {train} -> train, {val} -> val, {test} -> test" in caplog.text


def test_without_a_validation_folder_it_is_carved_out_of_training(tmp_path: Path, caplog) -> None:
    root = make_tree(tmp_path / "set", {"Training": 10, "Testing": 3})
    with caplog.at_level(logging.INFO, logger="ttl_search.data"):
        d = load_data(DataConfig(dataset="folder", path=str(root), image_size=6, val_fraction=0.2))
    assert "split folders Training -> train, Testing -> test" in caplog.text
    assert (len(d.train), len(d.val), len(d.test)) == (16, 4, 6)


@pytest.mark.parametrize("folders, named", [
    (("train", "val", "validation", "test"), "val, validation all name the val split"),
    (("train", "Training", "test"), "Training, train all name the train split"),
    (("train", "dev", "test", "Testing"), "Testing, test all name the test split"),
])
def test_two_folders_for_one_split_are_refused(tmp_path: Path, folders, named: str) -> None:
    root = make_tree(tmp_path / "set", {f: 2 for f in folders})
    with pytest.raises(ConfigError) as err:
        load_data(DataConfig(dataset="folder", path=str(root)))
    msg = str(err.value)
    assert msg.startswith(f"{root}: folders {named}") and VALID in msg and "\n" not in msg


def test_a_stray_folder_beside_the_splits_is_named(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "set", {"train": 2, "validation": 2, "test": 2, "extra": 2})
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset="folder", path=str(root)))
    msg = str(err.value)
    assert "unexpected: extra" in msg and VALID in msg


def test_split_names_are_class_names_without_a_training_folder(tmp_path: Path) -> None:
    """Only a training-split folder makes a tree split: ``dev``/``test`` alone are classes."""
    root = tmp_path / "set"
    for c, name in enumerate(("dev", "test")):
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((6, 6), 10 * c + i, np.uint8)).save(root / name / f"{i}.png")
    d = load_data(DataConfig(dataset="folder", path=str(root), image_size=6))
    assert d.class_names == ["dev", "test"]
