"""Latency of every cut of a backbone before anything trains (for deployment budgets).

The architecture of a truncated model decides its forward time, not its weights: the cuts are
built with random weights (nothing is downloaded) and timed one at a time, with nothing else of
the study running. ``ttl-search cutoffs BACKBONE --measure-latency`` writes the table on the
machine where the model will be deployed; a study with ``selection.budget.latency_ms`` and no
``latency_table`` measures it at study start on a worker with a trial's resources.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Sequence

import torch

from ..models.backbones import load_backbone
from ..models.cost import _time_forward, median_iqr
from ..models.truncation import input_shape, truncate
from .device import amp_dtype, as_trained, device_name
from .latency import DEFAULT_REPEATS
from .trial import resolve_device

log = logging.getLogger(__name__)


def measure_cut_latency(backbone: str, input_size: int, cuts: Sequence[int], in_channels: int = 3,
                        head: str = "pool", batches: Sequence[int] = (1,), repeats: int = DEFAULT_REPEATS,
                        device: str = "cpu", threads: int | None = None, num_classes: int = 2, amp: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Median forward time (and interquartile range) of each of ``cuts`` at each of ``batches``
    (``repeats`` timed passes at batch 1, a third of them, at least 3, at larger batches), on
    ``device`` with ``threads`` torch threads, in the format and precision a trial evaluates in
    (channels-last and, with ``amp``, mixed precision on CUDA). Returns the table a study stores:
    ``rows`` of ``cut``, ``batch{B}_ms``, ``batch{B}_iqr``, plus the device, threads, repeats and
    seconds."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        loaded = load_backbone(backbone, None, in_channels)
    shape = input_shape(loaded.spec, input_size, in_channels)
    rows = []
    for i, cut in enumerate(cuts):
        model = truncate(loaded, cut, num_classes, head, input_size).to(dev).eval()
        model = as_trained(model, dev, loaded.spec.dims, amp_dtype(dev, amp))
        row: dict[str, Any] = {"cut": int(cut)}
        for batch in batches:
            times = _time_forward(model, torch.randn(batch, *shape, device=dev),
                                  repeats if batch == 1 else max(3, repeats // 3), warmup=2)
            row[f"batch{batch}_ms"], row[f"batch{batch}_iqr"] = median_iqr(times)
        rows.append(row)
        log.debug("latency of cut %d: %s", cut, row)
        del model
        if progress is not None:
            progress(i + 1, len(cuts))
    return {"device": str(dev), "device_name": device_name(dev), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "repeats": repeats, "batches": list(batches),
            "seconds": round(time.perf_counter() - start, 2), "rows": rows}
