"""Check: ttl-search's CUDA paths on one GPU, in at most 8 minutes (``--budget-s``).

A person with a GPU runs this to prove what no CPU machine can:

- ``lite0``: an EfficientNet-Lite0 trial (ImageNet weights, cut 12, 64 px) on CUDA with AMP,
  channels-last and ``compile``: it completes, dynamo compiled it, the latency names the GPU, and
  the memory it held is released afterwards;
- ``resnet50``: the same for a ResNet-50 trial (cut 12, 224 px), the full model timed beside it;
- ``augmentation``: the batched augmentation on CUDA against the CPU's (same seed, ``assert_close``),
  and a whole training batch of the loader;
- ``shared-gpu``: two trials' training loops as Ray tasks at ``gpus: 0.5`` each, at once, against
  one alone: each on the device Ray gave it, and the aggregate images/s;
- ``no-gpu-trial``: a Ray task with ``gpus: 0`` on this GPU node lands on the CPU, every GPU hidden;
- ``out-of-memory``: a trial far too large for the card fails with its reason, batch size and
  memory figures, is stored as a failed trial that the plan does not retry, and leaves the card's
  memory free;
- ``latency``: the study's quiet latency pass names the GPU;
- ``deterministic``: two ``trial.deterministic`` runs give identical numbers; their cost in time;
- ``throughput``: the table of ``benchmarks/throughput.py`` on CUDA (with its shared-GPU table).

One line per check: ``ok`` with what it measured, or what failed; on a machine without CUDA every
check is skipped with the reason (exit status 0). Exit status 1 when a check failed.

    python benchmarks/gpu_check.py [--data DIR] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent


class CheckFailed(Exception):
    """What a check found wrong."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def _trial_config(data: str, **kw):
    from ttl_search.data import DataConfig
    from ttl_search.train.trial import TrialConfig

    base = dict(data=DataConfig("breastmnist", root=data), device="cuda", amp=True, early_stopping=0,
                latency_repeats=10)
    return TrialConfig(**{**base, **kw})


def _compiled_trial(data: str, **kw) -> str:
    """A trial on CUDA with AMP, channels-last and compile; what it measured."""
    from torch._dynamo.utils import counters

    from ttl_search.train.device import amp_dtype

    from ttl_search.train.trial import run_trial

    frames = counters["frames"]["ok"]
    result = run_trial(_trial_config(data, compile=True, **kw))
    expect(result.status == "complete", f"{result.status}: {result.reason}")
    expect(result.device.startswith("cuda"), f"trained on {result.device}")
    expect(counters["frames"]["ok"] > frames, "dynamo compiled nothing (the trial ran eager)")
    gpu = torch.cuda.get_device_name(0)
    expect(gpu in result.latency_ms.get("device", ""), f"latency names {result.latency_ms.get('device')!r}")
    expect(gpu in result.full.get("latency_ms", {}).get("device", ""), "the full model's latency does not name the GPU")
    reserved = torch.cuda.memory_reserved() / 2**20
    expect(reserved < 512, f"{reserved:.0f} MiB still reserved after the trial")
    amp = amp_dtype(torch.device("cuda"), True)
    return (f"val auroc {result.val['auroc']:.3f}, {result.train_time_s:.1f} s training, {amp}, peak "
            f"{result.memory.get('peak_allocated_gib')} GiB, latency b1 {result.latency_ms['batch1']:.2f} ms "
            f"(full model {result.full['latency_ms']['batch1']:.2f} ms), {reserved:.0f} MiB reserved after")


def check_lite0(args) -> str:
    return _compiled_trial(args.data, backbone="efficientnet_lite0", weights="imagenet", cut=12, input_size=64,
                           batch_size=64, max_epochs=3)


def check_resnet50(args) -> str:
    return _compiled_trial(args.data, backbone="resnet50", weights="none", cut=12, input_size=224, batch_size=64,
                           max_epochs=2)


