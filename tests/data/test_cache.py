"""The on-disk data cache: folder and manifest images decoded once into a memory-mapped array that
gives the same pixels, batches and metrics as decoding into memory; invalidated by a changed file
or setting; never used half-written (a build killed with SIGKILL); built once by concurrent
processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ttl_search.data import DataConfig, TransformConfig, load_data, make_loader
from ttl_search.data.cache import IMAGES_FILE, META_FILE, cache_dir
from ttl_search.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def write_real_pngs(root: Path, npz: Path, per_class: int, *, rgb_every: int = 0, splits: bool = False,
                    copies: int = 1) -> Path:
    """BreastMNIST's real training images as an ImageFolder tree (``rgb_every``: every n-th image
    saved as RGB, its channels three different real images; ``copies``: each file written that many
    times under other names)."""
    from PIL import Image

    data = np.load(npz)
    images, labels = data["train_images"], data["train_labels"][:, 0]
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)[:per_class]
        for j, i in enumerate(idx):
            split = ("train", "train", "train", "val", "test")[j % 5] if splits else ""
            folder = root / split / f"class{cls}"
            folder.mkdir(parents=True, exist_ok=True)
            if rgb_every and j % rgb_every == rgb_every - 1:
                rgb = np.stack([images[i], images[(i + 1) % len(images)], images[(i + 2) % len(images)]], -1)
                Image.fromarray(rgb, "RGB").save(folder / f"{j:05d}.png")
            else:
                Image.fromarray(images[i], "L").save(folder / f"{j:05d}.png")
            for copy in range(1, copies):
                (folder / f"{j:05d}-{copy}.png").write_bytes((folder / f"{j:05d}.png").read_bytes())
    return root


def entries(cfg: DataConfig) -> list[Path]:
    root = cache_dir(cfg)
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("TTL_SEARCH_CACHE", str(folder))
    return folder


@pytest.mark.parametrize("grayscale", [None, True, False])
def test_cached_and_in_memory_give_the_same_pixels(tmp_path: Path, cache: Path, breastmnist: Path, grayscale) -> None:
    # every 4th image RGB: the auto channel decision widens the cache at the first RGB image
    root = write_real_pngs(tmp_path / "imgs", breastmnist, per_class=12, rgb_every=4)
    common = dict(dataset="folder", path=str(root), image_size=20, grayscale=grayscale, seed=3)
    mapped, memory = load_data(DataConfig(**common)), load_data(DataConfig(**common, cache=False))
    assert mapped.train.rows is not None and memory.train.rows is None
    assert mapped.channels == memory.channels == (1 if grayscale else 3)
    for name in ("train", "val", "test"):
        a, b = getattr(mapped, name), getattr(memory, name)
        assert torch.equal(a.pixels(), b.pixels()) and torch.equal(a.labels, b.labels), name
    (entry,) = entries(DataConfig(**common))
    assert np.load(entry / IMAGES_FILE, mmap_mode="r").shape == (24, mapped.channels, 20, 20)


def test_folds_and_train_fraction_select_rows_without_copying(tmp_path: Path, cache: Path, breastmnist: Path) -> None:
    root = write_real_pngs(tmp_path / "imgs", breastmnist, per_class=15)
    common = dict(dataset="folder", path=str(root), image_size=16, folds=3, fold=1, train_fraction=0.5)
    mapped, memory = load_data(DataConfig(**common)), load_data(DataConfig(**common, cache=False))
    for name in ("train", "val", "test"):
        a, b = getattr(mapped, name), getattr(memory, name)
        assert a.images is mapped.train.images, "a mapped split keeps the one cached array"
        assert torch.equal(a.pixels(), b.pixels()) and torch.equal(a.labels, b.labels), name


@pytest.mark.parametrize("input_size", [16, 24])
def test_mapped_batches_equal_in_memory_batches(tmp_path: Path, cache: Path, breastmnist: Path,
                                                input_size: int) -> None:
    """Training (shuffled, augmented) and evaluation batches, with the cache at the input size and
    at another size (then each batch is resized as it is read)."""
    root = write_real_pngs(tmp_path / "imgs", breastmnist, per_class=20, splits=True)
    common = dict(dataset="folder", path=str(root), image_size=16)
    mapped, memory = load_data(DataConfig(**common)), load_data(DataConfig(**common, cache=False))
    tcfg = TransformConfig(input_size, in_channels=3)
    for name, train in (("train", True), ("val", False)):
        loaders = [make_loader(getattr(d, name), tcfg, train=train, batch_size=5, seed=7, dims=2)
                   for d in (mapped, memory)]
        assert loaders[0].rows is not None and loaders[1].rows is None
        for epoch in range(2):
            for (xa, ya), (xb, yb) in zip(*loaders, strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb), (name, epoch)


def test_a_trial_from_the_cache_gives_the_same_metrics(tmp_path: Path, cache: Path, breastmnist: Path) -> None:
    from ttl_search.train.trial import TrialConfig, run_trial

    root = write_real_pngs(tmp_path / "imgs", breastmnist, per_class=16, splits=True)
    common = dict(backbone="test_cnn", strategy="ttl", cut=2, max_epochs=2, batch_size=8, seed=0, threads=1)
    results = [run_trial(TrialConfig(**common, data=DataConfig(dataset="folder", path=str(root), image_size=32,
                                                                cache=cached)))
               for cached in (True, False)]
    assert results[0].status == results[1].status == "complete"
    assert results[0].val == results[1].val and results[0].test == results[1].test


def test_a_changed_file_or_setting_invalidates_its_entry(tmp_path: Path, cache: Path, breastmnist: Path) -> None:
    from PIL import Image

    root = write_real_pngs(tmp_path / "imgs", breastmnist, per_class=6)
    cfg = DataConfig(dataset="folder", path=str(root), image_size=16, seed=1)
    first = load_data(cfg)
    (entry,) = entries(cfg)
    built = (entry / META_FILE).stat().st_mtime_ns
    again = load_data(cfg)  # read back: nothing rebuilt
    assert entries(cfg) == [entry] and (entry / META_FILE).stat().st_mtime_ns == built
    assert torch.equal(again.train.pixels(), first.train.pixels())

    changed = sorted((root / "class0").iterdir())[0]
    Image.fromarray(np.full((28, 28), 255, np.uint8), "L").save(changed)
    later = time.time() + 5
    os.utime(changed, (later, later))
    fresh = load_data(cfg)
    (new_entry,) = entries(cfg)  # the outdated entry of the same data and settings is gone
    assert new_entry != entry
    assert torch.equal(fresh.train.pixels(), load_data(DataConfig(**{**cfg.__dict__, "cache": False})).train.pixels())
    assert int(fresh.train.pixels().max()) == 255 or int(fresh.val.pixels().max()) == 255 or \
        int(fresh.test.pixels().max()) == 255

    load_data(DataConfig(dataset="folder", path=str(root), image_size=12, seed=1))
    assert len(entries(cfg)) == 2, "another image_size is another entry; both stay"
    load_data(DataConfig(dataset="folder", path=str(root), image_size=16, seed=5, val_fraction=0.2))
    assert len(entries(cfg)) == 2, "splits and seeds do not change the pixels: the entry is shared"


def test_an_unreadable_entry_is_rebuilt(tmp_path: Path, cache: Path, breastmnist: Path) -> None:
    root = write_real_pngs(tmp_path / "imgs", breastmnist, per_class=6)
    cfg = DataConfig(dataset="folder", path=str(root), image_size=16)
    expected = load_data(cfg).train.pixels().clone()
    (entry,) = entries(cfg)
    images = entry / IMAGES_FILE
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])  # truncated
    assert torch.equal(load_data(cfg).train.pixels(), expected)
    assert np.load(entry / IMAGES_FILE).shape[0] == 12


_BUILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from ttl_search.data import DataConfig, load_data
d = load_data(DataConfig(dataset="folder", path=sys.argv[1], image_size=int(sys.argv[2])))
print(int(d.train.pixels().sum()))
"""


