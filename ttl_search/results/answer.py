"""The search's answer with its uncertainty: which cut, the interval of its validation metric,
and which cuts are statistically indistinguishable from the best one.

Everything is recomputed from the validation predictions stored with each trial (see
:data:`~ttl_search.search.record.PREDICTIONS_ATTR`): a stratified, seeded bootstrap per cut and a
paired bootstrap of every cut (and baseline) against the TTL cut with the best point estimate.
The test split never takes part in a decision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from ..search.record import SEARCH_STRATEGY, completed_by_cut, records, trial_predictions
from ..search.samplers import CutCandidate, rank_cuts, trial_key
from ..search.selection import BEST, Evidence, Score, choose, metric_value, score_candidates
from ..search.study import StudyConfig

log = logging.getLogger(__name__)

Key = tuple[str, int]
"""(strategy, cut)."""
LOSS_EXPLODED = 50.0
"""A mean validation cross-entropy above this is a diverged training (a model at chance has log K,
0.69 for two classes)."""


@dataclass
class Answer:
    """The chosen cut of a study and the evidence behind it."""

    pick: int | None
    """The chosen TTL cut (None while no search trial has completed)."""
    reference: int | None
    """The TTL cut with the best point estimate: the paired differences are taken against it."""
    rule: str
    """The rule that chose ``pick`` (``best`` when the trials stored no predictions)."""
    scores: dict[Key, Score] = field(default_factory=dict)
    """Every completed (strategy, cut): validation metric, its interval, and the paired difference to
    the reference; empty when predictions are missing."""
    indistinguishable: list[int] = field(default_factory=list)
    """TTL cuts whose paired difference to the reference is not significant (the reference too)."""
    note: str = ""
    """Why there are no intervals, when there are none."""
    chance: float | None = None
    """The metric of a model that learned nothing (it predicts the class frequencies for every
    image) on the validation labels; None without predictions."""
    at_chance: list[Key] = field(default_factory=list)
    """(strategy, cut)s whose validation interval reaches the chance level: not shown to have
    learned anything."""
    exploded: list[Key] = field(default_factory=list)
    """(strategy, cut)s whose validation loss exploded (mean above :data:`LOSS_EXPLODED`)."""

    def warnings(self, metric: str) -> list[str]:
        """What makes the answer doubtful, for people: the pick (or every cut) at chance, losses
        that exploded."""
        out = []
        ttl = [k for k in self.scores if k[0] == SEARCH_STRATEGY]
        if ttl and set(ttl) <= set(self.at_chance):
            out.append(f"no trained cut is better than chance (validation {metric} {self.chance:.4f} lies in every "
                       "interval): the models learned nothing; check the learning rate, the data and the labels")
        elif (SEARCH_STRATEGY, self.pick) in self.at_chance:
            out.append(f"the chosen cut's validation {metric} interval reaches chance ({self.chance:.4f}): it is not "
                       "shown to have learned anything")
        exploded = sorted(c for s, c in self.exploded if s == SEARCH_STRATEGY)
        if exploded:
            out.append(f"the validation loss exploded (above {LOSS_EXPLODED:g}) at cut(s) {exploded}: "
                       "the training diverged; lower the learning rate")
        return out


def trial_evidence(trials: Sequence[FrozenTrial], split: str = "val") -> tuple[dict[Key, Evidence], set[Key]]:
    """The ``split`` predictions of the completed trials, by (strategy, cut) and fold; and the
    (strategy, cut)s with a completed trial that stored none."""
    evidence: dict[Key, Evidence] = {}
    missing: set[Key] = set()
    for t in trials:
        key = trial_key(t)
        if t.state != TrialState.COMPLETE or key is None:
            continue
        strategy, cut, fold = key.strategy, key.cut, key.fold
        found = trial_predictions(t, split)
        if found is None:
            missing.add((strategy, cut))
            continue
        labels, probs = found
        folds = evidence.setdefault((strategy, cut), Evidence()).folds
        folds.setdefault(fold, (labels, []))[1].append(probs)
    return evidence, missing


def study_answer(trials: Sequence[FrozenTrial], cfg: StudyConfig, candidates: Sequence[CutCandidate]) -> Answer:
    """The study's answer under ``cfg.selection``: rule ``best`` is the best mean validation metric
    (a smaller model within ``search.tolerance`` wins); ``smallest_within_ci`` the smallest model
    among the TTL cuts indistinguishable from the best by a paired bootstrap."""
    selection, direction = cfg.selection, cfg.resolved_direction
    ranking = rank_cuts(trials, candidates, direction, cfg.search.tolerance)
    if not ranking:
        return Answer(None, None, selection.rule)
    evidence, missing = trial_evidence(trials)
    ttl_missing = sorted(c for s, c in missing if s == SEARCH_STRATEGY)
    if ttl_missing:
        note = (f"cuts {ttl_missing} stored no validation predictions (trained by an earlier version): "
                "no intervals; the best mean is chosen")
        return Answer(ranking[0][0], ranking[0][0], BEST, note=note, exploded=exploded_losses(trials))
    sign = 1.0 if direction == "maximize" else -1.0
    reference = (SEARCH_STRATEGY, max(ranking, key=lambda cut_mean: sign * cut_mean[1])[0])  # best mean
    scores = score_candidates(evidence, cfg.metric, direction, selection, reference=reference)
    ttl_scores = {k: s for k, s in scores.items() if k[0] == SEARCH_STRATEGY}
    params = {(SEARCH_STRATEGY, c.index): c.params for c in candidates}
    if selection.rule == BEST:
        pick = ranking[0][0]
    else:
        pick = choose(ttl_scores, params, selection.rule, direction)[1]
    close = sorted(k[1] for k, s in ttl_scores.items() if s.indistinguishable)
    chance = chance_level(evidence[reference], cfg.metric)
    at_chance = [k for k, sc in scores.items() if not _beats(sc, chance, direction)]
    return Answer(pick, reference[1], selection.rule, scores, close, chance=chance, at_chance=at_chance,
                  exploded=exploded_losses(trials))


def _beats(score: Score, chance: float, direction: str) -> bool:
    """Whether the whole interval of ``score`` is better than ``chance`` (NaN bounds never are)."""
    return score.ci[0] > chance if direction == "maximize" else score.ci[1] < chance


def chance_level(evidence: Evidence, metric: str) -> float:
    """``metric`` of a model that learned nothing: it predicts every fold's class frequencies for
    every image (AUROC 0.5, accuracy the majority share, AUPRC the prevalence...); mean over folds."""
    values = []
    for labels, probs in evidence.folds.values():
        prior = np.bincount(labels, minlength=probs[0].shape[1]) / len(labels)
        values.append(metric_value(metric, labels, np.tile(prior, (len(labels), 1))))
    return float(np.mean(values))


def exploded_losses(trials: Sequence[FrozenTrial]) -> list[Key]:
    """(strategy, cut)s whose mean validation loss is above :data:`LOSS_EXPLODED`."""
    out = []
    for key, group in completed_by_cut(records(trials)).items():
        losses = [r.val["loss"] for r in group if "loss" in r.val]
        if losses and sum(losses) / len(losses) > LOSS_EXPLODED:
            out.append(key)
    return out
