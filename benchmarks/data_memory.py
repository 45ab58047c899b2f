"""Benchmark: a trial's memory and images/s with folder data read from the on-disk data cache
(``data.cache: true``, the default for folder and manifest data) against decoding it into each
trial's memory (``data.cache: false``, the only way before the cache).

Data: real MedMNIST images (RetinaMNIST's 1,600 RGB fundus images by default) written once as
PNG files and hard-linked under other names until the folder holds ``--images`` files (and a
second folder of ``--small`` files, to show whether memory grows with the dataset). Each is
decoded at ``--size`` px RGB (224: 150 KB an image, as an ImageNet model takes it) and split
0.7/0.1/0.2.

Every measured trial is its own process (as a Ray worker is): it loads the data, then runs one
:func:`~ttl_search.train.trial.run_trial` (tiny ``test_cnn`` truncated after its stem, so that the
data path, not the model, decides the speed) for ``--epochs`` epochs. The cache is built once
beforehand, by a process of its own (as a study's driver does in its checks), and timed.
Per row: the trial processes at once (1, or 2 sharing the CPU), peak RSS (the kernel's high-water
mark ``VmHWM``: the largest of the concurrent processes, and their sum for the node), peak private
memory (``RssAnon``, sampled every 0.1 s: what the process alone holds, without the page cache it
shares), the time to load the data, and training
images/s (training images x epochs / training time, the per-epoch validation included), summed
over concurrent trials. Cache and in-memory runs alternate, so a busy machine slows both alike.

    python benchmarks/data_memory.py                          # 20,000 and 5,000 images at 224 px
    python benchmarks/data_memory.py --images 2000 --small 500 --size 64 --epochs 1   # a quick look

Goals (issue 29): memory flat in the dataset's size, and images/s from the cache at least 0.95x
the in-memory path's. The last line is ``ratio: X`` (the smallest cache/in-memory images/s ratio)
and ``flat: yes|no``. Writes ``benchmarks/out/data_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TTL_SEARCH_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


def write_folder(root: Path, npz: Path, count: int) -> Path:
    """An ImageFolder tree of ``count`` PNG files: ``npz``'s real images written once, then hard
    links under other names (the decoder reads each path as a file of its own)."""
    import numpy as np
    from PIL import Image

    if root.exists() and sum(1 for _ in root.rglob("*.png")) == count:
        return root
    data = np.load(npz)
    images = np.concatenate([data[f"{s}_images"] for s in ("train", "val", "test")])
    labels = np.concatenate([data[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
    originals = root.parent / f"{root.name}-originals"
    originals.mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        path = originals / f"{i:05d}-{label}.png"
        if not path.exists():
            Image.fromarray(image, "RGB" if image.ndim == 3 else "L").save(path)
    for i in range(count):
        j = i % len(images)
        folder = root / f"class{labels[j]}"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / f"{i:06d}.png"
        if not link.exists():
            os.link(originals / f"{j:05d}-{labels[j]}.png", link)
    return root


def child(args: argparse.Namespace) -> None:
    """One trial in this process; prints a JSON line."""
    import torch

    from ttl_search.data import DataConfig, load_data
    from ttl_search.train.trial import TrialConfig, run_trial

    torch.set_num_threads(args.threads)
    data_cfg = DataConfig(dataset="folder", path=args.root, image_size=args.size, grayscale=False,
                          cache=bool(args.cache), cache_dir=args.cache_dir)
    start = time.monotonic()
    data = load_data(data_cfg)
    load_s = time.monotonic() - start
    if args.build_only:
        print(json.dumps({"load_s": load_s}), flush=True)
        return
    cfg = TrialConfig(backbone="test_cnn", strategy="ttl", cut=1, input_size=args.size, data=data_cfg,
                      max_epochs=args.epochs, batch_size=64, eval_batch_size=256, seed=0, threads=args.threads,
                      early_stopping=0, latency_repeats=0)
    result = run_trial(cfg, data=data)
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"load_s": load_s, "status": result.status, "reason": result.reason,
                      "train_images": len(data.train), "train_time_s": result.train_time_s,
                      "epochs": len(result.history) if result.history else args.epochs,
                      "peak_rss_mb": hwm / 1024}), flush=True)


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_trials(args: argparse.Namespace, root: Path, cache: bool, concurrent: int, cache_dir: str,
               build_only: bool = False) -> list[dict]:
    """``concurrent`` trial processes at once; their JSON lines with the sampled peak RssAnon."""
    threads = max(1, (os.cpu_count() or 1) // concurrent)
    cmd = [sys.executable, __file__, "--child", "--root", str(root), "--size", str(args.size), "--epochs",
           str(args.epochs), "--threads", str(threads), "--cache", str(int(cache)), "--cache-dir", cache_dir]
    if build_only:
        cmd.append("--build-only")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(concurrent)]
    anon = [0] * concurrent
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for i, p in enumerate(procs):
                anon[i] = max(anon[i], _status_kb(p.pid, "RssAnon"))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rows = []
    try:
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=args.timeout)
            if p.returncode != 0:
                raise SystemExit(f"trial process failed ({p.returncode}):\n{err[-3000:]}")
            rows.append({**json.loads(out.strip().splitlines()[-1]), "peak_anon_mb": anon[i] / 1024})
    finally:
        done.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000, help="images of the large folder (default 20000)")
    parser.add_argument("--small", type=int, default=5000, help="images of the small folder (default 5000)")
    parser.add_argument("--size", type=int, default=224, help="decoded and input size in px (default 224)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial (default 1)")
    parser.add_argument("--data", type=Path, default=SHARED / "retinamnist.npz", help="MedMNIST .npz of the images")
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "out" / "data_memory")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per trial process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: not found; give --data a MedMNIST .npz (or set TTL_SEARCH_SHARED_DATASETS)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ttl-cache-", dir=args.workdir) as cache_dir:
        for count, concurrencies in ((args.small, (1,)), (args.images, (1, 2))):
            root = write_folder(args.workdir / f"folder-{count}", args.data, count)
            start = time.monotonic()
            build = run_trials(args, root, True, 1, cache_dir, build_only=True)[0]
            size_mb = sum(f.stat().st_size for f in Path(cache_dir).rglob("*.npy")) / 2**20
            print(f"{count} images: cache built in {time.monotonic() - start:.1f} s ({build['load_s']:.1f} s "
                  f"loading), {size_mb:.0f} MB on disk", flush=True)
            for concurrent in concurrencies:
                for cache in (False, True):
                    trials = run_trials(args, root, cache, concurrent, cache_dir)
                    for t in trials:
                        if t["status"] != "complete":
                            raise SystemExit(f"a trial failed: {t['reason']}")
                    speed = sum(t["train_images"] * t["epochs"] / t["train_time_s"] for t in trials)
                    rows.append({"images": count, "path": "cache" if cache else "in memory", "trials": concurrent,
                                 "peak_rss_mb": max(t["peak_rss_mb"] for t in trials),
                                 "peak_private_mb": max(t["peak_anon_mb"] for t in trials),
                                 "node_peak_rss_mb": sum(t["peak_rss_mb"] for t in trials),
                                 "load_s": max(t["load_s"] for t in trials), "images_per_s": speed})
                    r = rows[-1]
                    print(f"  {r['path']:>9}, {concurrent} trial(s): peak RSS {r['peak_rss_mb']:.0f} MB, private "
                          f"{r['peak_private_mb']:.0f} MB, load {r['load_s']:.1f} s, {speed:.0f} images/s",
                          flush=True)
    import pandas as pd

    table = pd.DataFrame(rows)
    print()
    print(table.to_markdown(index=False, floatfmt=".1f"))
    ratios = []
    for (count, trials), group in table.groupby(["images", "trials"]):
        speeds = dict(zip(group["path"], group["images_per_s"]))
        ratios.append(speeds["cache"] / speeds["in memory"])
        print(f"{count} images, {trials} trial(s): cache/in-memory images/s {ratios[-1]:.2f}")
    cached = table[(table.path == "cache") & (table.trials == 1)].set_index("images")["peak_rss_mb"]
    memory = table[(table.path == "in memory") & (table.trials == 1)].set_index("images")["peak_rss_mb"]
    growth_cache = cached[args.images] / cached[args.small]
    growth_memory = memory[args.images] / memory[args.small]
    flat = growth_cache < 1.15
    print(f"peak RSS from {args.small} to {args.images} images: cache x{growth_cache:.2f}, "
          f"in memory x{growth_memory:.2f}")
    out = REPO / "benchmarks" / "out" / "data_memory.json"
    out.write_text(json.dumps({"rows": rows, "ratios": ratios, "args": {k: str(v) for k, v in vars(args).items()}},
                              indent=1))
    print(f"ratio: {min(ratios):.2f}")
    print(f"flat: {'yes' if flat else 'no'}")


if __name__ == "__main__":
    main()
