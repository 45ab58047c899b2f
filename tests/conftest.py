"""Shared fixtures: paths to the real data in ../shared, and the gpu marker's auto-skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(
    os.environ.get("TTL_SEARCH_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets")
)


def pytest_configure(config) -> None:
    """Folder and manifest data decode into a data cache of this test session, not the user's
    (processes the tests start, Ray workers included, inherit it)."""
    if "TTL_SEARCH_CACHE" not in os.environ:
        import tempfile

        os.environ["TTL_SEARCH_CACHE"] = tempfile.mkdtemp(prefix="ttl-search-test-cache-")


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


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> tuple[str, str]:
    """(name, storage URL) of a finished debug study with the full and linear-probe baselines,
    built once per test session; the analysis, report and export tests share it."""
    from ttl_search.run.driver import run_study
    from ttl_search.search.study import load_study_config

    shared_file("breastmnist.npz")
    root = tmp_path_factory.mktemp("debug-study")
    url = f"sqlite:///{root / 's.db'}"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    run_study(load_study_config(REPO_ROOT / "studies" / "debug.yaml", [
        f"storage={url}", f"trial.data.root={SHARED_DATASETS}", "baselines=[full, linear_probe]", "name=debug"]))
    return "debug", url


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if "study" in getattr(item, "fixturenames", ()):  # runs a whole study on a local Ray first
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.integration)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
