"""The statistics behind choosing a truncation cut on a small validation set.

A validation set of a few hundred images gives a metric with a wide sampling error, so the
search's answer is chosen with intervals rather than on point estimates alone:

- :func:`score_candidates` gives each candidate (a cut, or a ``(strategy, cut)``) its point
  estimate, a stratified percentile-bootstrap interval, and a *paired* bootstrap interval of its
  difference to a reference candidate (by default the best one).
- :func:`choose` applies a selection rule: ``best`` (the best point estimate) or
  ``smallest_within_ci`` (the smallest model whose difference to the best is not significant).

Bootstrap details:

* Stratified: within each fold, indices are drawn with replacement separately per class, with
  the class counts of the fold, so every resample keeps the class balance (AUROC is defined).
* Paired and reproducible: one set of resampled indices per fold, drawn from that fold's labels
  with ``np.random.default_rng([seed, fold])`` and shared by every candidate and every seed. A
  candidate whose folds or labels differ from the reference's (another validation set) cannot
  be paired: its interval uses its own labels' draws, its ``diff_ci`` is ``(nan, nan)``.
* Per resample ``b``: ``score_b = mean over folds of (mean over seeds of metric(resample b))``;
  intervals are the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles.
  Undefined metric values (``nan``) are left out of the means and percentiles.

AUROC is computed for all resamples at once from count matrices (how often each sample is
drawn) and the pairwise comparison matrix of the scores; accuracy, balanced accuracy and the
loss from per-sample terms. The other metrics loop over resamples with :func:`metric_value`.
All paths read the same draws and give the same numbers as the loop.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence, TypeVar

import numpy as np

from ..errors import ConfigError, choices
from .budget import BudgetConfig
from ..train.metrics import LOSS_CLIP, MAXIMIZE, METRICS, MINIMIZE, metric_direction, metric_value

K = TypeVar("K", bound=Hashable)

BEST = "best"
SMALLEST_WITHIN_CI = "smallest_within_ci"
RULES = (BEST, SMALLEST_WITHIN_CI)
"""The selection rules :func:`choose` knows."""
ENSEMBLE_CUTS = "indistinguishable"
"""``selection.ensemble`` value: the answer averages every cut indistinguishable from the best."""
ALL_CANDIDATES = "all"
TTL_CANDIDATES = "ttl"
CANDIDATE_POOLS = (ALL_CANDIDATES, TTL_CANDIDATES)
"""``selection.candidates``: every model the study holds, or the fine-tuned TTL cuts alone."""
GUARD_METRICS = tuple(METRICS)
"""Metrics a guard may name (``selection.guards``): every metric a trial reports."""
DEFAULT_GUARDS = ("balanced_accuracy",)

DIRECTIONS = (MAXIMIZE, MINIMIZE)
MIN_RESAMPLES = 100


# ------------------------------------------------------------------------------ config


@dataclass
class SelectionConfig:
    """How the search's answer is chosen from the trained cuts (the study file's ``selection`` block)."""

    rule: str = SMALLEST_WITHIN_CI
    """``best``: the best point estimate; ``smallest_within_ci``: the smallest model (fewest
    parameters) among the candidates whose paired difference to the best is not significant."""
    confidence: float = 0.95
    """Level of the intervals, in (0, 1)."""
    resamples: int = 1000
    """Bootstrap resamples, at least 100."""
    seed: int = 0
    """Seed of the resampling: the same seed gives the same intervals."""
    folds: int = 1
    """k-fold cross-validation over train + validation when > 1 (decisions on the mean over
    folds); 1 uses the dataset's own validation split."""
    candidates: str = ALL_CANDIDATES
    """Which models the answer is chosen from: ``all`` (the fine-tuned TTL cuts, the frozen probe at
    every probed cut, and the baselines the study trained, scored with the same intervals and
    paired tests), or ``ttl`` (the fine-tuned cuts alone)."""
    guards: list[str] = field(default_factory=lambda: list(DEFAULT_GUARDS))
    """Guard metrics: a candidate whose validation value on a guard is significantly worse (paired
    bootstrap) than the best candidate's on that guard is not chosen, however good its main metric
    (a small model can match the best AUROC and still answer one class). ``[]``: no guard."""
    ensemble: int | str = 1
    """The answer as an average of class probabilities. An integer n: the models of the chosen cut
    (seeds 0..n-1); above ``search.repeats``, the seeds the search did not train are trained at the
    chosen cut once the search has decided (phase ``ensemble``); they never change the decision.
    ``indistinguishable``: every model the search trained at the TTL cuts whose validation metric
    is statistically indistinguishable from the best cut's (no extra training). 1: the answer is
    the chosen cut's models one by one (their mean metric). An ensemble's members together may
    cost no more than the budget, or without one than the full model (parameters and MACs): the
    members are taken best first while they fit."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """Deployment limits (parameters, MACs, latency, size): cuts over them are never trained nor
    chosen."""

    def __post_init__(self) -> None:
        validate_selection_config(self)

    @property
    def seed_ensemble(self) -> int:
        """Seeds of the chosen cut the answer averages (1 without an ensemble of seeds)."""
        return self.ensemble if _is_int(self.ensemble) else 1

    @property
    def cut_ensemble(self) -> bool:
        """Whether the answer averages the cuts indistinguishable from the best."""
        return self.ensemble == ENSEMBLE_CUTS


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_selection_config(cfg: SelectionConfig) -> None:
    """Raise :class:`ConfigError` naming the key (and the valid choices) for a bad value."""
    if not isinstance(cfg.rule, str) or cfg.rule not in RULES:
        raise ConfigError(f"selection.rule {cfg.rule!r} is unknown; valid rules: {choices(RULES)}")
    c = cfg.confidence
    if (
        not isinstance(c, numbers.Real) or isinstance(c, bool)
        or not math.isfinite(float(c)) or not 0.0 < float(c) < 1.0
    ):
        raise ConfigError(f"selection.confidence must be a number in (0, 1), got {c!r}")
    if not _is_int(cfg.resamples) or cfg.resamples < MIN_RESAMPLES:
        raise ConfigError(
            f"selection.resamples must be an integer >= {MIN_RESAMPLES}, got {cfg.resamples!r}"
        )
    if not _is_int(cfg.seed) or cfg.seed < 0:
        raise ConfigError(f"selection.seed must be a non-negative integer, got {cfg.seed!r}")
    if not _is_int(cfg.folds) or cfg.folds < 1:
        raise ConfigError(
            f"selection.folds must be 1 (the validation split) or an integer >= 2 "
            f"(k-fold cross-validation), got {cfg.folds!r}"
        )
    if not isinstance(cfg.candidates, str) or cfg.candidates not in CANDIDATE_POOLS:
        raise ConfigError(f"selection.candidates {cfg.candidates!r} is unknown; valid values: {choices(CANDIDATE_POOLS)} "
                          "(all: fine-tuned cuts, frozen probes and baselines; ttl: the fine-tuned cuts alone)")
    if isinstance(cfg.guards, str) or not isinstance(cfg.guards, (list, tuple)):
        raise ConfigError(f"selection.guards must be a list of metrics (or []), got {cfg.guards!r}; "
                          f"valid metrics: {choices(GUARD_METRICS)}")
    for guard in cfg.guards:
        if guard not in GUARD_METRICS:
            raise ConfigError(f"selection.guards: {guard!r} is not a guard metric; valid metrics: "
                              f"{choices(GUARD_METRICS)}")
    cfg.guards = list(dict.fromkeys(cfg.guards))
    if cfg.ensemble != ENSEMBLE_CUTS and (not _is_int(cfg.ensemble) or cfg.ensemble < 1):
        raise ConfigError(
            f"selection.ensemble must be an integer >= 1 (1: one model; n: the average of n seeds of the "
            f"chosen cut) or {ENSEMBLE_CUTS!r} (the average of the cuts indistinguishable from the best), "
            f"got {cfg.ensemble!r}"
        )


def check_direction(direction: str) -> str:
    """Return ``direction`` or raise :class:`ConfigError` listing the valid ones."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction {direction!r} is unknown; valid directions: {choices(DIRECTIONS)}")
    return direction


