"""Cost of a model: parameters, multiply-accumulates and measured inference latency."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


MAC_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""The layers whose multiply-accumulates count: convolutions and fully connected layers."""


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (convolutions and linear layers).

    Forward hooks count each convolution (output elements x input channels per group x kernel
    size) and linear layer (output elements x input features): the operators that dominate a CNN,
    ignoring normalisation, activations and pooling as the usual MAC tables do. These are exactly
    the figures of torch's ``FlopCounterMode`` halved (a test checks every registered backbone),
    without its cost: its first use in a process imports sympy and much of torch._dynamo, 1.3-2 s
    in every driver and every fresh Ray worker.
    """
    total = 0

    def hook(layer: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Linear):
            total += output.numel() * layer.in_features
        else:  # weight (out, in / groups, *kernel)
            total += output.numel() * math.prod(layer.weight.shape[1:])

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, MAC_LAYERS)]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    return total


@dataclass
class Latency:
    """Inference latency in milliseconds over repeats: medians and interquartile ranges."""

    batch1_ms: float
    """Median time of one forward pass of a single input."""
    batch64_ms: float
    """Median time of one forward pass of 64 inputs."""
    device: str
    """Device the latency was measured on."""
    threads: int
    """torch CPU threads during the measurement."""
    batch1_iqr: tuple[float, float] | None = None
    """First and third quartile of the batch-1 times (None with fewer than 2 repeats)."""
    batch64_iqr: tuple[float, float] | None = None
    """First and third quartile of the batch-64 times."""
    repeats: int = 0
    """Timed forward passes at batch 1 (batch 64: a third of them, at least 3)."""


def _time_forward(module: nn.Module, example: torch.Tensor, repeats: int, warmup: int) -> list[float]:
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
    return times


def median_iqr(times: list[float]) -> tuple[float, tuple[float, float] | None]:
    """(median, (first quartile, third quartile)) of ``times``; no quartiles for fewer than 2."""
    median = round(statistics.median(times), 4)
    if len(times) < 2:
        return median, None
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return median, (round(q1, 4), round(q3, 4))


def measure_latency(module: nn.Module, input_shape: tuple[int, ...], device: str | torch.device = "cpu",
                    repeats: int = 10, warmup: int = 2, big_batch: int = 64) -> Latency:
    """Median forward time, with its interquartile range, at batch 1 and at ``big_batch``
    (input_shape excludes the batch)."""
    device = torch.device(device)
    was_training = module.training
    module.eval()
    try:
        small = _time_forward(module, torch.randn(1, *input_shape, device=device), repeats, warmup)
        big = _time_forward(module, torch.randn(big_batch, *input_shape, device=device), max(3, repeats // 3), 1)
    finally:
        module.train(was_training)
    (b1, b1_iqr), (b64, b64_iqr) = median_iqr(small), median_iqr(big)
    return Latency(b1, b64, str(device), torch.get_num_threads(), b1_iqr, b64_iqr, repeats)
