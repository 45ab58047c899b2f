"""Seeded, stratified (and group-aware) splitting and subsampling of labelled samples."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .config import DataConfig, DatasetSplits, SPLITS

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- splitting


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *salt])


def _stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: int, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """Split sample indices into ``len(fractions)`` parts, stratified by label and seeded.

    ``fractions`` sum to 1. With ``groups``, every group lands in one part (greedy assignment
    of groups, largest first, to the part whose per-class quota is least filled). An empty part
    gets one sample (group) from the largest part when that has more than one. Returns sorted
    index arrays.
    """
    rng = _rng(seed, 1)
    if groups is None:
        assignment = _assign_samples(labels, fractions, rng)
    else:
        assignment = _assign_groups(labels, groups, fractions, rng)
    return [np.flatnonzero(assignment == part) for part in range(len(fractions))]


def _assign_samples(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    assignment = np.zeros(len(labels), dtype=np.int64)
    shares = np.asarray(fractions, dtype=np.float64)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        raw = shares * len(idx)
        counts = np.floor(raw).astype(np.int64)
        for part in np.argsort(-(raw - counts), kind="stable")[: len(idx) - counts.sum()]:
            counts[part] += 1
        assignment[idx] = np.repeat(np.arange(len(shares)), counts)
    for part in range(len(shares)):
        if not (assignment == part).any():
            _fill_empty_part(assignment, labels, part, rng)
    return assignment


def _fill_empty_part(
    assignment: np.ndarray, labels: np.ndarray, part: int, rng: np.random.Generator
) -> None:
    """Move one sample into empty ``part``: from the largest part (later parts first on ties)
    that keeps every class it has, else from the largest part with more than one sample."""
    sizes = np.bincount(assignment, minlength=part + 1)
    donors = sorted(range(len(sizes)), key=lambda q: (-sizes[q], -q))
    best: tuple[int, Any] | None = None
    for donor in donors:
        if sizes[donor] < 2:
            break
        values, counts = np.unique(labels[assignment == donor], return_counts=True)
        choice = (donor, values[int(np.argmax(counts))])
        if counts.max() > 1:
            best = choice
            break
        best = best or choice
    if best is not None:
        donor, cls = best
        assignment[rng.choice(np.flatnonzero((assignment == donor) & (labels == cls)))] = part


def _assign_groups(
    labels: np.ndarray, groups: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    classes, label_idx = np.unique(labels, return_inverse=True)
    group_ids, group_idx = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(group_ids), len(classes)), dtype=np.float64)
    np.add.at(counts, (group_idx, label_idx), 1)
    totals = counts.sum(axis=0)
    targets = np.asarray(fractions, dtype=np.float64)[:, None] * totals[None, :]
    filled = np.zeros_like(targets)
    order = rng.permutation(len(group_ids))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    group_part = np.zeros(len(group_ids), dtype=np.int64)
    for g in order:
        score = ((targets - filled) / np.maximum(totals, 1)[None, :]) @ counts[g]
        part = int(np.argmax(score))
        group_part[g] = part
        filled[part] += counts[g]
    for part in range(len(fractions)):
        n_groups = np.bincount(group_part, minlength=len(fractions))
        donor = int(np.argmax(n_groups))
        if n_groups[part] == 0 and n_groups[donor] > 1:
            donors = np.flatnonzero(group_part == donor)
            group_part[donors[int(np.argmin(counts[donors].sum(axis=1)))]] = part
    return group_part[group_idx]


def _subsample(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified, seeded ``fraction`` of the samples (>= 1 per class).

    Multi-label data (2D labels) is subsampled uniformly at random.
    """
    if fraction >= 1:
        return np.arange(len(labels))
    rng = _rng(seed, 2)
    if labels.ndim != 1:
        keep = max(1, round(fraction * len(labels))) if len(labels) else 0
        return np.sort(rng.permutation(len(labels))[:keep])
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        chosen.append(rng.permutation(idx)[: max(1, round(fraction * len(idx)))])
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def _cross_validation_fold(data: DatasetSplits, cfg: DataConfig) -> None:
    """Pool train and validation, split them into ``cfg.folds`` stratified, seeded folds, and make
    fold ``cfg.fold`` the validation split and the others the training split."""
    labels = torch.cat([data.train.labels, data.val.labels])
    if labels.ndim != 1:
        raise ConfigError(f"{data.name}: cross-validation folds need single-label data (this is {data.task})")
    smallest = int(torch.bincount(labels, minlength=data.num_classes).min()) if len(labels) else 0
    if smallest < cfg.folds:
        raise ConfigError(f"{data.name}: the rarest class has {smallest} samples in train+validation, fewer "
                          f"than the {cfg.folds} folds asked for (selection.folds)")
    pooled = data.train.join(data.val)
    groups = pooled.groups
    if groups is not None and len(np.unique(groups)) < cfg.folds:
        raise ConfigError(f"{data.name}: train+validation hold {len(np.unique(groups))} groups, fewer than "
                          f"the {cfg.folds} folds asked for (selection.folds)")
    parts = _stratified_split(labels.numpy(), [1.0 / cfg.folds] * cfg.folds, cfg.seed, groups)
    rest = np.sort(np.concatenate([p for i, p in enumerate(parts) if i != cfg.fold]))
    data.train, data.val = pooled.take(rest), pooled.take(parts[cfg.fold])
    log.info("%s: fold %d of %d validates (%d samples), the other folds train (%d)",
             data.name, cfg.fold + 1, cfg.folds, len(data.val), len(data.train))


def _finish(data: DatasetSplits, cfg: DataConfig) -> DatasetSplits:
    """Apply cross-validation folds and ``train_fraction``, and reject empty splits."""
    if cfg.folds > 1:
        _cross_validation_fold(data, cfg)
    if cfg.train_fraction < 1:
        before = len(data.train)
        keep = _subsample(data.train.labels.numpy(), cfg.train_fraction, cfg.seed)
        data.train = data.train.take(keep)
        log.info(
            "%s: train_fraction %.3g keeps %d of %d training samples",
            data.name, cfg.train_fraction, len(data.train), before,
        )
    for name in SPLITS:
        if len(getattr(data, name)) == 0:
            raise DataError(
                f"{data.source}: the {name} split is empty; every split needs at least one "
                "sample (add data, or change val_fraction/test_fraction/train_fraction)"
            )
    log.info("%s", data.summary())
    return data