def check_rule(rule: str) -> str:
    """Return ``rule`` or raise :class:`ConfigError` listing the valid ones."""
    if rule not in RULES:
        raise ConfigError(f"selection.rule {rule!r} is unknown; valid rules: {choices(RULES)}")
    return rule


# ------------------------------------------------------------------------- records


@dataclass
class Evidence:
    """The validation predictions behind one candidate's score."""

    folds: dict[int, tuple[np.ndarray, list[np.ndarray]]] = field(default_factory=dict)
    """fold index -> (labels (N,) int, [probs (N,K) per seed/repeat])."""


@dataclass
class Score:
    """One candidate's validation metric with its uncertainty."""

    value: float
    """Point estimate: mean over folds of (mean over seeds of metric(labels, probs))."""
    ci: tuple[float, float]
    """Percentile bootstrap interval of ``value`` at the configured confidence."""
    diff: float
    """``value`` minus the reference's value (0 for the reference itself)."""
    diff_ci: tuple[float, float]
    """Paired bootstrap interval of the difference (same resampled indices for both);
    ``(0.0, 0.0)`` for the reference, ``(nan, nan)`` when it could not be paired."""
    indistinguishable: bool
    """True when ``diff_ci`` contains 0 (always for the reference); False when not paired."""
    n: int
    """Validation samples, summed over folds."""
    seeds: int
    """Probability matrices per fold (the most over folds)."""


