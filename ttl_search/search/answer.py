"""The search's answer with its uncertainty: which cut, the interval of its validation metric,
and which cuts are statistically indistinguishable from the best one.

Everything is recomputed from the validation predictions stored with each trial (see
:data:`~ttl_search.search.record.PREDICTIONS_ATTR`): a stratified, seeded bootstrap per cut and a
paired bootstrap of every cut (and baseline) against the TTL cut with the best point estimate.
The test split never takes part in a decision.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Collection, Mapping, Sequence

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from ..models.strategies import PROBE_STRATEGY
from ..train.metrics import metric_direction
from ..train.predictions import decode_predictions
from .record import SEARCH_STRATEGY, completed_by_cut, fmt_diff, model_name, records, trial_predictions
from ..errors import ConfigError
from .budget import BudgetConfig, apply_budget, cost_excess
from .samplers import CutCandidate, rank_cuts, search_trials, trial_key
from .selection import (BEST, TTL_CANDIDATES, Evidence, Score, SelectionConfig, choose, metric_value, point_value,
                        score_candidates)

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
    """The chosen model of a study and the evidence behind it."""

    pick: int | None
    """The chosen model's cut (None while no search trial has completed)."""
    reference: int | None
    """The cut of the eligible candidate with the best point estimate: the paired differences are
    taken against it."""
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
    strategy: str = SEARCH_STRATEGY
    """The chosen model's strategy: ``ttl`` (a fine-tuned cut), ``probe`` (the frozen probe at the
    cut) or a baseline."""
    reference_strategy: str = SEARCH_STRATEGY
    """The reference's strategy."""
    close: list[Key] = field(default_factory=list)
    """Every eligible candidate indistinguishable from the reference (the reference too)."""
    excluded: dict[Key, str] = field(default_factory=dict)
    """Candidates the rule may not choose, with why: a guard metric significantly worse than the
    best's, an accuracy that does not beat the majority class, an interval that reaches chance."""
    majority: float | None = None
    """Validation accuracy of always answering the majority class (its share)."""
    below_majority: list[Key] = field(default_factory=list)
    """Candidates whose validation accuracy does not beat :attr:`majority`: they learned nothing
    usable at the decision threshold."""
    pool: list[Key] = field(default_factory=list)
    """Every candidate the answer was chosen from (``selection.candidates``, within the budget)."""
    over_budget: dict[Key, str] = field(default_factory=dict)
    """Candidates over the study's budget (``selection.budget``), with why (in :attr:`excluded` too)."""
    ensemble_note: str = ""
    """Why the study's ensemble is not the answer (its models together are over the budget)."""

    @property
    def key(self) -> Key | None:
        """(strategy, cut) of the chosen model."""
        return None if self.pick is None else (self.strategy, self.pick)

    @property
    def reference_key(self) -> Key | None:
        """(strategy, cut) of the reference."""
        return None if self.reference is None else (self.reference_strategy, self.reference)

    def warnings(self, metric: str) -> list[str]:
        """What makes the answer doubtful, for people: the pick (or every cut) at chance, losses
        that exploded."""
        out = []
        ttl = [k for k in self.scores if k[0] == SEARCH_STRATEGY]
        if ttl and set(ttl) <= set(self.at_chance):
            out.append(f"no trained cut is better than chance (validation {metric} {self.chance:.4f} lies in every "
                       "interval): the models learned nothing; check the learning rate, the data and the labels")
        elif self.key in self.at_chance:
            out.append(f"the chosen model's validation {metric} interval reaches chance ({self.chance:.4f}): it is not "
                       "shown to have learned anything")
        elif self.key in self.below_majority:
            out.append(f"the chosen model's validation accuracy does not beat always answering the majority class "
                       f"({self.majority:.4f}): it learned nothing usable at its decision threshold; check the "
                       "balanced accuracy, the class weights and the learning rate")
        if self.ensemble_note:
            out.append(self.ensemble_note)
        e = self.ensemble
        if e is not None and e.complete and e.worse:
            what, why = ((f"the ensemble of cuts {e.cuts}", "averaging the indistinguishable cuts does not help; "
                          "consider selection.ensemble: 1") if e.of_cuts else
                         (f"the ensemble of cut {self.pick}", "the seeds it added do not confirm the pick; consider "
                          "selection.rule best, or more seeds per cut (search.repeats)"))
            out.append(f"{what} is significantly worse on validation than {model_name(*self.reference_key)} (paired "
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
    left_out: list[int] = field(default_factory=list)
    """Indistinguishable cuts left out because the members together would cost more than
    :attr:`cap` (the members are taken best first)."""
    cap: str = ""
    """What the members together may cost: the study's budget, or the full model's size."""

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


@dataclass
class ProbeModels:
    """The frozen probe's model at every probed cut: the study's probe table and the predictions it
    stored (the probe's models are candidates for the answer like any trained model)."""

    rows: list[dict[str, Any]]
    """The probe table's rows (``cut``, ``name``, ``stage``, ``params``, ``channels``...)."""
    predictions: dict[int, dict[str, Any]]
    """Cut -> ``{"val": ..., "test": ...}`` encoded predictions of that cut's probe."""

    def evidence(self, split: str = "val") -> dict[Key, Evidence]:
        """The ``split`` predictions of every probed cut, by (``probe``, cut)."""
        out = {}
        for cut, stored in sorted(self.predictions.items()):
            if split in stored:
                labels, probs = decode_predictions(stored[split])
                out[(PROBE_STRATEGY, int(cut))] = Evidence({0: (labels, [probs])})
        return out

    @property
    def params(self) -> dict[int, int]:
        """Cut -> parameters of the probe's model (the truncated backbone and its linear head)."""
        return {int(r["cut"]): int(r["params"]) for r in self.rows if r.get("params") is not None}


def candidate_pool(evidence: Mapping[Key, Evidence], probe: ProbeModels | None, pool: str) -> list[Key]:
    """The (strategy, cut)s the answer may be: every key of ``evidence`` (the fine-tuned cuts, the
    baselines, a stored probe model) and every probed cut, or the fine-tuned cuts alone (``ttl``)."""
    if pool == TTL_CANDIDATES:
        return [k for k in evidence if k[0] == SEARCH_STRATEGY]
    keys = list(evidence)
    if probe is not None:
        keys += [k for k in probe.evidence() if k not in evidence]
    return keys


SAME_ARCHITECTURE = (SEARCH_STRATEGY, PROBE_STRATEGY, "linear_probe", "full", "lwft", "scratch")
"""Strategies whose model at a cut is the truncated backbone with the study's head: the same cost."""


def budget_exclusions(keys: Sequence[Key], candidates: Sequence[CutCandidate], costs: Mapping[Key, tuple[float, float]],
                      budget: BudgetConfig) -> dict[Key, str]:
    """The ``keys`` over ``budget``, with why: a model of a cut's architecture as its cut is
    (``candidates`` marked by :func:`~ttl_search.search.budget.apply_budget`), any other (a
    TransFusion model) by its recorded parameters and MACs (its latency is not known before
    training: over a latency budget)."""
    if not budget.active:
        return {}
    marks = {c.index: c.over_budget for c in candidates}
    out = {}
    for key in keys:
        strategy, cut = key
        if strategy in SAME_ARCHITECTURE and cut in marks:
            why = marks[cut]
        else:
            params, macs = (None if math.isinf(v) else v for v in costs.get(key, (math.inf, math.inf)))
            why = cost_excess(budget, params, macs, None)
        if why:
            out[key] = why
    return out


def candidate_costs(trials: Sequence[FrozenTrial], candidates: Sequence[CutCandidate], probe: ProbeModels | None,
                    keys: Sequence[Key]) -> dict[Key, tuple[float, float]]:
    """(parameters, MACs) of the deployed model of each key: the smaller is preferred. A TTL cut, a
    frozen probe and a linear probe at the same cut deploy the same architecture (the same cost);
    unknown counts sort last."""
    params: dict[Key, float] = {(SEARCH_STRATEGY, c.index): c.params for c in candidates}
    params.update({(PROBE_STRATEGY, c): p for c, p in (probe.params if probe else {}).items()})
    macs: dict[Key, float] = {}
    macs_at: dict[int, float] = {}
    for r in records(t for t in trials if t.state == TrialState.COMPLETE):
        if r.cut is None:
            continue
        key = (r.strategy, int(r.cut))
        if r.params is not None:
            params.setdefault(key, r.params)
        if r.macs is not None:
            macs.setdefault(key, r.macs)
            if r.strategy in SAME_ARCHITECTURE:
                macs_at.setdefault(int(r.cut), r.macs)
    inf = float("inf")
    return {k: (float(params.get(k, inf)),
                float(macs.get(k, macs_at.get(k[1], inf) if k[0] in SAME_ARCHITECTURE else inf))) for k in keys}


def guard_exclusions(evidence: Mapping[Key, Evidence], keys: Sequence[Key], guards: Sequence[str],
                     selection: SelectionConfig) -> dict[Key, str]:
    """The ``keys`` that a guard excludes, with why: on a guard metric, significantly worse (paired
    bootstrap) than the best on that metric of the candidates the guards before it left (so that
    one always survives)."""
    out: dict[Key, str] = {}
    for guard in guards:
        pool = {k: evidence[k] for k in keys if k not in out}
        if len(pool) < 2:
            break
        direction = metric_direction(guard)
        scores = score_candidates(pool, guard, direction, selection)
        best = next(k for k, s in scores.items() if s.diff_ci == (0.0, 0.0) and s.diff == 0.0)
        sign = 1.0 if direction == "maximize" else -1.0
        for key, sc in scores.items():
            if key == best or sc.indistinguishable or math.isnan(sc.diff_ci[0]) or sign * sc.diff >= 0:
                continue
            out[key] = (f"validation {guard} {sc.value:.4f} is significantly worse than {model_name(*best)}'s "
                        f"{scores[best].value:.4f} (paired {fmt_diff(sc.diff, sc.diff_ci)})")
    return out


def study_answer(trials: Sequence[FrozenTrial], cfg: StudyConfig, candidates: Sequence[CutCandidate],
                 probe: ProbeModels | None = None) -> Answer:
    """The study's answer under ``cfg.selection``, chosen on validation among every candidate the
    study holds (``selection.candidates``: the fine-tuned cuts, the baselines, and the frozen probe
    at every cut of ``probe``; or the fine-tuned cuts alone).

    1. Eligible: the candidates that no guard excludes (``selection.guards``: not significantly
       worse than the best on a guard metric) and that learned something (their interval of the
       main metric is above chance, and their validation accuracy above the majority class's share);
       every candidate the guards leave when none of them learned anything.
    2. The reference: the eligible candidate with the best point estimate; every candidate's
       paired difference is taken against it.
    3. Rule ``best``: the reference (a smaller model within ``search.tolerance`` of it wins);
       ``smallest_within_ci``: the cheapest eligible model (parameters, then MACs) whose paired
       difference to the reference is not significant.

    Only the search's trials decide (:func:`~ttl_search.search.samplers.search_trials`); with
    ``selection.ensemble`` the answer also scores its ensemble: of the fine-tuned cuts among the
    eligible candidates indistinguishable from the reference, or of the chosen cut's seeds."""
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
    if probe is not None:
        for key, ev in probe.evidence().items():
            evidence.setdefault(key, ev)
    pool = candidate_pool(evidence, probe, selection.candidates)
    costs = candidate_costs(trials, candidates, probe, list(evidence))
    if selection.budget.active:
        candidates = apply_budget(candidates, selection.budget)
    over_budget = budget_exclusions(pool, candidates, costs, selection.budget)
    if over_budget and len(over_budget) == len(pool):
        raise ConfigError(f"no model of the study meets selection.budget ({selection.budget.describe()}): "
                          f"{_cheapest(over_budget, costs)}")
    pool = [k for k in pool if k not in over_budget]
    values = {k: point_value(ev, cfg.metric) for k, ev in evidence.items()}
    sign = 1.0 if direction == "maximize" else -1.0
    first = next(iter(evidence.values()))
    chance = chance_level(first, cfg.metric)
    majority = chance_level(first, "accuracy")
    accuracy = {k: point_value(evidence[k], "accuracy") for k in pool}
    below_majority = [k for k in pool if not accuracy[k] > majority + 1e-9]
    excluded = guard_exclusions(evidence, pool, selection.guards, selection)
    survivors = [k for k in pool if k not in excluded]  # never empty: a guard's best survives it

    def learned(key: Key, interval: tuple[float, float]) -> bool:
        return key not in below_majority and _beats_interval(interval, chance, direction)

    # The main metric's intervals do not depend on the reference: a first pass against the best
    # survivor finds the ones that learned nothing; the reference is then the best eligible one.
    ref = _best(survivors, values, costs, sign)
    scores = score_candidates(evidence, cfg.metric, direction, selection, reference=ref)
    eligible = [k for k in survivors if learned(k, scores[k].ci)] or survivors
    if ref not in eligible:
        ref = _best(eligible, values, costs, sign)
        scores = score_candidates(evidence, cfg.metric, direction, selection, reference=ref)
    for key in pool:
        if key not in eligible and key not in excluded:
            excluded[key] = (f"validation accuracy {accuracy[key]:.4f} does not beat the majority class "
                             f"({majority:.4f})" if key in below_majority else
                             f"its validation {cfg.metric} interval reaches chance ({chance:.4f})")
    if selection.rule == BEST:
        within = [k for k in eligible if sign * (values[k] - values[ref]) >= -cfg.search.tolerance]
        pick = min(within, key=lambda k: (costs[k], -sign * values[k]))
    else:
        pick = choose({k: scores[k] for k in eligible}, costs, selection.rule, direction)
    close = [k for k in eligible if scores[k].indistinguishable]
    ttl_close = sorted(c for s, c in close if s == SEARCH_STRATEGY)
    at_chance = [k for k, sc in scores.items() if not _beats(sc, chance, direction)]
    ttl_sizes = {c.index: c.params for c in candidates}
    cap = ensemble_cap(candidates, selection.budget)
    ensemble, ensemble_note = None, ""
    if selection.cut_ensemble and ttl_close:
        # the chosen cut first (when it is a fine-tuned one), then the best: members while they fit the cap
        order = sorted(ttl_close, key=lambda c: ((SEARCH_STRATEGY, c) != pick, -sign * values[(SEARCH_STRATEGY, c)], c))
        members, left_out = fit_members(order, candidates, cap, cfg.search.repeats)
        if members:  # none: even the best cut's seeds together cost more than the cap
            ensemble = score_ensemble(trials, cfg, members, cfg.search.repeats, ref, evidence[ref], ttl_sizes)
            ensemble.left_out, ensemble.cap = left_out, cap.describe()
    elif selection.seed_ensemble > 1 and pick[0] == SEARCH_STRATEGY:
        # the seeds the study asked for: capped by its budget only (not by the full model's size)
        members, _ = fit_members([pick[1]], candidates, selection.budget, selection.seed_ensemble)
        if members:
            ensemble = score_ensemble(every, cfg, members, selection.seed_ensemble, ref, evidence[ref], ttl_sizes)
        else:
            ensemble_note = (f"the ensemble of {selection.seed_ensemble} seeds of cut {pick[1]} costs more than "
                             f"selection.budget ({selection.budget.describe()}): the answer is one model")
    excluded.update(over_budget)
    return Answer(pick[1], ref[1], selection.rule, scores, ttl_close, chance=chance, at_chance=at_chance,
                  exploded=exploded_losses(trials), ensemble=ensemble, strategy=pick[0], reference_strategy=ref[0],
                  close=close, excluded=excluded, majority=majority,
                  below_majority=[k for k in below_majority if k in pool], pool=pool, over_budget=over_budget,
                  ensemble_note=ensemble_note)


def ensemble_cap(candidates: Sequence[CutCandidate], budget: BudgetConfig) -> BudgetConfig:
    """What an ensemble's members together may cost: the study's budget, or without one the full
    model's parameters and MACs (the deepest candidate cut)."""
    if budget.active or not candidates:
        return budget
    full = max(candidates, key=lambda c: c.index)
    return BudgetConfig(params=full.params, macs=full.macs)


def fit_members(order: Sequence[int], candidates: Sequence[CutCandidate], cap: BudgetConfig,
                size: int) -> tuple[list[int], list[int]]:
    """The cuts of ``order`` (best first) an ensemble of ``size`` models per cut keeps while their
    summed parameters, MACs and latency fit ``cap``, and the cuts left out."""
    by_index = {c.index: c for c in candidates}
    members: list[int] = []
    left_out: list[int] = []
    total = [0.0, 0.0, 0.0]
    for cut in order:
        c = by_index.get(cut)
        cost = [size * v if v is not None else None for v in
                ((c.params, c.macs, c.latency_ms) if c is not None else (None, None, None))]
        trial = [None if t is None or v is None else t + v for t, v in zip(total, cost)]
        if cost_excess(cap, *trial):
            left_out.append(cut)
            continue
        members.append(cut)
        total = [0.0 if t is None else t for t in trial]
    return members, left_out


def _cheapest(over: Mapping[Key, str], costs: Mapping[Key, tuple[float, float]]) -> str:
    """The cheapest of ``over`` and why it is over budget."""
    key = min(over, key=lambda k: costs.get(k, (math.inf, math.inf)))
    return f"the smallest, {model_name(*key)}, is {over[key]}"


def paired_difference(trials: Sequence[FrozenTrial], cfg: StudyConfig, probe: ProbeModels | None, key: Key,
                      reference: Key) -> tuple[Score, Score] | None:
    """(score of ``key`` with its paired difference to ``reference``, the reference's score) on
    validation, from the search's trials and the probe's models; None when either has no evidence."""
    evidence, _ = trial_evidence(search_trials(trials, cfg.search.repeats))
    if probe is not None:
        for k, ev in probe.evidence().items():
            evidence.setdefault(k, ev)
    if key not in evidence or reference not in evidence:
        return None
    scores = score_candidates({reference: evidence[reference], key: evidence[key]}, cfg.metric,
                              cfg.resolved_direction, cfg.selection, reference=reference)
    return scores[key], scores[reference]


def _best(keys: Sequence[Key], values: Mapping[Key, float], costs: Mapping[Key, tuple[float, float]],
          sign: float) -> Key:
    """The key with the best value (nan last; ties: the cheaper, then the first)."""
    order = {k: i for i, k in enumerate(keys)}
    return min(keys, key=lambda k: (math.inf if math.isnan(values[k]) else -sign * values[k], costs[k], order[k]))


def _beats(score: Score, chance: float, direction: str) -> bool:
    """Whether the whole interval of ``score`` is better than ``chance`` (NaN bounds never are)."""
    return _beats_interval(score.ci, chance, direction)


def _beats_interval(ci: tuple[float, float], chance: float, direction: str) -> bool:
    return ci[0] > chance if direction == "maximize" else ci[1] < chance


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
