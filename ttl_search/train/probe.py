"""The frozen probe: score every cut of a pretrained backbone from one forward pass.

The frozen pretrained units run once over train, validation and test (no augmentation); after
each cut the feature map is globally average-pooled over every spatial axis, so a cut keeps only
an ``N x C_cut`` matrix per split. Per cut, on those pooled features:

* a logistic-regression probe: features standardised with the training split's mean and
  standard deviation, ``C`` chosen from :attr:`ProbeConfig.c_grid` by stratified 3-fold
  cross-validation on the training split (scored with the study metric), refitted on the whole
  training split; with the trial's ``class_weighted``, every class weighs the same in its loss; its validation metric is ``probe_val`` and its test metric ``probe_test``
  (computed once, never used to decide anything);
* a kNN score ``knn_val``: the validation metric of a k-nearest-neighbour classifier (cosine
  distance on the standardised features) fitted on the training split;
* LogME (You et al., ICML 2021): the maximised log evidence per sample of a Bayesian linear
  model from the training features to each one-hot label column, averaged over classes.

The probe's standardisation is folded into a linear head on the *raw* pooled features, so that
``softmax(W @ pooled + b)`` equals the probe's probabilities: loaded into ``head.fc`` of
``truncate(loaded, cut, num_classes)`` (a :class:`~ttl_search.models.truncation.PoolHead`),
the truncated model predicts exactly what the probe predicts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..data import DatasetSplits, Split, TransformConfig, load_data, make_loader
from ..errors import ConfigError, DataError, choices
from ..models.backbones import LoadedBackbone
from ..models.truncation import CutInfo, analyze_cuts
from .metrics import metric_direction, metric_value
from .predictions import encode_predictions
from .trial import TrialConfig, data_summary, prepare_trial, resolve_device, seed_everything

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
CV_FOLDS = 3
"""Folds of the cross-validation that chooses the probe's ``C``."""
ABSENT_CLASS_BIAS = -1e4
"""Head bias of a class the training split lacks: its probability is exactly 0 (as the probe's)."""
MB = float(2**20)


