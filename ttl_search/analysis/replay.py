"""Replay a search method on the stored trials of an exhaustive study, without training again.

The samplers read only stored trials, so a replay is exact: the method is given a fresh in-memory
study, asks for its trainings one at a time (in the order a study with one trial at a time would
run them), and each training is answered with the exhaustive study's trial of the same cut and
seed (its value, attributes and stored predictions). What the method then chooses is what it would
have chosen had it trained those trials itself. Compute is the stored trials' training seconds.

Each replay uses one seed (``repeat``) of the exhaustive study, so a study with three seeds per
cut gives three independent replays of every method. Its reference is the exhaustive answer on
the same seed, under the same selection rule. Test metrics are reported, never used to decide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import from_dict, merge, to_dict
from ..errors import StudyError
from ..search.answer import study_answer, trial_evidence
from ..search.record import PREDICTIONS_ATTR, SEARCH_STRATEGY, TrialRecord
from ..search.samplers import CutCandidate, suggest_params, trial_key
from ..search.selection import score_candidates
from ..search.study import StudyConfig, make_sampler, needs_probe
from ..storage import set_trial_system_attr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A search method to replay: settings of the study's ``search`` and ``selection`` blocks."""

    label: str
    """Name in tables, e.g. ``two_stage k=1``."""
    search: dict[str, Any]
    """Overrides of the ``search`` block (``method``, ``top_k``, ``budget``...)."""
    selection: dict[str, Any] = field(default_factory=dict)
    """Overrides of the ``selection`` block (``rule``)."""


@dataclass
class Replay:
    """What one method chose on one seed of an exhaustive study."""

    method: str
    """The method's label."""
    rule: str
    """The selection rule applied."""
    repeat: int
    """The exhaustive study's seed index the replay used."""
    trained: list[int]
    """Cuts in the order the method trained them (a cut TPE asks twice appears twice)."""
    compute_s: float
    """Training seconds of those trainings (as the exhaustive study measured them), plus the probe's
    seconds for a guided method."""
    pick: int | None
    """The chosen cut."""
    val: float | None = None
    """The pick's validation metric (this seed)."""
    val_ci: tuple[float, float] | None = None
    """Its bootstrap interval."""
    test: float | None = None
    """The pick's test metric (this seed; reported, never used to decide)."""
    params: int | None = None
    """Parameters of the pick."""

    @property
    def trainings(self) -> int:
        return len(self.trained)


def seed_trials(trials: Sequence[FrozenTrial], repeat: int) -> dict[tuple[str, int], FrozenTrial]:
    """The completed trials of seed ``repeat`` by (strategy, cut) (the first of each, fold 0)."""
    out: dict[tuple[str, int], FrozenTrial] = {}
    for t in trials:
        key = trial_key(t)
        if t.state == TrialState.COMPLETE and key is not None and key.repeat == repeat and key.fold == 0:
            out.setdefault((key.strategy, key.cut), t)
    return out


def method_config(cfg: StudyConfig, method: Method, seed: int) -> StudyConfig:
    """The exhaustive study's config with ``method``'s search and selection, one seed, no baselines,
    and no retries (a training the exhaustive study could not complete fails in the replay too)."""
    values = to_dict(cfg)
    search = {**method.search, "repeats": 1, "seed": seed, "max_retries": 0}
    values = merge(values, {"search": search, "selection": method.selection,
                            "baselines": [], "baseline_cuts": {}})
    return from_dict(StudyConfig, values)


def replay(trials: Sequence[FrozenTrial], cfg: StudyConfig, candidates: Sequence[CutCandidate], method: Method,
           repeat: int, probe: dict[str, Any] | None = None) -> Replay:
    """Replay ``method`` on seed ``repeat`` of an exhaustive study's ``trials``; ``probe``: the
    study's stored probe table, which a guided method needs (its seconds count as compute)."""
    if cfg.selection.folds > 1:
        raise StudyError("replays use the validation split; this study cross-validates (selection.folds > 1)")
    source = seed_trials(trials, repeat)
    mcfg = method_config(cfg, method, seed=repeat)
    guided = needs_probe(mcfg)
    if guided and probe is None:
        raise StudyError(f"method {method.label!r} is guided by the probe, and the study has no stored probe table; "
                         "run `ttl-search probe` on it first")
    sampler = make_sampler(mcfg, candidates, probe if guided else None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=mcfg.resolved_direction, sampler=sampler, study_name="replay")
    trained: list[int] = []
    compute = float(probe["seconds"]) if guided else 0.0
    while True:
        plan = sampler.plan(study.get_trials(deepcopy=False))
        if plan.action != "run":
            break
        trial = study.ask()
        params = suggest_params(trial, candidates, [SEARCH_STRATEGY], 1)
        stored = source.get((SEARCH_STRATEGY, params["cut"]))
        trained.append(params["cut"])
        if stored is None:  # the exhaustive study has no completed trial here: the training failed
            study.tell(trial, state=TrialState.FAIL)
            continue
        record = TrialRecord.from_trial(stored)
        compute += record.train_time_s or 0.0
        for key, value in replace(record, repeat=0).to_attrs().items():
            trial.set_user_attr(key, value)
        if PREDICTIONS_ATTR in stored.system_attrs:
            set_trial_system_attr(trial, PREDICTIONS_ATTR, stored.system_attrs[PREDICTIONS_ATTR])
        study.tell(trial, stored.value)
    answer = study_answer(study.get_trials(deepcopy=False), mcfg, candidates)
    out = Replay(method.label, answer.rule, repeat, trained, round(compute, 2), answer.pick)
    if answer.pick is not None:
        record = TrialRecord.from_trial(source[(SEARCH_STRATEGY, answer.pick)])
        score = answer.scores.get((SEARCH_STRATEGY, answer.pick))
        out.val = record.val.get(cfg.metric)
        out.val_ci = score.ci if score else None
        out.test = record.test.get(cfg.metric)
        out.params = record.params
    return out


def indistinguishable(trials: Sequence[FrozenTrial], cfg: StudyConfig, repeat: int, cut: int,
                      reference: int) -> bool:
    """Whether ``cut``'s validation metric is indistinguishable from ``reference``'s on seed
    ``repeat`` (paired bootstrap at the study's confidence)."""
    if cut == reference:
        return True
    source = seed_trials(trials, repeat)
    evidence, _ = trial_evidence([source[(SEARCH_STRATEGY, c)] for c in (reference, cut)])
    scores = score_candidates(evidence, cfg.metric, cfg.resolved_direction, cfg.selection,
                              reference=(SEARCH_STRATEGY, reference))
    return scores[(SEARCH_STRATEGY, cut)].indistinguishable


def oracle_cut(trials: Sequence[FrozenTrial], cfg: StudyConfig, repeat: int) -> tuple[int, float]:
    """The cut with the best test metric on seed ``repeat`` and that metric: the yardstick of
    regret, known only after the fact."""
    sign = 1.0 if cfg.resolved_direction == "maximize" else -1.0
    rows = [(cut, TrialRecord.from_trial(t).test.get(cfg.metric)) for (s, cut), t in seed_trials(trials, repeat).items()
            if s == SEARCH_STRATEGY]
    rows = [(c, v) for c, v in rows if v is not None]
    return max(rows, key=lambda cv: sign * cv[1])


def seeds_of(trials: Sequence[FrozenTrial]) -> list[int]:
    """Seed indices with at least one completed TTL trial."""
    return sorted({k.repeat for t in trials if t.state == TrialState.COMPLETE and (k := trial_key(t)) is not None
                   and k.strategy == SEARCH_STRATEGY})