def check_augmentation(args) -> str:
    from ttl_search.data import DataConfig, TransformConfig, load_data, make_loader
    from ttl_search.data.transforms import augment_batch

    x = torch.rand((256, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    tcfg = TransformConfig(input_size=64, crop_scale=(0.08, 1.0))
    cpu = augment_batch(x, tcfg, 2, torch.Generator().manual_seed(7))
    gpu = augment_batch(x.cuda(), tcfg, 2, torch.Generator().manual_seed(7)).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)
    data = load_data(DataConfig("breastmnist", root=args.data))
    batches = {dev: next(iter(make_loader(data.train, tcfg, train=True, batch_size=128, seed=3, dims=2, device=dev)))
               for dev in ("cpu", "cuda")}
    torch.testing.assert_close(batches["cuda"][0].cpu(), batches["cpu"][0], rtol=1e-4, atol=1e-4)
    expect(torch.equal(batches["cuda"][1].cpu(), batches["cpu"][1]), "the labels differ")
    return f"max difference {float((gpu - cpu).abs().max()):.2e} (batch of 256), loader batch equal within 1e-4"


def _loop_images_per_second(data_root: str, epochs: int) -> dict[str, Any]:
    """A trial's training loop (Lite0 cut 12, 64 px) on the device Ray assigned this task."""
    import time as _time

    import torch as _torch

    from ttl_search.data import DataConfig, load_data, make_loader
    from ttl_search.run.devices import claim_ray_device
    from ttl_search.train.device import amp_dtype, configure_backends
    from ttl_search.train.trial import TrialConfig, make_optimizer, prepare_trial, train_epoch

    assignment = claim_ray_device("auto")
    device = _torch.device(assignment.device)
    cfg = TrialConfig(backbone="efficientnet_lite0", weights="imagenet", cut=12, input_size=64, batch_size=64,
                      data=DataConfig("breastmnist", root=data_root), device=assignment.device)
    data = load_data(cfg.data)
    configure_backends(device, False)
    prepared = prepare_trial(cfg, data)
    model = prepared.built.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=_torch.channels_last)
    loader = make_loader(data.train, prepared.transform, train=True, batch_size=64, seed=0, dims=2, device=device)
    optimizer = make_optimizer(cfg, prepared.built.param_groups)
    amp = amp_dtype(device, True)
    scaler = _torch.amp.GradScaler("cuda", enabled=amp == _torch.float16)
    criterion = _torch.nn.CrossEntropyLoss()
    seconds = []
    for epoch in range(epochs + 1):  # epoch 0 warms up
        start = _time.perf_counter()
        train_epoch(model, prepared.built.frozen, loader, optimizer, criterion, scaler, device, amp, epoch,
                    device.type == "cuda")
        if device.type == "cuda":
            _torch.cuda.synchronize(device)
        seconds.append(_time.perf_counter() - start)
    return {**assignment.to_dict(), "images_per_s": len(data.train) / statistics.median(seconds[1:]),
            "cuda_available": _torch.cuda.is_available()}


