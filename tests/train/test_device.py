"""The device rules of a trial: which device a config names, the memory rule for the images, the
backends' flags, a device failure's reason, what a trial releases, compile's compiler, and models
timed as trained. All of it runs here, without a GPU: the GPU's answers are given as numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ttl_search.errors import ConfigError
from ttl_search.train.device import (DEVICE, HOST, AsTrained, amp_dtype, configure_backends, data_budget,
                                     device_failure_reason, missing_compiler, place_splits, release_memory,
                                     resolve_device, split_bytes, valid_devices)

GB = 10**9
GIB = 1024**3


# --------------------------------------------------------------------------- the memory rule


def test_split_bytes_are_the_uint8_images_at_the_input_size():
    assert split_bytes(1, 3, 224, 2) == 150_528
    assert split_bytes(5_000, 3, 224, 2) == 752_640_000  # 0.75 GB
    assert split_bytes(10, 1, 28, 3) == 219_520


def test_the_budget_is_half_the_trials_share_and_never_more_than_half_of_what_is_free():
    assert data_budget(1.0, 80 * GB, 80 * GB) == 40 * GB
    assert data_budget(0.25, 80 * GB, 80 * GB) == 10 * GB
    assert data_budget(0.5, 80 * GB, 12 * GB) == 6 * GB  # trials beside it hold the rest


def test_splits_go_on_the_device_in_order_while_they_fit_else_on_the_host():
    path_train, path_val = split_bytes(89_996, 3, 224, 2), split_bytes(10_004, 3, 224, 2)  # PathMNIST at 224 px
    assert round(path_train / GB, 1) == 13.5
    quarter = data_budget(0.25, 80 * GB, 80 * GB)  # four trials on an 80 GB card
    assert place_splits({"train": path_train, "val": path_val}, quarter) == {"train": HOST, "val": DEVICE}
    whole = data_budget(1.0, 80 * GB, 80 * GB)
    assert place_splits({"train": path_train, "val": path_val}, whole) == {"train": DEVICE, "val": DEVICE}
    small = split_bytes(5_000, 3, 224, 2)
    assert place_splits({"train": small, "val": small}, quarter) == {"train": DEVICE, "val": DEVICE}
    assert place_splits({"train": 6 * GB, "val": 5 * GB}, quarter) == {"train": DEVICE, "val": HOST}
    assert place_splits({"test": 11 * GB}, quarter) == {"test": HOST}


# --------------------------------------------------------------------------- a device failure


def test_an_out_of_memory_reason_has_the_batch_sizes_the_figures_and_what_to_change():
    figures = {"peak_allocated_gib": 37.5, "peak_reserved_gib": 39.0, "reserved_gib": 39.0, "free_gib": 0.4,
               "total_gib": 79.2}
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity...\nmore")
    reason = device_failure_reason(exc, "NVIDIA H100 80GB HBM3 (cuda:0)", 256, 512, 0.5, figures)
    assert reason.startswith("out of memory on NVIDIA H100 80GB HBM3 (cuda:0) at batch_size 256 (eval_batch_size 512)")
    for part in ("peaked at 37.5 GiB allocated (39.0 GiB reserved)", "0.4 GiB free of 79.2 GiB",
                 "share (resources.gpus=0.5) is 39.6 GiB", "lower trial.batch_size", "Not retried",
                 "torch: CUDA out of memory. Tried to allocate 2.00 GiB"):
        assert part in reason, part
    assert "more" not in reason  # torch's first line only
    error = device_failure_reason(RuntimeError("CUDA error: an illegal memory access"), "cuda:0", 64, 256, 1.0, {})
    assert error.startswith("a CUDA error (RuntimeError) on cuda:0 at batch_size 64") and "no memory figures" in error


# --------------------------------------------------------------------------- which device


def test_valid_devices_and_refusals_name_the_valid_values():
    assert valid_devices(0) == ["auto", "cpu"]
    assert valid_devices(2) == ["auto", "cpu", "cuda", "cuda:0", "cuda:1"]
    with pytest.raises(ConfigError, match="valid devices: auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match="valid devices: " + ", ".join(valid_devices(count))):
        resolve_device(f"cuda:{count}")


def test_bfloat16_only_where_the_gpu_runs_it_natively(monkeypatch):
    """No GPU here: the GPU's answer to ``is_bf16_supported`` is given. One that supports
    bfloat16 only by emulation (slower than float32) trains in float16."""
    cuda = torch.device("cuda")
    assert amp_dtype(torch.device("cpu"), True) is None and amp_dtype(cuda, False) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype(cuda, True) == torch.float16  # emulated only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype(cuda, True) == torch.bfloat16


def test_backend_flags_follow_the_trial_and_its_device():
    try:
        configure_backends(torch.device("cuda"), deterministic=False)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        configure_backends(torch.device("cuda"), deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
        configure_backends(torch.device("cpu"), deterministic=False)
        assert not torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        configure_backends(torch.device("cpu"), deterministic=False)


# --------------------------------------------------------------------------- between trials


def test_release_memory_frees_the_allocator_on_cuda_and_dynamos_caches_after_compile():
    """What a reused worker releases after a trial: garbage always, CUDA's cached blocks on CUDA,
    and dynamo's compiled code after ``compile`` (here on the CPU, with the eager backend: the
    cache entries of the compiled function are gone, so the next trial compiles afresh)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    def step(x):
        return x * 2 + 1

    torch.compile(step, backend="eager")(torch.ones(3))
    assert len(_debug_get_cache_entry_list(step.__code__)) == 1
    assert release_memory(torch.device("cpu"), compiled=False) == ["gc"]
    assert len(_debug_get_cache_entry_list(step.__code__)) == 1  # no compile, nothing reset
    assert release_memory(torch.device("cpu"), compiled=True) == ["gc", "dynamo_reset"]
    assert len(_debug_get_cache_entry_list(step.__code__)) == 0
    # on CUDA the allocator's cache too (a no-op here, where CUDA never started)
    assert release_memory(torch.device("cuda"), compiled=False) == ["gc", "empty_cache"]


# --------------------------------------------------------------------------- compile


def test_a_missing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    assert "a C compiler for Triton" in missing_compiler(torch.device("cuda"))
    assert "a C++ compiler for Inductor" in missing_compiler(torch.device("cpu"))
    (tmp_path / "gcc").write_text("#!/bin/sh\n")
    (tmp_path / "gcc").chmod(0o755)
    assert missing_compiler(torch.device("cuda")) is None


# --------------------------------------------------------------------------- timed as trained


def test_a_model_is_timed_in_the_format_and_precision_it_trains_in():
    seen = {}
    conv = nn.Conv2d(3, 4, 3)
    conv.register_forward_hook(lambda m, i, o: seen.update(
        channels_last=i[0].is_contiguous(memory_format=torch.channels_last), dtype=o.dtype))
    model = nn.Sequential(conv, nn.Flatten()).to(memory_format=torch.channels_last)
    out = AsTrained(model, channels_last=True, amp=torch.bfloat16)(torch.randn(2, 3, 8, 8))
    assert seen == {"channels_last": True, "dtype": torch.bfloat16} and out.dtype == torch.bfloat16
    AsTrained(model, channels_last=False, amp=None)(torch.randn(2, 3, 8, 8))
    assert seen == {"channels_last": False, "dtype": torch.float32}
