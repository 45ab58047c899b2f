"""The device of a trial on a Ray worker: exactly what Ray assigned it.

Ray (2.4x and later) sets ``CUDA_VISIBLE_DEVICES`` only for a worker it gives GPUs; a worker given
none keeps the node's, sees every GPU, and torch's ``auto`` would put it on GPU 0 outside Ray's
accounting (N trials piled onto one card while the others idle). So every trial, and every task
of the study that runs with a trial's resources (the probe, the latency passes), first claims
its device here: with no GPU from Ray it runs on the CPU with every GPU hidden; with one, on that
GPU. :func:`assigned_device` is the decision (pure), :func:`claim_ray_device` the worker's side,
and :func:`check_device_settings` refuses, before anything is stored, settings a trial cannot
honour.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from ..errors import ConfigError, choices
from ..search.study import StudyConfig

log = logging.getLogger(__name__)

VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
"""The variable CUDA reads to know which GPUs a process may see."""

STUDY_DEVICES = {False: ("auto", "cpu"), True: ("auto", "cuda")}
"""The ``trial.device`` values a study accepts without GPUs (``resources.gpus: 0``) and with them."""


@dataclass(frozen=True)
class DeviceAssignment:
    """The device a trial got on its Ray worker, and from what."""

    device: str
    """The torch device the trial runs on (``cpu``, ``cuda:0``...)."""
    gpu_ids: tuple[str, ...] = ()
    """The ids of the GPUs Ray assigned (the node's numbering); empty: none."""
    visible: str | None = None
    """``CUDA_VISIBLE_DEVICES`` as the trial runs (None: unset); ``""`` hides every GPU."""

    def describe(self) -> str:
        """One line for logs: ``cpu (Ray assigned no GPU; every GPU hidden)`` or
        ``cuda:0 (Ray GPU 1)``."""
        if not self.gpu_ids:
            hidden = "every GPU hidden" if self.visible == "" else f"{VISIBLE_ENV}={self.visible!r}"
            return f"{self.device} (Ray assigned no GPU; {hidden})"
        return f"{self.device} (Ray GPU {','.join(self.gpu_ids)})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gpu_ids": list(self.gpu_ids)}


def assigned_device(requested: str, gpu_ids: Sequence[str], visible: str | None) -> str:
    """The torch device of a trial that asked for ``requested`` (``trial.device``) and was given
    the GPUs ``gpu_ids`` by Ray, in a process that sees ``visible`` (``CUDA_VISIBLE_DEVICES``,
    None when unset): the CPU when Ray gave no GPU, else the first assigned GPU as this process
    numbers it (its position among the visible ones)."""
    if not gpu_ids:
        if requested.startswith("cuda"):
            raise ConfigError(f"trial.device {requested!r} but Ray assigned this trial no GPU; set resources.gpus "
                              f"(1, or 0.5 to share a card) or trial.device to one of {choices(STUDY_DEVICES[False])}")
        return "cpu"
    if requested == "cpu":
        return "cpu"
    if requested not in ("auto", "cuda"):
        raise ConfigError(f"trial.device {requested!r}: a study's trial runs on the GPU Ray assigns it; valid "
                          f"devices: {choices(STUDY_DEVICES[True])}")
    first = str(gpu_ids[0])
    if visible is None:  # Ray left the variable alone (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES)
        return f"cuda:{first}"
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if first not in ids:
        raise ConfigError(f"Ray assigned GPU {first} but this worker sees {VISIBLE_ENV}={visible!r}; the "
                          "node's GPU setup and Ray's disagree")
    return f"cuda:{ids.index(first)}"


def claim_device(requested: str, gpu_ids: Sequence[str]) -> DeviceAssignment:
    """Make this process use what it was assigned: with no GPU, hide every GPU (before anything
    starts CUDA here), and say which device the trial runs on."""
    gpu_ids = tuple(str(i) for i in gpu_ids)
    if not gpu_ids:
        os.environ[VISIBLE_ENV] = ""
    device = assigned_device(requested, gpu_ids, os.environ.get(VISIBLE_ENV))
    return DeviceAssignment(device, gpu_ids, os.environ.get(VISIBLE_ENV))


def ray_gpu_ids() -> list[str]:
    """The GPUs Ray assigned the current task or actor (empty outside Ray or with none)."""
    import ray

    if not ray.is_initialized():
        return []
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def claim_ray_device(requested: str) -> DeviceAssignment:
    """:func:`claim_device` with the GPUs Ray assigned this worker; logged."""
    assignment = claim_device(requested, ray_gpu_ids())
    log.info("this worker runs on %s", assignment.describe())
    return assignment


def on_ray_device(trial_values: dict[str, Any]) -> dict[str, Any]:
    """A study's trial settings (``to_dict(TrialConfig)``) with the device this Ray worker was
    assigned: for a task run with a trial's resources (the probe, the latency passes)."""
    return {**trial_values, "device": claim_ray_device(str(trial_values.get("device", "auto"))).device}


def local_device(cfg: StudyConfig) -> str:
    """The device for a phase of the study run in the driver instead of on a worker (a local Ray:
    the trials' machine): the CPU when the trials get no GPU, so that it measures what they ran
    on; else ``trial.device``."""
    return "cpu" if cfg.resources.gpus == 0 else cfg.trial.device


def local_trial(cfg: StudyConfig):
    """``cfg.trial`` on :func:`local_device`."""
    return replace(cfg.trial, device=local_device(cfg))


def check_device_settings(cfg: StudyConfig) -> None:
    """Refuse what a trial cannot honour, before anything is stored: a trial trains on one device,
    the one Ray assigns it, so ``resources.gpus`` is at most 1 (fractions share a card) and
    ``trial.device`` names no GPU by number, nor a GPU without ``resources.gpus``, nor the CPU
    with GPUs it would hold unused."""
    gpus, device = cfg.resources.gpus, cfg.trial.device
    if gpus > 1:
        raise ConfigError(f"resources.gpus={gpus:g}, but a trial trains on one device; valid values: 0 (the CPU), "
                          "a fraction of one GPU to share a card (0.5, 0.25...) or 1. To use more GPUs, run more "
                          "trials at once (concurrency)")
    valid = STUDY_DEVICES[gpus > 0]
    if device not in valid:
        why = ("Ray assigns each trial its GPU" if device.startswith("cuda:") else
               "resources.gpus is 0, so Ray gives the trials no GPU" if gpus == 0 else
               f"resources.gpus={gpus:g} would reserve GPUs the trials never use")
        raise ConfigError(f"trial.device {device!r} in a study: {why}; valid devices with resources.gpus={gpus:g}: "
                          f"{choices(valid)}")