def _ray(args):
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=min(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    return ray


def check_shared_gpu(args) -> str:
    ray = _ray(args)
    expect(ray.cluster_resources().get("GPU", 0) >= 1, f"Ray found no GPU: {ray.cluster_resources()}")
    task = ray.remote(num_cpus=1, num_gpus=0.5)(_loop_images_per_second)
    one = ray.get(task.remote(args.data, 3))
    two = ray.get([task.remote(args.data, 3) for _ in range(2)])
    for run in [one, *two]:
        expect(run["device"].startswith("cuda") and run["gpu_ids"], f"a task ran on {run}")
        expect(run["visible"] == ",".join(run["gpu_ids"]), f"CUDA_VISIBLE_DEVICES {run['visible']!r} for {run}")
    total = sum(r["images_per_s"] for r in two)
    ratio = total / one["images_per_s"]
    return (f"one trial {one['images_per_s']:.0f} img/s, two at 0.5 GPU {total:.0f} img/s together "
            f"(x{ratio:.2f}), on Ray GPUs {[r['gpu_ids'] for r in two]}")


def _device_here() -> dict[str, Any]:
    import torch as _torch

    from ttl_search.run.devices import claim_ray_device

    assignment = claim_ray_device("auto")
    return {**assignment.to_dict(), "cuda_available": _torch.cuda.is_available()}


def check_no_gpu_trial(args) -> str:
    ray = _ray(args)
    got = ray.get(ray.remote(num_cpus=1, num_gpus=0)(_device_here).remote())
    expect(got["device"] == "cpu" and got["visible"] == "" and not got["cuda_available"], f"got {got}")
    return f"device {got['device']}, CUDA_VISIBLE_DEVICES={got['visible']!r}, torch sees no GPU"


def check_out_of_memory(args) -> str:
    import json

    import optuna
    from optuna.trial import TrialState

    from ttl_search.data import DataConfig
    from ttl_search.run.searcher import StudySearcher
    from ttl_search.search.study import StudyConfig, make_sampler
    from ttl_search.train.trial import TrialConfig, run_trial

    # every training image at once through ResNet-50 at 1024 px: hundreds of GiB of activations
    result = run_trial(_trial_config(args.data, backbone="resnet50", weights="none", cut=17, input_size=1024,
                                     batch_size=512, max_epochs=1, latency_repeats=0))
    expect(result.status == "failed" and result.retry is False, f"{result.status}: {result.reason[:200]}")
    for part in ("out of memory", "batch_size 512", "GiB", "lower trial.batch_size"):
        expect(part in result.reason, f"the reason lacks {part!r}: {result.reason}")
    allocated = torch.cuda.memory_allocated() / 2**20
    expect(allocated < 64, f"{allocated:.0f} MiB still allocated after the failed trial")
    # stored as the driver stores it: a failed trial that the plan does not retry
    cfg = StudyConfig(name="oom", trial=TrialConfig(backbone="test_cnn", input_size=28, data=DataConfig("breastmnist",
                                                                                                          root=args.data)))
    sampler = make_sampler(cfg)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    searcher = StudySearcher(study, sampler, cfg, None)
    first = searcher.suggest("a")
    payload = {**result.to_dict(), "cut": first["trial"]["cut"]}
    searcher.on_trial_result("a", {"final": True, "epoch": 1, "payload": json.dumps(payload)})
    stored = study.get_trials()[0]
    expect(stored.state == TrialState.FAIL and stored.user_attrs.get("retry") is False, f"stored {stored.state}")
    expect(searcher.suggest("b")["trial"]["cut"] != first["trial"]["cut"], "the plan retries it")
    return f"failed and stored, not retried; {allocated:.0f} MiB allocated after; reason: {result.reason[:160]}..."


def check_latency(args) -> str:
    from ttl_search.train.latency import measure_models

    cfg = _trial_config(args.data, backbone="efficientnet_lite0", weights="imagenet", input_size=64)
    table = measure_models(cfg, [("ttl", 12), ("ttl", 18)], repeats=20)
    gpu = torch.cuda.get_device_name(0)
    expect(gpu in table["device_name"], f"the table names {table['device_name']!r}")
    rows = ", ".join(f"cut {r['cut']} {r['batch1_ms']:.2f} ms" for r in table["rows"])
    return f"{table['device_name']}: {rows} at batch 1"


def check_deterministic(args) -> str:
    from ttl_search.train.trial import run_trial

    cfg = _trial_config(args.data, backbone="efficientnet_lite0", weights="imagenet", cut=12, input_size=64,
                        batch_size=64, max_epochs=3, latency_repeats=0)
    runs = [run_trial(replace(cfg, deterministic=True)) for _ in range(2)]
    fast = run_trial(cfg)
    for run in [*runs, fast]:
        expect(run.status == "complete", f"{run.status}: {run.reason}")
    expect(runs[0].history == runs[1].history and runs[0].test == runs[1].test,
           "two deterministic runs differ: " + str([h["train_loss"] for r in runs for h in r.history]))
    cost = runs[1].train_time_s / fast.train_time_s - 1
    return (f"two runs identical; {runs[1].train_time_s:.1f} s against {fast.train_time_s:.1f} s without "
            f"({cost:+.0%})")


def check_throughput(args) -> str:
    command = [sys.executable, str(HERE / "throughput.py"), "--cases", "lite0", "resnet50-12", "--rounds", "2",
               "--no-study", "--device", "cuda", "--data", args.data]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=max(30.0, args.remaining()))
    expect(proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}")
    print("\n".join("    " + line for line in proc.stdout.rstrip().splitlines()))
    return proc.stdout.strip().splitlines()[-1]


CHECKS: list[tuple[str, Callable[[Any], str]]] = [
    ("augmentation", check_augmentation),
    ("no-gpu-trial", check_no_gpu_trial),
    ("lite0", check_lite0),
    ("out-of-memory", check_out_of_memory),
    ("latency", check_latency),
    ("deterministic", check_deterministic),
    ("shared-gpu", check_shared_gpu),
    ("resnet50", check_resnet50),
    ("throughput", check_throughput),
]
"""The checks, cheapest and most telling first: a spent time budget skips the last ones."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("TTL_SEARCH_DATA", str(HERE.parents[1] / "shared" / "datasets")),
                        help="folder with breastmnist.npz (default $TTL_SEARCH_DATA)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="checks not started by then are skipped")
    parser.add_argument("--only", nargs="+", choices=[name for name, _ in CHECKS], help="run only these checks")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    args.remaining = lambda: deadline - time.monotonic()
    checks = [(n, f) for n, f in CHECKS if not args.only or n in args.only]
    if not torch.cuda.is_available():
        why = (f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}: "
               "torch.cuda.is_available() is False)")
        for name, _ in checks:
            print(f"{name}: skipped, {why}")
        return 0
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    failed = 0
    for name, check in checks:
        if args.remaining() <= 0:
            print(f"{name}: skipped, the time budget ({args.budget_s:.0f} s) is spent")
            continue
        start = time.monotonic()
        try:
            detail = check(args)
            print(f"{name}: ok ({time.monotonic() - start:.0f} s) {detail}", flush=True)
        except Exception as exc:  # noqa: BLE001 - each check reports what went wrong and the next one runs
            failed += 1
            print(f"{name}: FAILED ({time.monotonic() - start:.0f} s) {type(exc).__name__}: {exc}", flush=True)
    print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
