"""Shared fixtures: paths to the real data in ../shared, and the gpu marker's auto-skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(
    os.environ.get("TTL_SEARCH_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets")
)


def shared_file(name: str) -> Path:
    """Path of a real MedMNIST file in ../shared/datasets; skips the test when it is absent."""
    path = SHARED_DATASETS / name
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (expected ../shared/datasets beside the repo)")
    return path


@pytest.fixture
def breastmnist() -> Path:
    return shared_file("breastmnist.npz")


@pytest.fixture
def pneumoniamnist() -> Path:
    return shared_file("pneumoniamnist.npz")


@pytest.fixture
def adrenalmnist3d() -> Path:
    return shared_file("adrenalmnist3d.npz")


@pytest.fixture
def shared_datasets_dir() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real data directory {SHARED_DATASETS} is absent")
    return SHARED_DATASETS


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