def _build_process(root: Path, size: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _BUILD, str(root), str(size)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_a_build_killed_half_way_is_never_used(tmp_path: Path, cache: Path, breastmnist: Path) -> None:
    """SIGKILL a process while it writes the cache: no entry appears; the next load removes the
    unfinished build, builds a complete entry and gives the in-memory pixels."""
    root = write_real_pngs(tmp_path / "imgs", breastmnist, per_class=140, copies=10)
    size = 224  # 2,800 images: seconds to build, caught half-way
    proc = _build_process(root, size)
    deadline = time.monotonic() + 120
    try:
        while not any(cache.glob(".*.tmp-*/" + IMAGES_FILE)):
            assert proc.poll() is None and time.monotonic() < deadline, "the build was not caught half-way"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    cfg = DataConfig(dataset="folder", path=str(root), image_size=size)
    assert proc.returncode == -signal.SIGKILL and entries(cfg) == [], "a half-written cache is never in place"
    assert list(cache.glob(".*.tmp-*"))
    d = load_data(cfg)
    assert not list(cache.glob(".*.tmp-*")) and len(entries(cfg)) == 1
    assert torch.equal(d.test.pixels(), load_data(DataConfig(**{**cfg.__dict__, "cache": False})).test.pixels())


@pytest.mark.slow
def test_concurrent_processes_build_the_entry_once(tmp_path: Path, cache: Path, breastmnist: Path) -> None:
    root = write_real_pngs(tmp_path / "imgs", breastmnist, per_class=100)
    procs = [_build_process(root, 64) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    builds = sum(err.count("into the cache") for _, err in outs)
    reads = sum(err.count("from the cache") for _, err in outs)
    assert builds == 1 and reads == 1, [err for _, err in outs]
    assert outs[0][0] == outs[1][0]


def test_an_unwritable_cache_folder_is_a_clear_error(tmp_path: Path, breastmnist: Path) -> None:
    root = write_real_pngs(tmp_path / "imgs", breastmnist, per_class=3)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError) as err:
        load_data(DataConfig(dataset="folder", path=str(root), cache_dir=str(blocker / "cache")))
    msg = str(err.value)
    assert "data cache folder" in msg and "data.cache_dir" in msg and "data.cache: false" in msg


def test_cache_settings_are_checked() -> None:
    from ttl_search.errors import ConfigError

    with pytest.raises(ConfigError, match="data.cache must be true or false"):
        DataConfig(dataset="folder", path="x", cache="yes")
    with pytest.raises(ConfigError, match="data.cache_dir"):
        DataConfig(dataset="folder", path="x", cache_dir="  ")


def test_cached_rows_copied_to_a_device_store_chunk_by_chunk(tmp_path: Path, cache: Path, breastmnist: Path) -> None:
    """The GPU store's copy of a cached split (here to the CPU: the same code path, no card here)."""
    from ttl_search.data.transforms import _copy_rows, resize_images

    root = write_real_pngs(tmp_path / "imgs", breastmnist, per_class=10)
    d = load_data(DataConfig(dataset="folder", path=str(root), image_size=16))
    copied = _copy_rows(d.train.images, d.train.rows, 24, 2, torch.device("cpu"))
    assert torch.equal(copied, resize_images(d.train.pixels(), 24, 2))


def test_a_full_disk_is_a_clear_error_and_leaves_no_partial_entry(tmp_path: Path, breastmnist: Path) -> None:
    """A cache folder on a 64 KiB tmpfs (needs root to mount; skipped otherwise)."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        root = write_real_pngs(tmp_path / "imgs", breastmnist, per_class=20)
        with pytest.raises(DataError) as err:
            load_data(DataConfig(dataset="folder", path=str(root), image_size=64, cache_dir=str(small)))
        msg = str(err.value)
        assert "cannot write the data cache entry" in msg and "No space left on device" in msg
        assert "data.cache: false" in msg
        assert [p.name for p in small.iterdir() if not p.name.endswith(".lock")] == []
    finally:
        assert subprocess.run(["umount", str(small)]).returncode == 0, "a file in the cache folder is still open"
