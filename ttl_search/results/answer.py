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

from optuna.trial import FrozenTrial, TrialState

from ..search.record import SEARCH_STRATEGY, trial_predictions
from ..search.samplers import CutCandidate, rank_cuts, trial_key
from ..search.selection import BEST, Evidence, Score, choose, score_candidates
from ..search.study import StudyConfig

log = logging.getLogger(__name__)

Key = tuple[str, int]
"""(strategy, cut)."""


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
        return Answer(ranking[0][0], ranking[0][0], BEST, note=note)
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
    return Answer(pick, reference[1], selection.rule, scores, close)
