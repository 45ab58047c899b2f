"""One trial: build the model a strategy asks for, fine-tune it, select on validation, test once.

Training knows nothing about Ray or Optuna: :func:`run_trial` takes a :class:`TrialConfig` and
an optional per-epoch callback, and returns a :class:`TrialResult`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..models.backbones import LoadedBackbone, get_backbone, load_backbone
from ..models.cost import count_macs, count_params, measure_latency
from ..data import DataConfig, DatasetSplits, TransformConfig, load_data, make_loader
from ..errors import ConfigError, TrialError, choices
from .device import (DEVICE, DEVICE_ERRORS, DEVICE_PATTERN, amp_dtype, as_trained, card_memory, check_compiler,
                     configure_backends, data_budget, device_failure_reason, device_name, memory_figures,
                     place_splits, release_memory, resolve_device, split_bytes, uses_channels_last)
from .metrics import compute_metrics, metric_direction
from .predictions import encode_predictions
from ..models.strategies import StrategyModel, build_strategy_model, check_strategy, count_trainable
from ..models.truncation import analyze_cuts, input_shape, truncate

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
STATUSES = ("complete", "failed", "pruned")


@dataclass
class TrialConfig:
    """Everything one fine-tuning run needs. Defaults follow the paper where it says."""

    backbone: str = "test_cnn"
    """Registered backbone (``ttl-search backbones``)."""
    weights: str | None = "default"
    """``default`` (the backbone's first named weights, random for test backbones), a weights
    name, a file path, or ``none`` for random init."""
    cut: int | None = None
    """Cut index (1-based); None means the last cut (the whole backbone)."""
    strategy: str = "ttl"
    """``ttl``, ``full``, ``linear_probe``, ``lwft``, ``transfusion`` or ``scratch``."""
    head: str = "pool"
    """New head: ``pool`` (global average pooling + linear) or ``flatten`` (flatten + linear)."""
    frozen_units: int | None = None
    """LWFT only: units frozen at the bottom (default: the first stage)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the data comes from (see :class:`~ttl_search.data.DataConfig`)."""
    input_size: int | None = None
    """Model input side in pixels/voxels; None uses the data's own image size."""
    in_channels: int | None = None
    """Model input channels; None: 3 for 2D backbones (gray replicated), the data's for 3D."""
    augment: bool = True
    """The paper's training augmentation (random resized crop + horizontal flip; flips in 3D)."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Area range of the random resized crop."""
    optimizer: str = "adam"
    """``adam`` (the paper's), ``adamw`` or ``sgd`` (momentum 0.9)."""
    lr: float = 1e-4
    """Learning rate (LWFT trains the unfrozen units at lr/10)."""
    weight_decay: float = 0.0
    """Weight decay."""
    batch_size: int = 64
    """Training batch size."""
    max_epochs: int = 30
    """Upper bound on training epochs."""
    early_stopping: int = 10
    """Stop after this many epochs without a better validation metric; 0 disables."""
    lr_factor: float = 0.5
    """ReduceLROnPlateau factor on the validation loss."""
    lr_patience: int = 5
    """ReduceLROnPlateau patience in epochs."""
    class_weighted: bool = False
    """Weight the cross-entropy by inverse class frequency of the training split."""
    ema: float = 0.0
    """Decay per optimizer step of an exponential moving average of the weights (batch-norm
    statistics included), e.g. 0.95; 0 disables it. When set, validation, checkpoint selection,
    test and the stored weights all use the averaged model."""
    metric: str = "auroc"
    """Validation metric that selects the checkpoint (``auroc``, ``auprc``, ``accuracy``...)."""
    seed: int = 0
    """Seed of weights init of the head, shuffling and augmentation."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` (a lone trial). A study's
    trials run on the GPU Ray assigns them, and on the CPU when it assigns none
    (``resources.gpus: 0``): there only ``auto``, ``cpu`` (with no GPUs) and ``cuda`` (with GPUs)
    are valid."""
    amp: bool = True
    """Mixed precision on CUDA (channels-last 2D models too): bfloat16 autocast where the GPU runs it
    natively, else float16 with gradient scaling (a GPU that only emulates bfloat16 is slower in it)."""
    compile: bool = False
    """Train and evaluate through ``torch.compile`` (the first epoch pays the compilation;
    ``benchmarks/throughput.py --compile`` measures whether it pays off). Checkpoints and cost
    figures come from the uncompiled model, so they are the same either way. Needs a C compiler
    for Triton on CUDA (a C++ compiler on the CPU); a trial refuses to start without one."""
    deterministic: bool = False
    """Deterministic algorithms (``torch.use_deterministic_algorithms``, cuDNN deterministic and
    its autotuner off, a fixed cuBLAS workspace), so that a trial retried on a GPU reproduces its
    numbers. The cost is speed on CUDA: cuDNN's fastest convolutions for the batch shape are not
    chosen, and some operations run slower deterministic kernels (``benchmarks/gpu_check.py``
    measures it on a GPU; it was not measured on one yet). No effect on the CPU, whose trials are
    reproducible anyway."""
    threads: int | None = None
    """torch CPU threads; None uses every core (a Ray trial passes the CPUs it was given)."""
    latency_repeats: int = 10
    """Timed forward passes of the latency measurement; 0 skips it. A study's trials time nothing:
    its quiet latency pass after the search times every model alone, with at least 20 passes
    (median and interquartile range); a lone trial (``ttl-search train``) times itself."""
    eval_batch_size: int = 256
    """Batch size of validation and test passes."""

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        self.crop_scale = tuple(self.crop_scale)  # type: ignore[assignment]
        validate_trial_config(self)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["crop_scale"] = list(self.crop_scale)
        return out


def validate_trial_config(cfg: TrialConfig) -> None:
    """Check values a dataclass cannot; messages name the key and the valid choices."""
    spec = get_backbone(cfg.backbone)
    check_strategy(cfg.strategy)
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer {cfg.optimizer!r} is unknown; valid optimizers: {choices(OPTIMIZERS)}")
    metric_direction(cfg.metric)
    for key in ("batch_size", "max_epochs", "eval_batch_size"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"lr must be a positive number, got {cfg.lr!r}")
    if isinstance(cfg.ema, bool) or not (isinstance(cfg.ema, (int, float)) and 0 <= cfg.ema < 1):
        raise ConfigError(f"ema must be a decay in [0, 1) (0 disables the weight average), got {cfg.ema!r}")
    if cfg.cut is not None and not (isinstance(cfg.cut, int) and 1 <= cfg.cut <= len(spec.cuts)):
        raise ConfigError(f"cut {cfg.cut!r} does not exist for {spec.name}; valid cuts: 1..{len(spec.cuts)} or null")
    if not DEVICE_PATTERN.match(str(cfg.device)):
        raise ConfigError(f"device {cfg.device!r} is unknown; valid devices: auto, cpu, cuda, cuda:N")


@dataclass
class TrialResult:
    """What a trial reports: metrics of the selected checkpoint, its cost, and how it went."""

    status: str
    """``complete``, ``failed`` (see ``reason``) or ``pruned`` (stopped by the callback)."""
    reason: str = ""
    """Why a trial failed or was pruned (``diverged``...)."""
    backbone: str = ""
    """Backbone name."""
    strategy: str = ""
    """Strategy name."""
    cut: int = 0
    """Cut index of the model."""
    cut_name: str = ""
    """Last kept unit."""
    stage: int = 0
    """Stage of the cut."""
    seed: int = 0
    """Trial seed."""
    val: dict[str, float] = field(default_factory=dict)
    """Validation metrics of the selected checkpoint."""
    test: dict[str, float] = field(default_factory=dict)
    """Test metrics of the selected checkpoint (computed once)."""
    best_epoch: int = 0
    """1-based epoch of the selected checkpoint."""
    epochs: int = 0
    """Epochs trained."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per epoch: train loss, learning rate and validation metrics."""
    params: int = 0
    """Parameters of the trained model."""
    trainable_params: int = 0
    """Parameters that received gradients."""
    macs: int = 0
    """MACs of one forward pass at the input size."""
    latency_ms: dict[str, float] = field(default_factory=dict)
    """Median inference latency: ``batch1`` and ``batch64`` in ms, and the device."""
    full: dict[str, Any] = field(default_factory=dict)
    """The same cost figures for the full (untruncated) model with the same head."""
    train_time_s: float = 0.0
    """Wall time of training (excluding data loading and cost measurement)."""
    input_size: int = 0
    """Model input side."""
    in_channels: int = 0
    """Model input channels."""
    device: str = ""
    """Device trained on."""
    device_name: str = ""
    """The device in words: the GPU's name, or the CPU's with its threads."""
    memory: dict[str, float] = field(default_factory=dict)
    """On CUDA: the trial's peak memory and the card's, in GiB (see
    :func:`~ttl_search.train.device.memory_figures`), and where each split's images were kept."""
    retry: bool = True
    """Whether running the trial again could end otherwise: not after a failure of the device
    (out of memory, a CUDA error), which the same trial meets again."""
    data: dict[str, Any] = field(default_factory=dict)
    """Dataset name, md5, split sizes and class names."""
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``val`` and ``test`` labels and class probabilities of the selected checkpoint (encoded by
    :func:`~ttl_search.train.predictions.encode_predictions`), to recompute any metric later."""
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    """Weights of the selected checkpoint (CPU tensors); not part of ``to_dict``."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "state_dict"}


EpochCallback = Callable[[int, dict[str, float]], bool | None]
"""Called after each epoch with (epoch, validation metrics); returning True stops (prunes) the trial."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_weights(cfg: TrialConfig) -> str | None:
    """The weights ``cfg`` names, with ``default`` resolved to the backbone's first named weights."""
    if cfg.weights is None or str(cfg.weights).lower() != "default":
        return cfg.weights
    spec = get_backbone(cfg.backbone)
    return spec.weights[0].name if spec.weights else None


def make_optimizer(cfg: TrialConfig, groups: list[dict]) -> torch.optim.Optimizer:
    param_groups = [{"params": g["params"], "lr": cfg.lr * g["lr_scale"]} for g in groups]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


def _inputs(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, criterion: nn.Module,
             amp: torch.dtype | None = None, channels_last: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of ``model`` on ``loader``, and its labels and class probabilities (encoded);
    ``amp``: the autocast type (None: full precision). Everything stays on the device until the
    pass is over (one copy to the host, not one wait per batch)."""
    model.eval()
    probs, labels, losses, n = [], [], [], 0
    for x, y in loader:
        x, y = _inputs(x, device, channels_last), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        logits = logits.float()
        losses.append(criterion(logits, y).double() * len(y))
        n += len(y)
        probs.append(torch.softmax(logits, 1))
        labels.append(y)
    p = torch.cat(probs).cpu().numpy().astype(np.float64)
    y_true = torch.cat(labels).cpu().numpy()
    loss = float(torch.stack(losses).sum().item()) if losses else 0.0
    if not np.isfinite(p).all():
        raise TrialError("the model produced non-finite outputs", reason="diverged")
    return compute_metrics(y_true, p, loss / max(n, 1)), encode_predictions(y_true, p)


def _better(value: float, best: float | None, direction: str) -> bool:
    if best is None:
        return True
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value > best if direction == "maximize" else value < best


def data_summary(data: DatasetSplits) -> dict[str, Any]:
    """Dataset name, md5, source, class names, split sizes and task, as a result records them."""
    return {"name": data.name, "md5": data.md5, "source": data.source, "class_names": list(data.class_names),
            "train": len(data.train), "val": len(data.val), "test": len(data.test), "task": data.task}


@dataclass
class PreparedTrial:
    """The model of a trial (before training) and how its inputs are made."""

    loaded: LoadedBackbone
    """The backbone with its pretrained weights."""
    built: StrategyModel
    """The model the strategy asks for, with its parameter groups."""
    transform: TransformConfig
    """Input size, channels, normalisation and augmentation."""


def prepare_trial(cfg: TrialConfig, data: DatasetSplits) -> PreparedTrial:
    """Build the model and input transform of ``cfg`` for ``data`` (also used to rebuild a
    trained trial's model from its stored config for analysis and export)."""
    spec = get_backbone(cfg.backbone)
    if data.task.startswith("multi-label"):
        raise ConfigError(f"dataset {data.name} is multi-label; trials support binary-class, multi-class "
                          "and ordinal-regression tasks")
    if data.dims != spec.dims:
        raise ConfigError(f"backbone {spec.name} takes {spec.dims}D input but dataset {data.name} is {data.dims}D")
    input_size = cfg.input_size or int(data.train.images.shape[-1])
    in_channels = cfg.in_channels or (3 if spec.dims == 2 else data.channels)
    loaded = load_backbone(spec.name, resolve_weights(cfg), in_channels)
    built = build_strategy_model(loaded, cfg.strategy, cfg.cut, data.num_classes, cfg.head, input_size, cfg.frozen_units)
    mean = loaded.mean if in_channels == len(loaded.mean) else (float(np.mean(loaded.mean)),)
    std = loaded.std if in_channels == len(loaded.std) else (float(np.mean(loaded.std)),)
    return PreparedTrial(loaded, built, TransformConfig(input_size, in_channels, mean, std, cfg.augment, cfg.crop_scale))


def run_trial(cfg: TrialConfig, on_epoch: EpochCallback | None = None, data: DatasetSplits | None = None,
              keep_state: bool = False, gpu_share: float = 1.0) -> TrialResult:
    """Fine-tune one model and report it. A diverged loss gives a ``failed`` result, not an exception;
    so does a failure of the device (CUDA out of memory, a CUDA error), with its reason, batch size
    and memory figures, marked as not worth retrying (``retry``).

    Configuration and data errors raise (:class:`~ttl_search.errors.ConfigError`,
    :class:`~ttl_search.errors.DataError`...), since retrying cannot help them. ``gpu_share``: the
    fraction of the GPU this trial may use (a study's ``resources.gpus``), for the memory rule of
    its images (:func:`~ttl_search.train.device.data_budget`). Whatever happens, the memory the
    trial held is released for the next trial of this process
    (:func:`~ttl_search.train.device.release_memory`).
    """
    torch.set_num_threads(max(1, cfg.threads or os.cpu_count() or 1))
    device = resolve_device(cfg.device)
    if cfg.compile:
        check_compiler(device)
    configure_backends(device, cfg.deterministic)
    data = data if data is not None else load_data(cfg.data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        return _train(cfg, device, data, on_epoch, keep_state, gpu_share)
    except DEVICE_ERRORS as exc:
        return _device_failure(cfg, device, exc, gpu_share)
    finally:
        release_memory(device, cfg.compile)


def _device_failure(cfg: TrialConfig, device: torch.device, exc: BaseException, gpu_share: float) -> TrialResult:
    """The failed result of a trial whose device failed (out of memory, a CUDA error)."""
    spec = get_backbone(cfg.backbone)
    cut = cfg.cut or len(spec.cuts)
    name = device_name(device)
    figures = memory_figures(device)
    reason = device_failure_reason(exc, name, cfg.batch_size, cfg.eval_batch_size, gpu_share, figures)
    log.warning("trial %s %s cut %d failed on %s: %s", spec.name, cfg.strategy, cut, device, reason)
    return TrialResult(status="failed", reason=reason, backbone=spec.name, strategy=cfg.strategy, cut=cut,
                       cut_name=spec.cuts[cut - 1].name, stage=spec.cuts[cut - 1].stage, seed=cfg.seed,
                       device=str(device), device_name=name, memory=figures, retry=False)


def _place(data: DatasetSplits, device: torch.device, tcfg: TransformConfig, dims: int,
           gpu_share: float) -> dict[str, str]:
    """Where each split keeps its images (the memory rule): on a GPU, train then validation then
    test on the device while they fit in the trial's image budget, else on the host; the CPU
    holds them all."""
    names = ("train", "val", "test")
    if device.type != "cuda":
        return dict.fromkeys(names, DEVICE)
    free, total = card_memory(device)
    budget = data_budget(gpu_share, total, free)
    sizes = {name: split_bytes(len(getattr(data, name)), int(getattr(data, name).images.shape[1]), tcfg.input_size,
                               dims) for name in names}
    # train and validation share the device during training; the test split is made only when it
    # is scored, after they are gone, so it is placed on its own
    placed = {**place_splits({k: sizes[k] for k in ("train", "val")}, budget), **place_splits({"test": sizes["test"]},
                                                                                             budget)}
    log.info("images: %s (budget %.2f GiB of the card's %.1f GiB at a share of %g)",
             ", ".join(f"{k} {sizes[k] / 2**30:.2f} GiB on the {placed[k]}" for k in names), budget / 2**30,
             total / 2**30, gpu_share)
    return placed


def _train(cfg: TrialConfig, device: torch.device, data: DatasetSplits, on_epoch: EpochCallback | None,
           keep_state: bool, gpu_share: float) -> TrialResult:
    """:func:`run_trial`'s training, selection, test and cost measurement."""
    amp = amp_dtype(device, cfg.amp)
    seed_everything(cfg.seed)
    prepared = prepare_trial(cfg, data)
    spec, built, tcfg = prepared.loaded.spec, prepared.built, prepared.transform
    input_size, in_channels = tcfg.input_size, tcfg.in_channels
    model = built.model.to(device)
    channels_last = uses_channels_last(device, data.dims)  # convolutions run faster on NHWC there
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cfg.compile else model  # what trains; ``model`` keeps the plain state dict
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    kept = ema.module if ema is not None else model  # whose weights a selected checkpoint stores
    judged = ema.module if ema is not None else net  # what is validated and selected
    cut_info = spec.cuts[built.cut - 1]
    placed = _place(data, device, tcfg, data.dims, gpu_share)

    def loader(name: str, train: bool, batch_size: int):
        return make_loader(getattr(data, name), tcfg, train=train, batch_size=batch_size, seed=cfg.seed,
                           dims=data.dims, device=device, store=placed[name])

    train_loader = loader("train", True, cfg.batch_size)
    val_loader = loader("val", False, cfg.eval_batch_size)

    weight = _class_weights(data.train.labels, data.num_classes).to(device) if cfg.class_weighted else None
    criterion = nn.CrossEntropyLoss(weight=weight)
    optimizer = make_optimizer(cfg, built.param_groups)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)  # bfloat16 needs no loss scaling
    direction = metric_direction(cfg.metric)

    result = TrialResult(
        status="complete", backbone=spec.name, strategy=cfg.strategy, cut=built.cut, cut_name=cut_info.name,
        stage=cut_info.stage, seed=cfg.seed, params=count_params(model),
        trainable_params=count_trainable(model),
        input_size=input_size, in_channels=in_channels, device=str(device), device_name=device_name(device),
        data=data_summary(data),
    )
    log.info("trial %s %s cut %d (%s) on %s: %s", spec.name, cfg.strategy, built.cut, cut_info.name,
             result.device_name, data.summary())

    best_value: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stale = 0
    start = time.perf_counter()
    try:
        for epoch in range(1, cfg.max_epochs + 1):
            train_loss = train_epoch(net, built.frozen, train_loader, optimizer, criterion, scaler, device, amp, epoch,
                                     channels_last, ema)
            val_metrics, val_predictions = evaluate(judged, val_loader, device, criterion, amp, channels_last)
            scheduler.step(val_metrics["loss"])
            lr_now = optimizer.param_groups[-1]["lr"]
            result.history.append({"epoch": epoch, "train_loss": train_loss, "lr": lr_now, **val_metrics})
            result.epochs = epoch
            value = val_metrics[cfg.metric]
            if _better(value, best_value, direction):
                best_value, result.best_epoch, result.val, stale = value, epoch, val_metrics, 0
                result.predictions["val"] = val_predictions
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in kept.state_dict().items()}
            else:
                stale += 1
            log.info("epoch %d: train loss %.4f, val %s %.4f", epoch, train_loss, cfg.metric, value)
            if on_epoch is not None and on_epoch(epoch, val_metrics):
                result.status, result.reason = "pruned", f"stopped by the scheduler after epoch {epoch}"
                break
            if cfg.early_stopping and stale >= cfg.early_stopping:
                log.info("early stopping after epoch %d", epoch)
                break
    except TrialError as exc:
        result.status, result.reason = "failed", exc.reason
        result.train_time_s = round(time.perf_counter() - start, 3)
        log.warning("trial failed (%s): %s", exc.reason, exc)
        return result
    result.train_time_s = round(time.perf_counter() - start, 3)
    del train_loader, val_loader  # the test split takes their place on the device

    model.load_state_dict(best_state)
    test_loader = loader("test", False, cfg.eval_batch_size)
    result.test, result.predictions["test"] = evaluate(net, test_loader, device, criterion, amp, channels_last)
    del test_loader
    _measure_cost(result, model, cfg, spec.name, input_size, in_channels, data.num_classes, device, data.dims, amp)
    if device.type == "cuda":
        result.memory = {**memory_figures(device), **{f"{k}_images": v for k, v in placed.items()}}
    if keep_state:
        result.state_dict = best_state
    return result


def train_epoch(model: nn.Module, frozen: list[nn.Module], loader, optimizer, criterion, scaler, device,
                 amp: torch.dtype | None, epoch: int, channels_last: bool = False,
                 ema: AveragedModel | None = None) -> float:
    """One pass over ``loader``; the mean training loss. ``ema`` (when given) is updated after every step.

    The losses are summed on the device and read once at the end of the epoch (a read per step
    would make the host wait for the GPU at every step); a loss that is not finite fails the trial
    then (``diverged``)."""
    model.train()
    for module in frozen:
        module.eval()
    loader.set_epoch(epoch)
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for x, y in loader:
        if len(y) < 2:  # a trailing batch of one breaks batch norm in training mode
            continue
        x, y = _inputs(x, device, channels_last), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = criterion(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        total += loss.detach().double() * len(y)
        n += len(y)
    mean = float(total.item()) / max(n, 1)
    if not math.isfinite(mean):
        raise TrialError(f"the training loss became {mean} in epoch {epoch}", reason="diverged")
    return mean


def _measure_cost(result: TrialResult, model: nn.Module, cfg: TrialConfig, backbone: str, input_size: int,
                  in_channels: int, num_classes: int, device: torch.device, dims: int,
                  amp: torch.dtype | None) -> None:
    """Parameters, MACs and (``latency_repeats``) latency of the trained model and of the full model
    with the same head. Both are timed as the trial runs them: the same memory format and precision
    (channels-last and autocast on CUDA, :func:`~ttl_search.train.device.as_trained`); the device is
    named in words (the GPU's name)."""
    spec = get_backbone(backbone)
    shape = input_shape(spec, input_size, in_channels)
    model.eval()
    result.macs = count_macs(model.cpu(), torch.zeros(1, *shape))
    model.to(device)
    full_row = analyze_cuts(backbone, input_size, num_classes, in_channels, cfg.head)[-1]
    result.full = {"params": full_row.params, "macs": full_row.macs, "cut": full_row.index}
    if cfg.latency_repeats <= 0:
        return
    name = device_name(device)
    lat = measure_latency(as_trained(model, device, dims, amp), shape, device, repeats=cfg.latency_repeats)
    result.latency_ms = {"batch1": lat.batch1_ms, "batch64": lat.batch64_ms, "device": name}
    if full_row.valid and cfg.cut not in (None, len(spec.cuts)):
        full = truncate(load_backbone(backbone, None, in_channels), len(spec.cuts), num_classes, cfg.head, input_size).to(device)
        full_lat = measure_latency(as_trained(full, device, dims, amp), shape, device, repeats=cfg.latency_repeats)
        result.full["latency_ms"] = {"batch1": full_lat.batch1_ms, "batch64": full_lat.batch64_ms, "device": name}
    else:
        result.full["latency_ms"] = dict(result.latency_ms)