@dataclass
class ProbeConfig:
    """How the frozen probe scores the cuts."""

    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    """Inverse regularisation strengths tried by the logistic-regression probe (chosen by 3-fold CV on train)."""
    knn_k: int = 10
    """Neighbours of the kNN score."""
    batch_size: int = 128
    """Images per batch of the forward pass."""
    max_iter: int = 1000
    """Iterations of the logistic-regression solver."""
    run: bool | None = None
    """Run the probe before the search: its table is shown next to the fine-tuned cuts, its model
    at every cut is a candidate for the answer (``selection.candidates: all``), and its best probe
    is stored as a model (strategy ``probe``). None (default): before a two-stage or exhaustive
    search with a pool head; true: before any search but TPE; false: never (a guided search always
    runs it)."""

    def __post_init__(self) -> None:
        if self.run is not None and not isinstance(self.run, bool):
            raise ConfigError(f"probe.run must be true, false or null (the default: before a two-stage or exhaustive "
                              f"search), got {self.run!r}")
        grid = tuple(self.c_grid) if isinstance(self.c_grid, (list, tuple)) else ()
        if not grid:
            raise ConfigError(f"probe.c_grid must be a non-empty list of positive numbers, got {self.c_grid!r}")
        for value in grid:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"probe.c_grid values must be positive finite numbers, got {value!r}")
        self.c_grid = tuple(float(v) for v in grid)
        for key in ("knn_k", "batch_size", "max_iter"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"probe.{key} must be a positive integer, got {value!r}")


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass
class ProbeRow:
    """The probe's scores of one cut."""

    cut: int
    """1-based cut index."""
    name: str
    """Last kept unit."""
    stage: int
    """Stage of the cut."""
    params: int
    """Parameters of ``truncate(loaded, cut, num_classes)`` with a pool head."""
    channels: int
    """Pooled feature dimension (output channels of the cut)."""
    probe_val: float
    """Validation metric of the logistic-regression probe."""
    knn_val: float
    """Validation metric of the kNN classifier."""
    logme: float
    """LogME of the training features (mean log evidence per sample, averaged over classes)."""
    probe_test: float
    """Test metric of the logistic-regression probe (computed once, never used to decide)."""
    c: float
    """The ``C`` chosen by cross-validation."""
    seconds: float
    """Wall seconds of this cut's probe work (after the forward pass)."""

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-safe values (non-finite floats become None)."""
        row = asdict(self)
        for key, value in row.items():
            if isinstance(value, float):
                row[key] = _json_float(value)
        return row


@dataclass
class ProbeResult:
    """Every probed cut of one backbone on one dataset."""

    rows: list[ProbeRow]
    """One row per probed cut, in cut order."""
    metric: str
    """The metric of ``probe_val``, ``knn_val``, ``probe_test`` and the choice of ``C``."""
    backbone: str
    """Backbone name."""
    input_size: int
    """Model input side."""
    in_channels: int
    """Model input channels."""
    num_classes: int
    """Classes of the task."""
    device: str
    """Device of the forward pass."""
    feature_seconds: float
    """Wall seconds of the forward pass over train, validation and test."""
    seconds: float
    """Wall seconds of everything (data loading included when ``run_probe`` loads it)."""
    peak_feature_mb: float
    """Size of every pooled feature matrix kept, in MB (2**20 bytes)."""
    predictions: dict[int, dict[str, dict]] = field(default_factory=dict, repr=False)
    """Cut -> ``{"val": ..., "test": ...}`` labels and probe probabilities
    (:func:`~ttl_search.train.predictions.encode_predictions`)."""
    heads: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    """Cut -> ``(W, b)``, float32 of shapes ``(K, C_cut)`` and ``(K,)``: ``softmax(W @ pooled + b)``
    on raw pooled features equals the probe's probabilities (for ``head.fc`` of a pool head)."""
    data: dict[str, Any] = field(default_factory=dict)
    """Dataset name, md5, split sizes and class names."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; ``heads`` (numpy arrays) are left out."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("rows", "heads", "predictions")}
        out["rows"] = [row.as_dict() for row in self.rows]
        out["predictions"] = {str(cut): value for cut, value in self.predictions.items()}
        return out


@dataclass
class ProbeFit:
    """What :func:`fit_probe` finds for one cut."""

    probe_val: float
    """Validation metric of the logistic-regression probe."""
    knn_val: float
    """Validation metric of the kNN classifier."""
    logme: float
    """LogME of the training features."""
    probe_test: float
    """Test metric of the logistic-regression probe."""
    c: float
    """The chosen ``C``."""
    weight: np.ndarray = field(repr=False)
    """float32 ``(K, C_cut)`` head weight on raw pooled features."""
    bias: np.ndarray = field(repr=False)
    """float32 ``(K,)`` head bias."""
    val_probs: np.ndarray = field(repr=False)
    """Probe probabilities on the validation split, ``(N_val, K)``."""
    test_probs: np.ndarray = field(repr=False)
    """Probe probabilities on the test split, ``(N_test, K)``."""
    seconds: float = 0.0
    """Wall seconds of the fit."""


# --------------------------------------------------------------------------- features


def check_probe_cuts(backbone: str, input_size: int, in_channels: int, num_classes: int,
                     cuts: Sequence[int] | None) -> list[CutInfo]:
    """The analysis rows of ``cuts`` (all valid cuts when None) at ``input_size``, in cut order;
    :class:`ConfigError` naming the valid cuts when one does not exist or is invalid there."""
    table = analyze_cuts(backbone, input_size, max(2, num_classes), in_channels, "pool")
    valid = [row.index for row in table if row.valid]
    if not valid:
        raise ConfigError(f"no cut of {backbone} works at {input_size} px input: {table[0].reason}")
    if cuts is None:
        return [table[i - 1] for i in valid]
    if isinstance(cuts, (int, str)) or not len(cuts):
        raise ConfigError(f"cuts must be a non-empty list of cut indices; valid cuts of {backbone} at "
                          f"{input_size} px: {choices(valid)}")
    for cut in cuts:
        if isinstance(cut, bool) or not isinstance(cut, (int, np.integer)) or int(cut) not in valid:
            reason = ""
            if isinstance(cut, (int, np.integer)) and 1 <= int(cut) <= len(table):
                reason = f" ({table[int(cut) - 1].reason})"
            raise ConfigError(f"cut {cut!r} cannot be probed for {backbone} at {input_size} px input{reason}; "
                              f"valid cuts: {choices(valid)}")
    return [table[i - 1] for i in sorted({int(c) for c in cuts})]


@contextlib.contextmanager
def _frozen_eval(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Move ``modules`` to ``device`` in eval mode; their train/eval modes are restored after."""
    modes = [[m.training for m in module.modules()] for module in modules]
    for module in modules:
        module.to(device).eval()
    try:
        yield
    finally:
        for module, saved in zip(modules, modes):
            for sub, mode in zip(module.modules(), saved):
                sub.training = mode


