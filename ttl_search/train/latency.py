"""A quiet latency pass: inference latency of a study's models, one model at a time.

Latency measured inside a trial is not to be trusted: other trials train on the same device at
the same time (one study measured the same cut at 15.3 ms and another at 1.6 ms). So study
trials measure none, and this pass times every trained (strategy, cut) serially, with nothing
else of the study running: after the search (by the driver, on a worker with a trial's
resources) or on demand (``ttl-search report --measure-latency``). Each model gets enough timed
forward passes for a median and an interquartile range, at batch 1 and batch 64. Weights do not
change the time, so models are built with random weights (nothing is downloaded).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from ..data import DatasetSplits, load_data
from ..models.cost import measure_latency
from ..models.truncation import input_shape
from .device import amp_dtype, as_trained, device_name, release_memory
from .trial import TrialConfig, prepare_trial, resolve_device, seed_everything

log = logging.getLogger(__name__)

DEFAULT_REPEATS = 20
"""Timed batch-1 forward passes per model when the study sets fewer (``trial.latency_repeats``)."""


__all__ = ["DEFAULT_REPEATS", "device_name", "measure_models"]


def measure_models(cfg: TrialConfig, models: Sequence[tuple[str, int]], repeats: int = DEFAULT_REPEATS,
                   data: DatasetSplits | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Latency of each (strategy, cut) of ``models`` built as trials of ``cfg`` build them, one
    after another on ``cfg.device``: per model the median and interquartile range at batch 1 and
    batch 64, in the memory format and precision a trial uses there (channels-last and autocast on
    CUDA). Returns the table a study stores (``rows`` plus the device, threads and repeats)."""
    torch.set_num_threads(max(1, cfg.threads or os.cpu_count() or 1))
    device = resolve_device(cfg.device)
    amp = amp_dtype(device, cfg.amp)
    data = data if data is not None else load_data(cfg.data)
    start = time.perf_counter()
    rows = []
    for i, (strategy, cut) in enumerate(models):
        seed_everything(cfg.seed)
        prepared = prepare_trial(replace(cfg, strategy=strategy, cut=cut, weights=None), data)
        model = prepared.built.model.to(device)
        shape = input_shape(prepared.loaded.spec, prepared.transform.input_size, prepared.transform.in_channels)
        lat = measure_latency(as_trained(model, device, data.dims, amp), shape, device, repeats=repeats)
        rows.append({"strategy": strategy, "cut": cut, "batch1_ms": lat.batch1_ms, "batch1_iqr": lat.batch1_iqr,
                     "batch64_ms": lat.batch64_ms, "batch64_iqr": lat.batch64_iqr})
        log.info("latency of %s cut %d: %.3f ms [%s] at batch 1", strategy, cut, lat.batch1_ms, lat.batch1_iqr)
        del model
        release_memory(device, compiled=False)
        if progress is not None:
            progress(i + 1, len(models))
    return {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
            "repeats": repeats, "seconds": round(time.perf_counter() - start, 2), "rows": rows}
