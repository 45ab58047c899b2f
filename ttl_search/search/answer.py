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
from typing import TYPE_CHECKING, Collection, Mapping, Sequence

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from .record import SEARCH_STRATEGY, completed_by_cut, records, trial_predictions
from .samplers import CutCandidate, rank_cuts, search_trials, trial_key
from .selection import BEST, Evidence, Score, choose, metric_value, score_candidates

if TYPE_CHECKING:
    from .study import StudyConfig

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
    ensemble: "Ensemble | None" = None
    """The answer as an ensemble (``selection.ensemble``: of the chosen cut's seeds, or of the
    indistinguishable cuts), else None."""

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
        e = self.ensemble
        if e is not None and e.complete and e.worse:
            what, why = ((f"the ensemble of cuts {e.cuts}", "averaging the indistinguishable cuts does not help; "
                          "consider selection.ensemble: 1") if e.of_cuts else
                         (f"the ensemble of cut {self.pick}", "the seeds it added do not confirm the pick; consider "
                          "selection.rule best, or more seeds per cut (search.repeats)"))
            out.append(f"{what} is significantly worse on validation than the best cut {self.reference} (paired "
                       f"difference {e.val.diff:+.4f}, interval [{e.val.diff_ci[0]:.4f}, {e.val.diff_ci[1]:.4f}]): "
                       f"{why}")
        exploded = sorted(c for s, c in self.exploded if s == SEARCH_STRATEGY)
        if exploded:
            out.append(f"the validation loss exploded (above {LOSS_EXPLODED:g}) at cut(s) {exploded}: "
                       "the training diverged; lower the learning rate")
        return out


ENSEMBLE = "ensemble"
"""The strategy name under which an ensemble is scored against the single cuts."""


@dataclass
class Ensemble:
    """The answer as an ensemble: its members' class probabilities averaged, image by image. The
    members are the chosen cut's seeds (``selection.ensemble: n``), or every search model of the
    cuts indistinguishable from the best (``selection.ensemble: indistinguishable``)."""

    size: int
    """Seeds per cut it averages: ``selection.ensemble`` for seeds, ``search.repeats`` for cuts."""
    repeats: list[int]
    """Seed indices (the trial parameter ``repeat``) with a completed training, in increasing order."""
    seeds: list[int]
    """Their random seeds (``search.seed`` + repeat)."""
    complete: bool
    """Whether every configured seed (on every fold) of every member cut has completed."""
    trials: list[int]
    """Trial numbers of its members."""
    val: Score | None
    """Validation metric of the averaged probabilities (mean over folds), its interval, and its
    paired difference to the reference cut (the best single cut)."""
    test: Score | None
    """Test metric of the probabilities averaged over every member, with its interval (the test
    split decides nothing)."""
    worse: bool = False
    """Whether its validation metric is significantly worse than the reference cut's (paired)."""
    cuts: list[int] = field(default_factory=list)
    """The TTL cuts of its members (the chosen cut alone for an ensemble of seeds)."""
    params: int | None = None
    """Parameters of all its members together (None when a member's size is unknown)."""
    kind: str = "seeds"
    """``seeds`` (of the chosen cut) or ``cuts`` (the cuts indistinguishable from the best)."""

    @property
    def of_cuts(self) -> bool:
        """Whether it averages the indistinguishable cuts (rather than the seeds of one)."""
        return self.kind == "cuts"


def ensemble_evidence(trials: Sequence[FrozenTrial], cuts: Collection[int], size: int,
                      split: str) -> tuple[Evidence, list[int], list[int]]:
    """The averaged ``split`` probabilities of the first ``size`` seeds of the TTL cuts ``cuts``
    (one matrix per fold; every fold's models predict the same test images, so the test split
    averages all of them into fold 0), with the repeats and trial numbers that took part."""
    members: dict[int, list[np.ndarray]] = {}
    labels_of: dict[int, np.ndarray] = {}
    repeats, numbers = set(), []
    for t in trials:
        key = trial_key(t)
        if (t.state != TrialState.COMPLETE or key is None or key.strategy != SEARCH_STRATEGY
                or key.cut not in cuts or key.repeat >= size):
            continue
        found = trial_predictions(t, split)
        if found is None:
            continue
        fold = key.fold if split == "val" else 0
        labels_of[fold] = found[0]
        members.setdefault(fold, []).append(found[1])
        repeats.add(key.repeat)
        numbers.append(t.number)
    evidence = Evidence({f: (labels_of[f], [np.mean(members[f], axis=0)]) for f in sorted(members)})
    return evidence, sorted(repeats), sorted(numbers)


def score_ensemble(trials: Sequence[FrozenTrial], cfg: StudyConfig, cuts: Sequence[int], size: int,
                   reference: Key, reference_evidence: Evidence, params: Mapping[int, int | None]) -> Ensemble:
    """The ensemble of the first ``size`` seeds of ``cuts``: validation and test scores of the
    averaged probabilities, the validation one paired with the reference cut's evidence;
    ``params``: each cut's parameter count."""
    key = (ENSEMBLE, min(cuts))
    val, repeats, numbers = ensemble_evidence(trials, cuts, size, "val")
    test, _, _ = ensemble_evidence(trials, cuts, size, "test")
    args = (cfg.metric, cfg.resolved_direction, cfg.selection)
    val_score = score_candidates({reference: reference_evidence, key: val}, *args, reference=reference)[key] \
        if val.folds else None
    test_score = score_candidates({key: test}, *args)[key] if test.folds else None
    expected = len(cuts) * size * cfg.selection.folds
    sign = 1.0 if cfg.resolved_direction == "maximize" else -1.0
    worse = bool(val_score and not val_score.indistinguishable and not np.isnan(val_score.diff_ci[0])
                 and sign * val_score.diff < 0)
    sizes = [params.get(c) for c in cuts]
    total = None if None in sizes else size * sum(sizes)
    kind = "cuts" if cfg.selection.cut_ensemble else "seeds"
    return Ensemble(size, repeats, [cfg.search.seed + r for r in repeats], len(numbers) >= expected, numbers,
                    val_score, test_score, worse, sorted(cuts), total, kind)


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
    among the TTL cuts indistinguishable from the best by a paired bootstrap.

    Only the search's trials decide (:func:`~ttl_search.search.samplers.search_trials`); with
    ``selection.ensemble`` > 1 the answer also scores the chosen cut's ensemble, from all its seeds."""
    selection, direction = cfg.selection, cfg.resolved_direction
    every = trials
    trials = search_trials(trials, cfg.search.repeats)
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
    sizes = {c.index: c.params for c in candidates}
    params = {(SEARCH_STRATEGY, c): p for c, p in sizes.items()}
    if selection.rule == BEST:
        pick = ranking[0][0]
    else:
        pick = choose(ttl_scores, params, selection.rule, direction)[1]
    close = sorted(k[1] for k, s in ttl_scores.items() if s.indistinguishable)
    chance = chance_level(evidence[reference], cfg.metric)
    at_chance = [k for k, sc in scores.items() if not _beats(sc, chance, direction)]
    if selection.cut_ensemble:
        ensemble = score_ensemble(trials, cfg, close, cfg.search.repeats, reference, evidence[reference], sizes)
    elif selection.seed_ensemble > 1:
        ensemble = score_ensemble(every, cfg, [pick], selection.seed_ensemble, reference, evidence[reference], sizes)
    else:
        ensemble = None
    return Answer(pick, reference[1], selection.rule, scores, close, chance=chance, at_chance=at_chance,
                  exploded=exploded_losses(trials), ensemble=ensemble)


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