# ------------------------------------------------------------------------- metrics


# ------------------------------------------------------------------------ resampling


@dataclass
class _Draws:
    """One fold's stratified resamples (shared by every candidate with these labels)."""

    labels: np.ndarray
    """Labels of the fold (N,), int64."""
    classes: list[int]
    """Classes present, increasing."""
    positions: dict[int, np.ndarray]
    """class -> positions of its samples in the fold, increasing."""
    local: dict[int, np.ndarray]
    """class -> draws (B, n_c) as indices into ``positions[class]``."""
    idx: np.ndarray
    """(B, N) resampled indices into the fold (classes in increasing order)."""
    _counts: dict[int, np.ndarray] = field(default_factory=dict)

    def counts(self, cls: int) -> np.ndarray:
        """(B, n_c) float matrix: how often each sample of ``cls`` is drawn in each resample."""
        if cls not in self._counts:
            local = self.local[cls]
            b, n_c = local.shape
            flat = (np.arange(b)[:, None] * n_c + local).ravel()
            self._counts[cls] = np.bincount(flat, minlength=b * n_c).reshape(b, n_c).astype(np.float64)
        return self._counts[cls]


def stratified_draws(labels: np.ndarray, resamples: int, seed: int, fold: int) -> _Draws:
    """Draw ``resamples`` stratified bootstrap resamples of one fold.

    Within each class (increasing order) ``n_c`` indices are drawn with replacement from the
    class's samples with ``np.random.default_rng([seed, fold])``.
    """
    y = _as_labels(labels)
    rng = np.random.default_rng([int(seed), int(fold)])
    classes = [int(c) for c in np.unique(y)]
    positions = {c: np.flatnonzero(y == c) for c in classes}
    local = {c: rng.integers(0, positions[c].size, size=(resamples, positions[c].size)) for c in classes}
    idx = np.concatenate([positions[c][local[c]] for c in classes], axis=1)
    return _Draws(labels=y, classes=classes, positions=positions, local=local, idx=idx)


def _as_labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {y.shape}")
    return y.astype(np.int64)


def _pairwise_auroc(draws: _Draws, score: np.ndarray, cls: int) -> np.ndarray:
    """(B,) one-vs-rest AUROC of ``cls`` with ``score`` over the resamples."""
    pos = draws.positions[cls]
    rest = [c for c in draws.classes if c != cls]
    neg = np.concatenate([draws.positions[c] for c in rest])
    a = draws.counts(cls)
    c = np.concatenate([draws.counts(k) for k in rest], axis=1)
    s_pos, s_neg = score[pos][:, None], score[neg][None, :]
    w = (s_pos > s_neg).astype(np.float64) + 0.5 * (s_pos == s_neg)
    return np.einsum("bj,bj->b", a @ w, c) / (pos.size * neg.size)


