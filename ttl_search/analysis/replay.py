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

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import from_dict, merge, to_dict
from ..errors import StudyError
from ..search.answer import Key, ProbeModels, study_answer, trial_evidence
from ..search.record import PREDICTIONS_ATTR, SEARCH_STRATEGY, TrialRecord
from ..search.samplers import SEARCH_METHODS, CutCandidate, suggest_params, trial_key
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
    """Overrides of the ``selection`` block (``rule``, ``candidates``, ``guards``)."""
    probe: bool | None = None
    """``probe.run`` of the replayed study: whether it runs the frozen probe (its models join the
    candidates, its seconds count as compute); None: as a default study does (before two-stage and
    exhaustive). A guided method runs it whatever this says."""


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
    """The chosen model's cut."""
    strategy: str = SEARCH_STRATEGY
    """The chosen model's strategy (``ttl``, ``probe``...)."""
    val: float | None = None
    """The pick's validation metric (this seed)."""
    val_ci: tuple[float, float] | None = None
    """Its bootstrap interval."""
    test: float | None = None
    """The pick's test metric (this seed; reported, never used to decide)."""
    test_ci: tuple[float, float] | None = None
    """Its bootstrap interval (the same resampling as validation's)."""
    test_accuracy: float | None = None
    """The pick's test accuracy."""
    params: int | None = None
    """Parameters of the pick."""

    @property
    def key(self) -> Key | None:
        return None if self.pick is None else (self.strategy, self.pick)

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
    values = merge(values, {"search": search, "selection": method.selection, "probe": {"run": method.probe},
                            "baselines": [], "baseline_cuts": {}})
    return from_dict(StudyConfig, values)


def replay(trials: Sequence[FrozenTrial], cfg: StudyConfig, candidates: Sequence[CutCandidate], method: Method,
           repeat: int, probe: dict[str, Any] | None = None, models: ProbeModels | None = None) -> Replay:
    """Replay ``method`` on seed ``repeat`` of an exhaustive study's ``trials``; ``probe``: the
    study's stored probe table, which a study that runs the probe needs (its seconds count as
    compute), and ``models``: the probe's models (candidates for the answer)."""
    if cfg.selection.folds > 1:
        raise StudyError("replays use the validation split; this study cross-validates (selection.folds > 1)")
    source = seed_trials(trials, repeat)
    mcfg = method_config(cfg, method, seed=repeat)
    guided = needs_probe(mcfg)
    if guided and probe is None:
        if mcfg.probe.run is None and not SEARCH_METHODS[mcfg.search.method].needs_probe:
            guided = False  # a default study would have probed: this one has nothing stored to replay
        else:
            raise StudyError(f"method {method.label!r} runs the frozen probe, and the study has no stored probe "
                             "table; run `ttl-search probe` on it first")
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
        params = suggest_params(trial, sampler.candidates, [SEARCH_STRATEGY], 1)  # the cuts within the budget
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
    answer = study_answer(study.get_trials(deepcopy=False), mcfg, candidates, models if guided else None)
    out = Replay(method.label, answer.rule, repeat, trained, round(compute, 2), answer.pick, answer.strategy)
    if answer.pick is not None:
        val, test = (seed_evidence(trials, repeat, models, split).get(answer.key) for split in ("val", "test"))
        args = (cfg.metric, cfg.resolved_direction, cfg.selection)
        score = answer.scores.get(answer.key)
        out.val = score.value if score else score_candidates({answer.key: val}, *args)[answer.key].value
        out.val_ci = score.ci if score else None
        tested = score_candidates({answer.key: test}, *args)[answer.key]
        out.test, out.test_ci = tested.value, tested.ci
        labels, probs = test.folds[0]
        out.test_accuracy = float(np.mean(probs[0].argmax(axis=1) == labels))
        out.params = answer_params(source, models, answer.key)
    return out


def answer_params(source: dict[Key, FrozenTrial], models: ProbeModels | None, key: Key) -> int | None:
    """Parameters of a replay's pick: its trial's, or the probe table's."""
    if key in source:
        return TrialRecord.from_trial(source[key]).params
    return (models.params if models else {}).get(key[1])


def seed_evidence(trials: Sequence[FrozenTrial], repeat: int, models: ProbeModels | None,
                  split: str = "val") -> dict[Key, Any]:
    """The ``split`` predictions of seed ``repeat``'s trials and of the probe's models, by key."""
    evidence, _ = trial_evidence(list(seed_trials(trials, repeat).values()), split)
    for key, ev in (models.evidence(split) if models else {}).items():
        evidence.setdefault(key, ev)
    return evidence


def indistinguishable(trials: Sequence[FrozenTrial], cfg: StudyConfig, repeat: int, key: Key, reference: Key,
                      models: ProbeModels | None = None) -> bool:
    """Whether model ``key``'s validation metric is indistinguishable from ``reference``'s on seed
    ``repeat`` (paired bootstrap at the study's confidence); keys are (strategy, cut)."""
    if key == reference:
        return True
    evidence = seed_evidence(trials, repeat, models)
    scores = score_candidates({k: evidence[k] for k in (reference, key)}, cfg.metric, cfg.resolved_direction,
                              cfg.selection, reference=reference)
    return scores[key].indistinguishable


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