def pooled_features(loaded: LoadedBackbone, split: Split, transform: TransformConfig, dims: int,
                    cuts: Sequence[int], device: torch.device | str, batch_size: int) -> dict[int, np.ndarray]:
    """Globally average-pooled features after each of ``cuts``: cut -> float32 ``(N, C_cut)``.

    One pass of the frozen units (eval mode, no gradients, no augmentation) over ``split``,
    batch by batch; only the pooled features are kept (on the CPU). The units are moved to
    ``device`` (and stay there); their train/eval modes are restored.
    """
    if transform.in_channels != loaded.in_channels:
        raise ConfigError(f"transform.in_channels ({transform.in_channels}) differs from the backbone's "
                          f"input channels ({loaded.in_channels})")
    rows = check_probe_cuts(loaded.spec.name, transform.input_size, loaded.in_channels, 2, cuts)
    wanted = {row.index for row in rows}
    n = len(split)
    out = {row.index: np.empty((n, row.channels), dtype=np.float32) for row in rows}
    modules = [module for _, _, module in loaded.units[:max(wanted)]]
    device = torch.device(device)
    loader = make_loader(split, transform, train=False, batch_size=batch_size, seed=0, dims=dims)
    start = 0
    with _frozen_eval(modules, device), torch.no_grad():
        for images, _ in loader:
            stop = start + len(images)
            x = images.to(device, non_blocking=True)
            for index, module in enumerate(modules, start=1):
                x = module(x)
                if index in wanted:
                    out[index][start:stop] = x.flatten(2).mean(-1).float().cpu().numpy()
            start = stop
    return out


# --------------------------------------------------------------------------- LogME