def _auroc_resampled(draws: _Draws, probs: np.ndarray) -> np.ndarray:
    """(B,) AUROC of every resample, as :func:`~ttl_search.train.metrics.auroc` defines it."""
    b = draws.idx.shape[0]
    if len(draws.classes) < 2:
        return np.full(b, np.nan)
    if probs.shape[1] == 2:
        return _pairwise_auroc(draws, probs[:, 1], 1)
    per_class = [_pairwise_auroc(draws, probs[:, k], k) for k in draws.classes]
    return np.mean(per_class, axis=0)


def _resampled(metric: str, draws: _Draws, probs: np.ndarray) -> np.ndarray:
    """(B,) values of ``metric`` on every resample of ``draws`` (same numbers as the loop)."""
    y = draws.labels
    if metric == "auroc":
        return _auroc_resampled(draws, probs)
    if metric in ("accuracy", "balanced_accuracy"):
        correct = (probs.argmax(axis=1) == y).astype(np.float64)
        if metric == "accuracy":
            return correct[draws.idx].mean(axis=1)
        recalls = [correct[draws.positions[c]][draws.local[c]].mean(axis=1) for c in draws.classes]
        return np.mean(recalls, axis=0)
    if metric == "loss":
        nll = -np.log(np.clip(probs[np.arange(y.size), y], LOSS_CLIP, None))
        return nll[draws.idx].mean(axis=1)
    return _looped(metric, draws, probs)


def _looped(metric: str, draws: _Draws, probs: np.ndarray) -> np.ndarray:
    """(B,) values of ``metric`` on every resample, one :func:`metric_value` call each."""
    y = draws.labels
    return np.array([metric_value(metric, y[i], probs[i]) for i in draws.idx])


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """``np.nanmean`` without the all-nan warning (all-nan gives nan)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of the finite samples; ``(nan, nan)`` when there is none."""
    if not np.any(np.isfinite(samples)):
        return (float("nan"), float("nan"))
    lo, hi = np.nanpercentile(samples, [50.0 * (1.0 - confidence), 50.0 * (1.0 + confidence)])
    return (float(lo), float(hi))


# --------------------------------------------------------------------------- scoring


def _better(a: float, b: float, direction: str) -> bool:
    """``a`` strictly better than ``b`` (nan is worse than anything)."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if direction == MAXIMIZE else a < b


def _best_key(values: Mapping[K, float], direction: str) -> K:
    """Key of the best value; ties and all-nan go to the first in mapping order."""
    best = next(iter(values))
    for key, value in values.items():
        if _better(value, values[best], direction):
            best = key
    return best


def _checked_folds(key: Hashable, evidence: Evidence) -> dict[int, tuple[np.ndarray, list[np.ndarray]]]:
    """The folds of ``evidence`` with labels as int64 and probs as float64 arrays."""
    if not evidence.folds:
        raise ValueError(f"candidate {key!r} has no fold of validation predictions")
    out = {}
    for fold, (labels, probs_list) in evidence.folds.items():
        if not _is_int(fold) or fold < 0:
            raise ValueError(f"candidate {key!r}: fold index must be a non-negative integer, got {fold!r}")
        if len(probs_list) == 0:
            raise ValueError(f"candidate {key!r}: fold {fold} has no probability matrix")
        out[int(fold)] = (_as_labels(labels), [np.asarray(p, dtype=np.float64) for p in probs_list])
    return out


def point_value(evidence: Evidence, metric: str) -> float:
    """A candidate's point estimate of ``metric``: mean over folds of the mean over its seeds."""
    per_fold = [_nanmean(np.array([metric_value(metric, y, p) for p in probs_list]))
                for y, probs_list in evidence.folds.values()]
    return float(_nanmean(np.array(per_fold)))


