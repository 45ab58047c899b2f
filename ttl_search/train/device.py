"""The device a trial runs on, and how it behaves there: which device a config names, the GPU's
memory rule for the data, the backends' settings, what a trial leaves behind, and a device failure
(CUDA out of memory, a CUDA runtime error) as a failed trial with its figures.

Nothing here knows Ray: the Ray side (:mod:`ttl_search.run.devices`) turns the GPU Ray assigned a
worker into the device string these functions take.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import re
import shutil
from typing import Mapping

import torch
from torch import nn

from ..errors import ConfigError, choices

log = logging.getLogger(__name__)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
"""The values of ``trial.device``."""

GIB = 1024**3

DATA_MEMORY_FRACTION = 0.5
"""Fraction of a trial's memory on the card that its images may take; the rest is for the model,
its gradients and optimizer state, the activations of a batch and the allocator's slack."""

HOST, DEVICE = "host", "device"
"""Where a split's images are kept: on the trial's device, or in (pinned) host memory with each
batch copied to the device."""


# --------------------------------------------------------------------------- which device


def valid_devices(gpus: int) -> list[str]:
    """The values ``trial.device`` may take on a machine with ``gpus`` CUDA devices."""
    return ["auto", "cpu", *(["cuda", *(f"cuda:{i}" for i in range(gpus))] if gpus else [])]