def logme_evidence(features: np.ndarray, target: np.ndarray, max_iter: int = 100,
                   tol: float = 1e-5) -> tuple[float, float, float]:
    """Maximised log evidence per sample of ``target ~ N(features @ w, 1/beta)``, ``w ~ N(0, 1/alpha)``.

    MacKay's fixed-point iteration on ``(alpha, beta)`` in the eigenbasis of ``F^T F`` (from the
    SVD of ``F``), as LogME does (You et al., 2021, Algorithm 1). Returns
    ``(log evidence / N, alpha, beta)``.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2  # the nonzero-or-not eigenvalues of F^T F (min(N, D) of them; the rest are 0)
    z = u.T @ y  # the target in the left singular basis
    y_sq = float(y @ y)
    outside = max(y_sq - float(z @ z), 0.0)  # part of y outside the column space of F
    tiny = 1e-12 * max(y_sq, 1.0)
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        shrink = beta * sigma / (alpha + beta * sigma)
        gamma = float(shrink.sum())
        m_sq = float(np.sum((beta * s * z / (alpha + beta * sigma)) ** 2))
        residual = outside + float(np.sum((z * alpha / (alpha + beta * sigma)) ** 2))
        new_alpha = gamma / max(m_sq, tiny)
        new_beta = max(n - gamma, tiny) / max(residual, tiny)
        converged = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
        alpha, beta = max(new_alpha, 1e-12), new_beta
        if converged:
            break
    m_sq = float(np.sum((beta * s * z / (alpha + beta * sigma)) ** 2))
    residual = outside + float(np.sum((z * alpha / (alpha + beta * sigma)) ** 2))
    log_det = float(np.sum(np.log(alpha + beta * sigma))) + (d - len(sigma)) * math.log(alpha)
    evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - log_det / 2 - beta / 2 * residual
                - alpha / 2 * m_sq - n / 2 * math.log(2 * math.pi))
    return evidence / n, alpha, beta


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of ``features`` (N x D) for integer ``labels`` (N,): the mean over the classes
    present of :func:`logme_evidence` of the one-hot label column (higher: better features)."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if f.ndim != 2 or f.shape[0] != y.shape[0] or f.shape[0] == 0:
        raise ValueError(f"features must be (N, D) with N = {y.shape[0]} > 0, got {f.shape}")
    return float(np.mean([logme_evidence(f, (y == k).astype(np.float64))[0] for k in np.unique(y)]))


# --------------------------------------------------------------------------- one cut


def _all_classes(probs: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities over every class from a classifier that saw only ``classes``."""
    out = np.zeros((probs.shape[0], num_classes), dtype=np.float64)
    out[:, classes] = probs
    return out


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale of the training features. The scale is floored at 1e-3 of the mean's size
    (so that folding it into a float32 head stays exact) and is 1 for constant features."""
    mean = x.mean(axis=0, dtype=np.float64)
    scale = np.maximum(x.std(axis=0, dtype=np.float64), 1e-3 * np.abs(mean))
    scale[scale < 1e-8] = 1.0
    return mean, scale


def _logistic(c: float, max_iter: int, class_weighted: bool = False):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter, class_weight="balanced" if class_weighted else None)


def _fit_quietly(model, x: np.ndarray, y: np.ndarray):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def _choose_c(x: np.ndarray, y: np.ndarray, num_classes: int, metric: str, cfg: ProbeConfig, seed: int,
              class_weighted: bool = False) -> float:
    """The ``C`` of ``cfg.c_grid`` with the best mean cross-validated ``metric`` (ties: the smaller)."""
    grid = sorted(cfg.c_grid)
    folds = min(CV_FOLDS, int(np.bincount(y)[np.unique(y)].min()))
    if len(grid) == 1:
        return grid[0]
    if folds < 2:
        c = 1.0 if 1.0 in grid else grid[len(grid) // 2]
        log.warning("a class has one training sample: no cross-validation, the probe takes C=%g", c)
        return c
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    scores = {c: [] for c in grid}
    for fit_idx, held_idx in splitter.split(x, y):
        for c in grid:
            model = _fit_quietly(_logistic(c, cfg.max_iter, class_weighted), x[fit_idx], y[fit_idx])
            probs = _all_classes(model.predict_proba(x[held_idx]), model.classes_, num_classes)
            scores[c].append(metric_value(metric, y[held_idx], probs))
    maximize = metric_direction(metric) == "maximize"
    best, best_value = grid[0], None
    for c in grid:
        values = np.asarray(scores[c], dtype=np.float64)
        value = float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else math.nan
        if best_value is None or (math.isfinite(value) and (not math.isfinite(best_value) or (
                value > best_value if maximize else value < best_value))):
            best, best_value = c, value
    return best


def _folded_head(model, mean: np.ndarray, scale: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` on raw features with ``softmax(W x + b) == model.predict_proba((x - mean) / scale)``."""
    coef = np.asarray(model.coef_, dtype=np.float64)
    intercept = np.asarray(model.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2])[1]
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = coef / scale
    bias = intercept - weight @ mean
    full_w = np.zeros((num_classes, weight.shape[1]), dtype=np.float64)
    full_b = np.full(num_classes, ABSENT_CLASS_BIAS, dtype=np.float64)
    full_w[model.classes_], full_b[model.classes_] = weight, bias
    return full_w.astype(np.float32), full_b.astype(np.float32)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
              test_x: np.ndarray, test_y: np.ndarray, num_classes: int, metric: str,
              probe_cfg: ProbeConfig | None = None, seed: int = 0, class_weighted: bool = False) -> ProbeFit:
    """Logistic-regression probe, kNN score and LogME of one cut's pooled features (see the module);
    ``class_weighted``: every class weighs the same in the probe's loss, as in a class-weighted
    trial (its decision threshold then balances the classes as the fine-tuned models' do)."""
    from sklearn.neighbors import KNeighborsClassifier

    start = time.perf_counter()
    cfg = probe_cfg or ProbeConfig()
    metric_direction(metric)
    train_y, val_y, test_y = (np.asarray(y, dtype=np.int64).reshape(-1) for y in (train_y, val_y, test_y))
    present = np.unique(train_y)
    if len(present) < 2:
        raise DataError(f"the probe needs at least two classes in the training split, got {choices(present)}")
    mean, scale = _standardiser(train_x)
    std_train, std_val, std_test = ((np.asarray(x, dtype=np.float64) - mean) / scale for x in (train_x, val_x, test_x))

    c = _choose_c(std_train, train_y, num_classes, metric, cfg, seed, class_weighted)
    model = _fit_quietly(_logistic(c, cfg.max_iter, class_weighted), std_train, train_y)
    if np.max(model.n_iter_) >= cfg.max_iter:
        log.debug("the logistic regression (C=%g) stopped at max_iter=%d before converging", c, cfg.max_iter)
    val_probs = _all_classes(model.predict_proba(std_val), model.classes_, num_classes)
    test_probs = _all_classes(model.predict_proba(std_test), model.classes_, num_classes)
    weight, bias = _folded_head(model, mean, scale, num_classes)

    knn = KNeighborsClassifier(n_neighbors=min(cfg.knn_k, len(train_y)), metric="cosine", algorithm="brute")
    knn.fit(std_train, train_y)
    knn_probs = _all_classes(knn.predict_proba(std_val), knn.classes_, num_classes)

    return ProbeFit(
        probe_val=metric_value(metric, val_y, val_probs), knn_val=metric_value(metric, val_y, knn_probs),
        logme=logme(train_x, train_y), probe_test=metric_value(metric, test_y, test_probs), c=c,
        weight=weight, bias=bias, val_probs=val_probs, test_probs=test_probs,
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------- every cut


def run_probe(cfg: TrialConfig, probe: ProbeConfig | None = None, data: DatasetSplits | None = None,
              cuts: Sequence[int] | None = None,
              progress: Callable[[int, int], None] | None = None) -> ProbeResult:
    """Probe ``cuts`` (default: every cut valid at the input size) of ``cfg``'s pretrained backbone
    on ``cfg``'s data (or ``data``) from one frozen forward pass; ``progress(done, total)`` is
    called after each cut."""
    start = time.perf_counter()
    probe = probe or ProbeConfig()
    torch.set_num_threads(max(1, cfg.threads or os.cpu_count() or 1))
    device = resolve_device(cfg.device)
    data = data if data is not None else load_data(cfg.data)
    seed_everything(cfg.seed)
    # Cut 1 rather than the last cut: prepare_trial builds (copies) that model, and the last cut
    # may be invalid at small inputs; the probe needs only the loaded backbone and the transform.
    prepared = prepare_trial(replace(cfg, strategy="ttl", cut=1, head="pool", augment=False), data)
    loaded, tcfg = prepared.loaded, prepared.transform
    spec = loaded.spec
    rows_info = check_probe_cuts(spec.name, tcfg.input_size, tcfg.in_channels, data.num_classes, cuts)
    indices = [row.index for row in rows_info]
    log.info("probing %d cuts of %s (weights %s) on %s: %s", len(indices), spec.name, loaded.weights, device,
             data.summary())

    feature_start = time.perf_counter()
    features = {name: pooled_features(loaded, getattr(data, name), tcfg, data.dims, indices, device,
                                      probe.batch_size) for name in SPLIT_NAMES}
    feature_seconds = time.perf_counter() - feature_start
    feature_mb = sum(x.nbytes for per_cut in features.values() for x in per_cut.values()) / MB
    log.info("frozen forward pass: %.1f s, %.1f MB of pooled features", feature_seconds, feature_mb)

    labels = {name: getattr(data, name).labels.numpy().astype(np.int64) for name in SPLIT_NAMES}
    result = ProbeResult(rows=[], metric=cfg.metric, backbone=spec.name, input_size=tcfg.input_size,
                         in_channels=tcfg.in_channels, num_classes=data.num_classes, device=str(device),
                         feature_seconds=round(feature_seconds, 3), seconds=0.0,
                         peak_feature_mb=round(feature_mb, 3), data=data_summary(data))
    for done, info in enumerate(rows_info, start=1):
        fit = fit_probe(features["train"][info.index], labels["train"], features["val"][info.index], labels["val"],
                        features["test"][info.index], labels["test"], data.num_classes, cfg.metric, probe, cfg.seed,
                        cfg.class_weighted)
        result.rows.append(ProbeRow(info.index, info.name, info.stage, int(info.params), int(info.channels),
                                    fit.probe_val, fit.knn_val, fit.logme, fit.probe_test, fit.c,
                                    round(fit.seconds, 3)))
        result.predictions[info.index] = {"val": encode_predictions(labels["val"], fit.val_probs),
                                          "test": encode_predictions(labels["test"], fit.test_probs)}
        result.heads[info.index] = (fit.weight, fit.bias)
        log.info("cut %d (%s): probe %s %.4f (C=%g), knn %.4f, LogME %.4f, %.2f s", info.index, info.name,
                 cfg.metric, fit.probe_val, fit.c, fit.knn_val, fit.logme, fit.seconds)
        if progress is not None:
            progress(done, len(rows_info))
    result.seconds = round(time.perf_counter() - start, 3)
    return result