def score_candidates(
    evidence: Mapping[K, Evidence],
    metric: str,
    direction: str,
    cfg: SelectionConfig,
    reference: K | None = None,
) -> dict[K, Score]:
    """Score every candidate with a bootstrap interval and a paired difference to ``reference``.

    ``reference`` defaults to the key with the best point estimate (``direction`` ``maximize``
    or ``minimize``; ties to the first in mapping order). Keys are any hashables. A candidate is
    paired with the reference when it has the same folds with the same labels; otherwise its
    ``diff_ci`` is ``(nan, nan)`` and it is not ``indistinguishable``.
    """
    metric_direction(metric)
    check_direction(direction)
    if not evidence:
        return {}
    if reference is not None and reference not in evidence:
        raise ValueError(f"reference {reference!r} is not among the candidates")

    folds = {key: _checked_folds(key, ev) for key, ev in evidence.items()}
    values = {key: point_value(Evidence(by_fold), metric) for key, by_fold in folds.items()}
    ref = _best_key(values, direction) if reference is None else reference

    cache: dict[int, list[_Draws]] = {}

    def draws_for(fold: int, labels: np.ndarray) -> _Draws:
        for d in cache.setdefault(fold, []):
            if np.array_equal(d.labels, labels):
                return d
        d = stratified_draws(labels, cfg.resamples, cfg.seed, fold)
        cache[fold].append(d)
        return d

    samples: dict[K, np.ndarray] = {}
    for key, by_fold in folds.items():
        per_fold = []
        for fold, (y, probs_list) in by_fold.items():
            d = draws_for(fold, y)
            per_fold.append(_nanmean(np.stack([_resampled(metric, d, p) for p in probs_list]), axis=0))
        samples[key] = _nanmean(np.stack(per_fold), axis=0)

    ref_folds = folds[ref]
    scores: dict[K, Score] = {}
    for key, by_fold in folds.items():
        ci = _interval(samples[key], cfg.confidence)
        n = sum(y.size for y, _ in by_fold.values())
        seeds = max(len(p) for _, p in by_fold.values())
        if key == ref:
            diff, diff_ci, same = 0.0, (0.0, 0.0), True
        else:
            diff = values[key] - values[ref]
            paired = by_fold.keys() == ref_folds.keys() and all(
                np.array_equal(y, ref_folds[f][0]) for f, (y, _) in by_fold.items()
            )
            if paired:
                diff_ci = _interval(samples[key] - samples[ref], cfg.confidence)
                same = bool(diff_ci[0] <= 0.0 <= diff_ci[1])
            else:
                diff_ci, same = (float("nan"), float("nan")), False
        scores[key] = Score(
            value=values[key], ci=ci, diff=float(diff), diff_ci=diff_ci,
            indistinguishable=same, n=int(n), seeds=int(seeds),
        )
    return scores


# -------------------------------------------------------------------------- choosing


def choose(
    scores: Mapping[K, Score], params: Mapping[K, int], rule: str, direction: str
) -> K | None:
    """The chosen key under ``rule``; ``None`` when there is no score.

    ``best``: the best value (ties: fewer parameters, then mapping order).
    ``smallest_within_ci``: among the indistinguishable keys, the fewest parameters (ties: the
    better value, then mapping order); the best value when none is indistinguishable.
    """
    check_rule(rule)
    check_direction(direction)
    if not scores:
        return None
    missing = [key for key in scores if key not in params]
    if missing:
        raise ValueError(f"no parameter count for candidate(s) {', '.join(map(repr, missing))}")
    sign = -1.0 if direction == MAXIMIZE else 1.0

    def badness(key: K) -> float:
        value = scores[key].value
        return math.inf if math.isnan(value) else sign * value

    order = {key: i for i, key in enumerate(scores)}
    pool: Sequence[K] = [k for k in scores if scores[k].indistinguishable] if rule == SMALLEST_WITHIN_CI else []
    if pool:
        return min(pool, key=lambda k: (params[k], badness(k), order[k]))
    return min(scores, key=lambda k: (badness(k), params[k], order[k]))