def resolve_device(device: str) -> torch.device:
    """The torch device ``device`` names here: ``auto`` is CUDA's current device when there is one,
    else the CPU; ``cuda``/``cuda:N`` must exist on this machine."""
    if not DEVICE_PATTERN.match(str(device)):
        raise ConfigError(f"device {device!r} is unknown; valid devices: auto, cpu, cuda, cuda:N")
    available = torch.cuda.is_available()
    if device == "auto":
        return torch.device("cuda" if available else "cpu")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if available else 0
        if not count:
            raise ConfigError(f"device {device!r} requested but CUDA is not available here; valid devices: "
                              f"{choices(valid_devices(0))}")
        if ":" in device and int(device.split(":")[1]) >= count:
            raise ConfigError(f"device {device!r} does not exist: this machine has {count} CUDA device(s); valid "
                              f"devices: {choices(valid_devices(count))}")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU's with the threads torch uses."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} thread(s) of {os.cpu_count()}"


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The mixed-precision type of a trial on ``device``: bfloat16 on a GPU that runs it natively
    (no loss scaling needed), else float16 (a GPU that would only emulate bfloat16, slower than
    float32); None (full precision) off CUDA or when not ``enabled``."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """Set the process-wide backend flags a trial runs with (every trial sets them, so a reused
    worker does not keep the previous trial's): cuDNN's autotuner on CUDA (a trial's batch shapes
    are fixed), unless ``deterministic``, which asks for deterministic algorithms everywhere."""
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; read when cuBLAS starts, so a reused
        # worker that already ran a non-deterministic CUDA trial keeps its own (torch warns then).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


# --------------------------------------------------------------------------- the memory rule


def split_bytes(images: int, channels: int, input_size: int, dims: int) -> int:
    """Bytes of a split's ``uint8`` images at the input size (one 224 px RGB image: 150,528)."""
    return images * channels * input_size**dims


def data_budget(share: float, total_bytes: int, free_bytes: int) -> int:
    """Bytes of images a trial may keep on its GPU: :data:`DATA_MEMORY_FRACTION` of its share of
    the card (``share`` of ``total_bytes``: its ``resources.gpus``), and never more than that
    fraction of what is free when it starts (trials beside it may already hold theirs)."""
    return int(DATA_MEMORY_FRACTION * min(share * total_bytes, free_bytes))


def place_splits(sizes: Mapping[str, int], budget: int) -> dict[str, str]:
    """Where each split (in the order given, the most used first) keeps its images: on the device
    while the splits placed there so far fit in ``budget`` bytes, else on the host."""
    placed, used = {}, 0
    for name, size in sizes.items():
        if used + size <= budget:
            placed[name], used = DEVICE, used + size
        else:
            placed[name] = HOST
    return placed


def card_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of ``device``'s card."""
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def memory_figures(device: torch.device) -> dict[str, float]:
    """What this process holds on ``device``'s card and what the card has, in GiB (peaks since the
    trial started); empty off CUDA."""
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return {}
    free, total = card_memory(device)
    figures = {"peak_allocated_gib": torch.cuda.max_memory_allocated(device),
               "peak_reserved_gib": torch.cuda.max_memory_reserved(device),
               "reserved_gib": torch.cuda.memory_reserved(device), "free_gib": free, "total_gib": total}
    return {k: round(v / GIB, 2) for k, v in figures.items()}


# --------------------------------------------------------------------------- failures on the device


DEVICE_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,
                                                   *((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError")
                                                     else ()))
"""Failures of the device itself: out of memory, and CUDA runtime errors (an illegal address, a
device-side assertion). The same trial fails the same way again, so they are not retried."""


def device_failure_reason(exc: BaseException, device: str, batch_size: int, eval_batch_size: int, share: float,
                          figures: Mapping[str, float]) -> str:
    """The stored reason of a trial that failed on its device: what happened, at which batch sizes,
    the memory figures, and what to change."""
    oom = isinstance(exc, torch.OutOfMemoryError)
    what = "out of memory" if oom else f"a CUDA error ({type(exc).__name__})"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if figures:
        share_gib = round(share * figures["total_gib"], 2)
        memory = (f"this trial peaked at {figures['peak_allocated_gib']} GiB allocated ({figures['peak_reserved_gib']} "
                  f"GiB reserved); the card has {figures['free_gib']} GiB free of {figures['total_gib']} GiB, and this "
                  f"trial's share (resources.gpus={share:g}) is {share_gib} GiB")
    else:
        memory = "no memory figures (not on CUDA)"
    advice = ("lower trial.batch_size (or trial.eval_batch_size), or give each trial a larger share of the card "
              "(resources.gpus, fewer trials per GPU)" if oom else
              "see the worker's log; the GPU or its driver may need attention")
    return (f"{what} on {device} at batch_size {batch_size} (eval_batch_size {eval_batch_size}): {memory}. "
            f"Not retried (the same trial fails the same way): {advice}. torch: {first}")


# --------------------------------------------------------------------------- between trials


def release_memory(device: torch.device, compiled: bool) -> list[str]:
    """Free what a finished trial left in this process, for the next trial of a reused worker:
    garbage (cycles holding tensors), the CUDA caching allocator's blocks (else this worker keeps
    the last trial's peak reserved, which its neighbours on a shared card cannot use) and, after
    ``torch.compile``, dynamo's caches (else every new model recompiles against the old guards until
    the recompile limit turns compilation off: later trials silently run eager). Returns the steps
    taken."""
    steps = ["gc"]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        steps.append("empty_cache")
    if compiled:
        torch._dynamo.reset()
        steps.append("dynamo_reset")
    return steps


# --------------------------------------------------------------------------- compile


def missing_compiler(device: torch.device) -> str | None:
    """What ``torch.compile`` lacks on ``device`` here, or None: Triton (CUDA) builds its launcher
    with a C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``); Inductor on the CPU generates
    C++ (``$CXX``, else ``g++``, ``c++`` or ``clang++``)."""
    if device.type == "cuda":
        wanted, env = ("cc", "gcc", "clang"), "CC"
    else:
        wanted, env = ("g++", "c++", "clang++"), "CXX"
    names = ([os.environ[env]] if os.environ.get(env) else []) + list(wanted)
    if any(shutil.which(name) for name in names):
        return None
    kind = "a C compiler for Triton" if device.type == "cuda" else "a C++ compiler for Inductor"
    return f"{kind} (${env}, or one of {', '.join(wanted)} on PATH)"


def check_compiler(device: torch.device) -> None:
    """Refuse ``compile: true`` where it cannot work, before a trial starts."""
    missing = missing_compiler(device)
    if missing:
        raise ConfigError(f"compile: true needs {missing} on {device}, and none is found; install one (the "
                          f"ttl-search Docker image has gcc and g++) or set compile: false")


# --------------------------------------------------------------------------- inference as trained


class AsTrained(nn.Module):
    """A model as a trial evaluates it: 2D inputs made channels-last (on CUDA) and run under the
    trial's autocast, so that latency is timed in the format and precision the trial uses."""

    def __init__(self, model: nn.Module, channels_last: bool, amp: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.amp = amp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return self.model(x)


def as_trained(model: nn.Module, device: torch.device, dims: int, amp: torch.dtype | None) -> nn.Module:
    """``model`` converted to the format a trial on ``device`` uses (channels-last 2D on CUDA) and
    wrapped to run as it does (:class:`AsTrained`); the model itself where nothing changes."""
    channels_last = uses_channels_last(device, dims)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return AsTrained(model, channels_last, amp) if channels_last or amp is not None else model


def uses_channels_last(device: torch.device, dims: int) -> bool:
    """Whether a trial on ``device`` keeps 2D models and inputs channels-last (faster convolutions
    on CUDA)."""
    return device.type == "cuda" and dims == 2
