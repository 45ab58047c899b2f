"""Cost of a model: parameters, multiply-accumulates and measured inference latency."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (convolutions and matmuls).

    Counted with torch's ``FlopCounterMode`` (2 FLOPs per MAC), which counts the operators that
    dominate a CNN and ignores normalisation, activations and pooling, as the usual MAC tables do.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(example)
    return counter.get_total_flops() // 2


@dataclass
class Latency:
    """Median inference latency in milliseconds over repeats."""

    batch1_ms: float
    """Median time of one forward pass of a single input."""
    batch64_ms: float
    """Median time of one forward pass of 64 inputs."""
    device: str
    """Device the latency was measured on."""
    threads: int
    """torch CPU threads during the measurement."""


def _time_forward(module: nn.Module, example: torch.Tensor, repeats: int, warmup: int) -> float:
    cuda = example.device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            module(example)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def measure_latency(module: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu",
                    repeats: int = 10, warmup: int = 2, big_batch: int = 64) -> Latency:
    """Median forward time at batch 1 and at ``big_batch`` (input_shape excludes the batch)."""
    device = torch.device(device)
    was_training = module.training
    module.eval()
    try:
        small = _time_forward(module, torch.randn(1, *input_shape, device=device), repeats, warmup)
        big = _time_forward(module, torch.randn(big_batch, *input_shape, device=device), max(3, repeats // 3), 1)
    finally:
        module.train(was_training)
    return Latency(round(small, 4), round(big, 4), str(device), torch.get_num_threads())
