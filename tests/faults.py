"""Faults injected into real runs, for what this machine cannot produce: CUDA out of memory.

``test_oom`` is the tiny 2D test network (``test_cnn``) whose stage-3 blocks raise
``torch.OutOfMemoryError`` (as CUDA's allocator does) in a training forward pass; evaluation and
the cut analysis run normally, so cuts 1-5 train and cuts 6-7 run out of memory. Ray workers get
it with ``runtime_env={"env_vars": {"PYTHONPATH": <tests>}, "worker_process_setup_hook":
"faults.register_oom_backbone"}``.
"""

from __future__ import annotations

import torch
from torch import nn

OOM_BACKBONE = "test_oom"
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 GiB (injected by tests/faults.py)"


class OutOfMemoryBlock(nn.Module):
    """A block that runs out of memory when it trains."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            raise torch.OutOfMemoryError(OOM_MESSAGE)
        return self.block(x)


def _build() -> nn.Module:
    from ttl_search.models.tiny import TinyNet

    model = TinyNet(2, (8, 12, 16))
    model.layer3 = nn.Sequential(*(OutOfMemoryBlock(b) for b in model.layer3))
    return model


def register_oom_backbone() -> None:
    """Register ``test_oom`` (once per process)."""
    from ttl_search.models import backbones as bb
    from ttl_search.models.tiny import _tiny_units

    if OOM_BACKBONE in bb._REGISTRY:
        return
    bb.register(bb.BackboneSpec(name=OOM_BACKBONE, description="test_cnn whose stage 3 runs out of memory in training",
                                dims=2, default_input_size=32, build=_build, units=_tiny_units, first_conv="stem.0",
                                head_prefixes=("fc.",), family="tiny", test_only=True))
