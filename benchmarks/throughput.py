"""Benchmark: images/s of ttl-search's training loop against a bare PyTorch loop, and the study
orchestration's overhead.

1. **Training loop.** For each case (EfficientNet-Lite0 cut 12 at 64 px, ResNet-50 cut 12 and 17 at
   224 px) the same model, batch size and images are trained by ttl-search's own epoch
   (:func:`ttl_search.train.trial.train_epoch`: a :class:`~ttl_search.data.BatchLoader` over the
   uint8 images, batched augmentation on the device, the trial's optimizer and loss) and by a bare
   loop over pre-made normalised tensors (forward, loss, backward, step; no augmentation). The two
   alternate round by round (interleaved, so that a busy machine slows both alike); each prints its
   median images/s and the ratio. The last line is ``ratio: X``, the smallest ratio of all cases.
   On CUDA the two run with the trial's mixed precision and channels-last, and a second table gives
   two trials sharing the GPU at 0.5 each (two processes at once) against one.
2. **Orchestration**: the debug study (``studies/debug.yaml``) runs on local Ray with short trials
   (``--epochs``, default 6), then with trials about 30 s long on a 2-core CPU (``--long-epochs``,
   default 200) twice: searched in two stages (4 or 5 trials, by the winning stage) and
   exhaustively (its 7 cuts, no stage barrier). Each wall time is compared with the ideal, the sum
   of its trials' worker seconds divided by the concurrency, and with the schedule floor, the least
   time any executor could take for the same trials given the two-stage search's barrier (stage 2
   starts when stage 1 has ended): the whole call (Ray's start, the checks before the study, the
   latency pass and Ray's stop after it) and the search alone (first trial's start to last trial's
   end). The row also says where the rest went: Ray's start and stop, the first wave's worker
   start (process, imports, first data load) and a reused worker's hand-over to the next trial.
   A line per study with its goal follows (debug: wall at most 1.5x the ideal; 30-second
   trials: 1.05x).

    python benchmarks/throughput.py                       # CPU: the three cases, then the three studies
    python benchmarks/throughput.py --study-only          # only the orchestration part
    python benchmarks/throughput.py --cases lite0 --rounds 3 --no-study --compile   # torch.compile too

Weights do not change the speed: ResNet-50 starts from random weights (``weights: none``), Lite0
from its ImageNet weights. Data: BreastMNIST's training images (``--data``), resized to the input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

from ttl_search.data import DataConfig, load_data, make_loader
from ttl_search.train.device import configure_backends
from ttl_search.train.trial import (TrialConfig, amp_dtype, make_optimizer, prepare_trial, resolve_device,
                                    seed_everything, train_epoch)

HERE = Path(__file__).resolve().parent
CASES = {
    "lite0": ("efficientnet_lite0", "imagenet", 12, 64),
    "resnet50-12": ("resnet50", "none", 12, 224),
    "resnet50-17": ("resnet50", "none", 17, 224),
}
"""name: (backbone, weights, cut, input size)."""


def build(case: str, data_root: str, batch: int, batches: int, device: str):
    """(trial config, model, frozen units, optimizer, ttl-search's loader, bare tensors) of a case."""
    backbone, weights, cut, size = CASES[case]
    cfg = TrialConfig(backbone=backbone, weights=weights, cut=cut, input_size=size, batch_size=batch,
                      data=DataConfig("breastmnist", root=data_root), device=device)
    data = load_data(cfg.data)
    n = min(len(data.train.labels), batch * batches)
    data.train = replace(data.train, images=data.train.images[:n], labels=data.train.labels[:n])
    seed_everything(0)
    prepared = prepare_trial(cfg, data)
    dev = resolve_device(device)
    model = prepared.built.model.to(dev)
    loader = make_loader(data.train, prepared.transform, train=True, batch_size=batch, seed=0, dims=data.dims,
                         device=dev)
    plain = make_loader(data.train, replace(prepared.transform, augment=False), train=False, batch_size=n, seed=0,
                        dims=data.dims, device=dev)
    x, y = next(iter(plain))  # pre-made, normalised inputs for the bare loop
    return cfg, model, prepared.built, loader, (x.contiguous(), y)


def bare_epoch(model: nn.Module, frozen, tensors, optimizer, criterion, batch: int, device: torch.device,
               amp, channels_last: bool) -> None:
    """The bare PyTorch loop: slices of pre-made tensors, forward, loss, backward, step."""
    model.train()
    for module in frozen:
        module.eval()
    x_all, y_all = tensors
    for start in range(0, len(y_all), batch):
        x, y = x_all[start:start + batch], y_all[start:start + batch]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = criterion(model(x).float(), y)
        loss.backward()
        optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(case: str, args) -> dict:
    """Median images/s of both loops over interleaved rounds (after one warm-up epoch each)."""
    cfg, model, built, loader, tensors = build(case, args.data, args.batch, args.batches, args.device)
    device = resolve_device(args.device)
    configure_backends(device, cfg.deterministic)  # as a trial sets them (cuDNN's autotuner on CUDA)
    amp = amp_dtype(device, cfg.amp)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss()
    optimizer = make_optimizer(cfg, built.param_groups)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    images = len(tensors[1])
    runs = {
        "ttl-search": lambda epoch: train_epoch(model, built.frozen, loader, optimizer, criterion, scaler, device, amp,
                                                epoch, channels_last),
        "bare": lambda epoch: bare_epoch(model, built.frozen, tensors, optimizer, criterion, args.batch, device, amp,
                                         channels_last),
    }
    if args.compile:  # the trial's `compile: true`: the same loop through torch.compile
        compiled = torch.compile(model)
        runs["compiled"] = lambda epoch: train_epoch(compiled, built.frozen, loader, optimizer, criterion, scaler,
                                                     device, amp, epoch, channels_last)
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    warmup: dict[str, float] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up (and compiles)
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            sync(device)
            start = time.perf_counter()
            runs[name](round_)
            sync(device)
            seconds = time.perf_counter() - start
            if round_:
                speeds[name].append(images / seconds)
            else:
                warmup[name] = seconds
    ours, bare = statistics.median(speeds["ttl-search"]), statistics.median(speeds["bare"])
    backbone, _, cut, size = CASES[case]
    row = {"case": case, "backbone": backbone, "cut": cut, "input": size, "batch": args.batch, "images": images,
           "device": str(device), "threads": torch.get_num_threads(), "ttl-search img/s": round(ours, 1),
           "bare img/s": round(bare, 1), "ratio": round(ours / bare, 3),
           "spread ttl-search": f"{min(speeds['ttl-search']):.1f}-{max(speeds['ttl-search']):.1f}",
           "spread bare": f"{min(speeds['bare']):.1f}-{max(speeds['bare']):.1f}"}
    if args.compile:
        row["compiled img/s"] = round(statistics.median(speeds["compiled"]), 1)
        row["compiled / ttl-search"] = round(row["compiled img/s"] / ours, 3)
        row["compile s (first epoch)"] = round(warmup["compiled"], 1)
    return row


def shared_gpu(case: str, args) -> dict:
    """Aggregate images/s of two trials sharing one GPU (two processes at once) against one alone."""
    command = [sys.executable, __file__, "--cases", case, "--rounds", str(args.rounds), "--batch", str(args.batch),
               "--batches", str(args.batches), "--data", args.data, "--device", "cuda", "--no-study", "--json-only"]

    def run(copies: int) -> float:
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        return sum(o[0]["ttl-search img/s"] for o in outs)

    one, two = run(1), run(2)
    return {"case": case, "one trial img/s": round(one, 1), "two trials at 0.5 GPU, total img/s": round(two, 1),
            "aggregate / one": round(two / one, 2)}


def schedule_floor(rs, concurrency: int) -> float:
    """The least wall time any executor could take for these trials (their measured worker seconds)
    on ``concurrency`` slots, in the order they started, keeping the search method's barriers: a
    phase (stage 1, stage 2, ...) starts when the one before it has ended. Idle slots at a stage
    barrier belong to the method, not to the orchestration; exhaustive and TPE have none."""
    import heapq

    phases: dict[str, list] = {}
    for r in sorted(rs, key=lambda r: r.started):
        phases.setdefault(r.phase or "", []).append(r)
    total = 0.0
    for trials in phases.values():  # in the order each phase first started
        slots = [0.0] * concurrency
        end = 0.0
        for r in trials:
            start = heapq.heappop(slots)
            end = max(end, start + (r.duration_s or 0.0))
            heapq.heappush(slots, start + (r.duration_s or 0.0))
        total += end
    return total


@contextlib.contextmanager
def _timed(module, name: str, spent: dict[str, float]):
    """Add the seconds spent in ``module.name`` to ``spent[name]`` for the duration of the block."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def study_overhead(args, epochs: int, label: str, method: str = "two_stage") -> dict:
    """The debug study on local Ray, its trials ``epochs`` long, searched by ``method``: wall time
    against the ideal (the sum of its trials' worker seconds divided by the concurrency) and
    against the schedule floor (:func:`schedule_floor`), with where the rest went."""
    from ttl_search.results import open_study
    from ttl_search.run import cluster
    from ttl_search.run.driver import run_study
    from ttl_search.search.record import records
    from ttl_search.search.study import load_study_config
    from ttl_search.storage import study_trials

    spent = {"init_ray": 0.0, "shutdown_ray": 0.0}
    with contextlib.ExitStack() as stack:
        for name in spent:
            stack.enter_context(_timed(cluster, name, spent))
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        url = f"sqlite:///{tmp}/bench.db"
        cfg = load_study_config(HERE.parent / "studies" / "debug.yaml", [
            f"storage={url}", f"trial.data.root={args.data}", f"trial.max_epochs={epochs}",
            "trial.early_stopping=0", f"artifacts={tmp}/artifacts", f"search.method={method}"])
        start = time.perf_counter()
        run_study(cfg)
        wall = time.perf_counter() - start
        study, _ = open_study(cfg.name, url)
        rs = [r for r in records(study_trials(study)) if r.complete and not r.reused_from]
    worker = sum(r.duration_s or 0.0 for r in rs)
    train = sum(r.train_time_s or 0.0 for r in rs)
    ideal = worker / cfg.concurrency
    floor = schedule_floor(rs, cfg.concurrency)
    search = (max(r.completed for r in rs) - min(r.started for r in rs)).total_seconds()
    first = min(r.started for r in rs)
    first_wave = [r for r in rs if (r.started - first).total_seconds() < 1.0]
    # a trial's driver seconds beyond its worker's: Ray starting the worker process (imports,
    # first data load) for the first wave (median), a reused worker's hand-over afterwards (the
    # longest: a trial that had to start a new worker shows here)
    start_first = statistics.median((r.driver_duration_s or 0) - (r.duration_s or 0) for r in first_wave)
    later = [r for r in rs if r not in first_wave]
    start_later = max((r.driver_duration_s or 0) - (r.duration_s or 0) for r in later) if later else 0.0
    return {"study": label, "trials": len(rs), "concurrency": cfg.concurrency,
            "trial s (mean)": round(worker / len(rs), 1), "train s (sum)": round(train, 1),
            "ideal s": round(ideal, 1), "floor s": round(floor, 1), "wall s": round(wall, 1),
            "wall / ideal": round(wall / ideal, 2), "wall / floor": round(wall / floor, 2),
            "search / ideal": round(search / ideal, 2), "search / floor": round(search / floor, 2),
            "ray start s": round(spent["init_ray"], 1), "first-wave worker start s": round(start_first, 1),
            "later hand-over s (max)": round(start_later, 2), "ray stop s": round(spent["shutdown_ray"], 1)}


ORCHESTRATION_GOALS = {"debug": 1.5, "30-second trials": 1.05}
"""The study-overhead goals: wall time at most this multiple of the ideal (issue 13)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per loop (after one warm-up)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="batches per round (ResNet-50 at 224 px is slow on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core)")
    parser.add_argument("--data", default=os.environ.get("TTL_SEARCH_DATA", str(HERE.parents[1] / "shared" / "datasets")))
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the debug study's trials")
    parser.add_argument("--long-epochs", type=int, default=200,
                        help="epochs that make the debug study's trials about 30 s long on a 2-core CPU (0: skip)")
    parser.add_argument("--no-study", action="store_true", help="skip the orchestration part")
    parser.add_argument("--study-only", action="store_true", help="only the orchestration part")
    parser.add_argument("--compile", action="store_true",
                        help="also time the trial's loop through torch.compile (the trial setting compile: true)")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [] if args.study_only else [measure(case, args) for case in args.cases]
    if args.json_only:
        print(json.dumps(rows))
        return 0
    if rows:
        print(tabulate(rows, headers="keys", tablefmt="github"))
        if torch.cuda.is_available():
            print()
            print(tabulate([shared_gpu(case, args) for case in args.cases], headers="keys", tablefmt="github"))
        else:
            print("\nno CUDA device here: the shared-GPU table needs one")
    if not args.no_study:
        runs = [("debug", args.epochs, f"debug, {args.epochs} epochs", "two_stage")]
        if args.long_epochs:
            runs += [("30-second trials", args.long_epochs, f"long trials ({method}, {args.long_epochs} epochs)",
                      method) for method in ("two_stage", "exhaustive")]
        studies = [(goal, study_overhead(args, epochs, label, method)) for goal, epochs, label, method in runs]
        print()
        print(tabulate([row for _, row in studies], headers="keys", tablefmt="github"))
        for goal_name, row in studies:
            print(f"{row['study']}: wall / ideal {row['wall / ideal']:.2f} (goal <= {ORCHESTRATION_GOALS[goal_name]}), "
                  f"wall / floor {row['wall / floor']:.2f}, trials {row['trial s (mean)']} s on average")
    if rows:
        print(f"ratio: {min(r['ratio'] for r in rows):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
