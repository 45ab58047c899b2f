"""Search strategies as Optuna samplers whose whole state is the stored trials.

A trial's identity is ``strategy`` (``ttl`` for the search, or a baseline), ``cut``, ``repeat``
(seed index) and ``fold``, stored as Optuna parameters where they vary within the study (see
:func:`job_distributions`). A sampler's :meth:`plan` reads the study's trials (with its baselines
study's, see :func:`ttl_search.storage.study_trials`) and says
what to train next, to wait (a stage barrier with trials still running), or that the study is
finished. Nothing is pickled: a restarted driver rebuilds the sampler from the config and
continues exactly where the database says the study is.

- ``two_stage`` (the paper): stage 1 trains the stage-end cuts; once all of them are complete,
  stage 2 trains the other cuts of the best ``top_k`` stages; then the study is finished.
- ``exhaustive``: every valid cut.
- ``tpe``: Optuna's TPE over the cuts (optionally lr and weight decay) with a trial budget.
- ``guided``: the frozen probe (:mod:`ttl_search.train.probe`) ranks every cut from one forward
  pass; the probe's best cuts are trained first, then the search climbs from the best trained cut
  to its untrained neighbours until the best cut's neighbours are trained or the budget is spent.
- ``none``: no search, only the configured baselines (a sibling study for comparisons).

Failed trials count as not tried and are retried up to ``max_retries`` times; a (strategy, cut,
repeat) whose retries are spent is given up on. Decisions use the mean over repeats; within
``tolerance`` of the best, the smaller model wins.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from ..errors import ConfigError, choices
from .record import SEARCH_STRATEGY, mean_sd



@dataclass(frozen=True)
class CutCandidate:
    """A valid cut the search may train."""

    index: int
    """Cut index."""
    name: str
    """Last kept unit."""
    stage: int
    """Stage of the cut."""
    params: int
    """Parameters of the truncated model (tie-breaking: smaller wins)."""
    macs: int | None = None
    """Multiply-accumulates of one forward pass of the truncated model (None: not recorded)."""
    latency_ms: float | None = None
    """Median forward time at the budget's batch, measured before training (None: not measured)."""
    over_budget: str = ""
    """Why the cut is over the study's deployment budget (``selection.budget``): it is never trained
    nor chosen; empty when it fits."""


@dataclass(frozen=True)
class Job:
    """One training the plan asks for."""

    strategy: str
    """``ttl`` or a baseline strategy."""
    cut: int
    """Cut index."""
    repeat: int
    """Seed index (0-based)."""
    phase: str
    """``stage1``, ``stage2``, ``exhaustive``, ``guided``, ``tpe``, ``baseline`` or ``ensemble``."""
    fold: int = 0
    """Validating fold of a cross-validated study (0 otherwise)."""

    @property
    def key(self) -> "Key":
        return Key(self.strategy, self.cut, self.repeat, self.fold)


@dataclass
class Plan:
    """What to do next: run ``job``, ``wait`` for running trials, or ``finished``."""

    action: str
    """``run``, ``wait`` or ``finished``."""
    job: Job | None = None
    """The job to run (action ``run``)."""
    phase: str = ""
    """The phase the study is in."""
    expected_total: int = 0
    """Trainings the study will have when it finishes, as far as known now."""
    note: str = ""
    """Why the plan waits or finished."""
    reuse: FrozenTrial | None = None
    """A completed trial that already trained ``job``'s model (its twin): store a copy of its
    result instead of training again."""


@dataclass(frozen=True)
class Key:
    """Identity of a training: the same key is never completed twice."""

    strategy: str
    cut: int
    repeat: int
    fold: int = 0


TWIN_STRATEGIES = {"full": SEARCH_STRATEGY, SEARCH_STRATEGY: "full"}
"""Strategies that train the same model with the same seed at the same cut: full fine-tuning is
TTL at the last cut (the only cut ``full`` trains at)."""


def twin_key(key: Key) -> Key | None:
    """The key of the training that gives the same model as ``key``, if any."""
    other = TWIN_STRATEGIES.get(key.strategy)
    return Key(other, key.cut, key.repeat, key.fold) if other else None


def trial_key(trial: FrozenTrial) -> Key | None:
    """The trial's identity: its parameters, or for one that a study never varies (not stored as
    a parameter, see :func:`job_distributions`) the attribute the driver wrote at launch."""
    p, a = trial.params, trial.user_attrs
    cut = p.get("cut", a.get("cut"))
    if cut is None:
        return None
    return Key(str(p.get("strategy", a.get("strategy", SEARCH_STRATEGY))), int(cut), int(p.get("repeat", 0)),
               int(p.get("fold", 0)))


ENSEMBLE_PHASE = "ensemble"
"""The phase after the search that trains the chosen cut's other seeds (``selection.ensemble``)."""

Chooser = Callable[[Sequence[FrozenTrial]], "int | None"]
"""The study's selection rule as the sampler calls it: settled search trials -> chosen cut."""


def search_trials(trials: Iterable[FrozenTrial], repeats: int) -> list[FrozenTrial]:
    """The trials the search decides on: every trial but the ensemble phase's, whose seed (repeat)
    is beyond the search's ``repeats``. Decisions never see the ensemble's extra seeds, so they
    cannot change the cut those seeds were trained for, even on a resume."""
    return [t for t in trials if (key := trial_key(t)) is None or key.repeat < repeats]


@dataclass
class Ledger:
    """The stored trials, grouped by key."""

    complete: dict[Key, list[float]] = field(default_factory=lambda: defaultdict(list))
    running: set[Key] = field(default_factory=set)
    failures: dict[Key, int] = field(default_factory=lambda: defaultdict(int))
    pruned: set[Key] = field(default_factory=set)
    first_complete: dict[Key, FrozenTrial] = field(default_factory=dict)
    """The first completed trial of each key."""

    @classmethod
    def from_trials(cls, trials: Iterable[FrozenTrial]) -> "Ledger":
        ledger = cls()
        for t in trials:
            key = trial_key(t)
            if key is None:
                continue
            if t.state == TrialState.COMPLETE and t.value is not None:
                ledger.complete[key].append(float(t.value))
                ledger.first_complete.setdefault(key, t)
            elif t.state == TrialState.RUNNING:
                ledger.running.add(key)
            elif t.state == TrialState.FAIL:
                ledger.failures[key] += 1
            elif t.state == TrialState.PRUNED:
                ledger.pruned.add(key)
        return ledger

    def settled(self, key: Key, max_retries: int) -> bool:
        """Completed, pruned (a scheduler's verdict) or given up after too many failures."""
        return key in self.complete or key in self.pruned or self.failures[key] > max_retries

    def mean(self, strategy: str, cut: int) -> float | None:
        return mean_sd(v for k, vs in self.complete.items() if k.strategy == strategy and k.cut == cut for v in vs)[0]


def choose_best(scores: dict[int, float], params: dict[int, int], direction: str, tolerance: float) -> list[int]:
    """Cuts ranked best first: by score, except that a smaller model within ``tolerance`` of the
    best score goes first (the paper's preference for the smaller model)."""
    if not scores:
        return []
    sign = 1.0 if direction == "maximize" else -1.0
    best = max(sign * s for s in scores.values())
    near = [c for c, s in scores.items() if best - sign * s <= tolerance + 1e-12]
    near.sort(key=lambda c: (params[c], -sign * scores[c], c))
    rest = sorted((c for c in scores if c not in near), key=lambda c: (-sign * scores[c], params[c], c))
    return near + rest


def rank_cuts(trials: Sequence[FrozenTrial], candidates: Sequence[CutCandidate], direction: str, tolerance: float,
              strategy: str = SEARCH_STRATEGY) -> list[tuple[int, float]]:
    """(cut, mean value over repeats) of every completed cut of ``strategy``, best first."""
    ledger = Ledger.from_trials(trials)
    scores = {c.index: m for c in candidates if (m := ledger.mean(strategy, c.index)) is not None}
    order = choose_best(scores, {c.index: c.params for c in candidates}, direction, tolerance)
    return [(c, scores[c]) for c in order]


class PlannedSampler(BaseSampler):
    """Base of the deterministic samplers: ``plan()`` decides, ``sample_independent`` obeys.

    ``before_trial`` fixes the plan for the trial being asked (the driver calls :meth:`plan`
    first and only asks when the action is ``run``), so its parameters are consistent. A driver
    that planned on more trials than the asked study holds (a study and its baselines study)
    says which job it asks for with :meth:`expect`.
    """

    def __init__(self, candidates: Sequence[CutCandidate], direction: str, repeats: int = 1, max_retries: int = 2,
                 baselines: Sequence[tuple[str, int]] = (), tolerance: float = 0.0, folds: int = 1,
                 ensemble: int = 1, chooser: Chooser | None = None) -> None:
        self.candidates = list(candidates)
        self.by_index = {c.index: c for c in candidates}
        self.direction = direction
        self.repeats = repeats
        self.max_retries = max_retries
        self.baselines = list(baselines)
        self.tolerance = tolerance
        self.folds = folds
        self.ensemble = ensemble
        """Seeds of the chosen cut that make the answer (see ``selection.ensemble``)."""
        self.chooser = chooser
        """The study's selection rule: its settled search trials -> the chosen cut (or None)."""
        self._pending: dict[int, Job] = {}
        """The job of each trial being asked, by storage trial id (unique across studies)."""
        self._next: Job | None = None
        self._chosen: tuple[tuple, int | None] | None = None
        """The chooser's last pick and the settled trials it was made on."""

    # -- what to run ------------------------------------------------------------------------
    def search_jobs(self, ledger: Ledger) -> tuple[list[Job], str, bool, int]:
        """(jobs of the current phase, phase name, whether later phases depend on running ones,
        expected total of search trainings)."""
        raise NotImplementedError

    def _open(self, jobs: Iterable[Job], ledger: Ledger) -> list[Job]:
        return [j for j in jobs if not ledger.settled(j.key, self.max_retries)]

    def _jobs(self, strategy: str, cuts: Iterable[int], phase: str) -> list[Job]:
        """Every seed (and cross-validation fold) of ``cuts``, in the order given."""
        return [Job(strategy, c, r, phase, f) for c in cuts for r in range(self.repeats) for f in range(self.folds)]

    def _phase_jobs(self, cuts: Iterable[int], phase: str) -> list[Job]:
        """The search trainings of a phase whose cuts are all trained anyway, deepest cut first.

        A deeper cut keeps every layer of a shallower one, so it trains longest; starting the
        longest first (the LPT rule) lets the short ones fill the slots at the end of the phase
        instead of one long training running alone there, which shortens each phase, and most of
        all the wait at the two-stage barrier. The order decides nothing but timing."""
        return self._jobs(SEARCH_STRATEGY, sorted(cuts, reverse=True), phase)

    def baseline_jobs(self) -> list[Job]:
        return [j for s, c in self.baselines for j in self._jobs(s, [c], "baseline")]

    def plan(self, trials: Sequence[FrozenTrial]) -> Plan:
        """The next training (or a completed twin to copy), ``wait`` or ``finished``.

        The search's phases (and the baselines) first, decided on the search's own trials; then,
        with ``ensemble`` above ``repeats``, the ensemble phase: the chosen cut's missing seeds."""
        ledger = Ledger.from_trials(trials)
        decided_on = search_trials(trials, self.repeats)
        searched = ledger if len(decided_on) == len(trials) else Ledger.from_trials(decided_on)
        jobs, phase, barrier, expected = self.search_jobs(searched)
        extra = max(0, self.ensemble - self.repeats) * self.folds
        expected += len(self.baseline_jobs()) + extra
        open_jobs = self._open([*jobs, *self.baseline_jobs()], ledger)
        plan = self._next_job(open_jobs, ledger, phase, expected)
        if plan is None and extra and not open_jobs:  # every search training settled: the pick is final
            phase = ENSEMBLE_PHASE
            plan = self._next_job(self.ensemble_jobs(decided_on), ledger, phase, expected)
        if plan is not None:
            return plan
        if ledger.running:
            barrier = barrier or (extra > 0 and phase != ENSEMBLE_PHASE)
            return Plan("wait", None, phase, expected, "waiting for running trials" + (
                " (stage barrier)" if barrier else ""))
        return Plan("finished", None, phase, expected, "every planned training is settled")

    def _next_job(self, jobs: Iterable[Job], ledger: Ledger, phase: str, expected: int) -> Plan | None:
        """A plan to run the first open job of ``jobs`` that no running trial (or twin) answers;
        None when there is none."""
        for job in self._open(jobs, ledger):
            key = job.key
            twin = twin_key(key)
            if key in ledger.running or twin in ledger.running:
                continue  # a running twin will answer for this job too
            return Plan("run", job, phase, expected, reuse=ledger.first_complete.get(twin))
        return None

    def ensemble_jobs(self, decided_on: Sequence[FrozenTrial]) -> list[Job]:
        """The seeds ``repeats..ensemble-1`` (every fold) of the cut the search chose on
        ``decided_on`` (its settled trials); none without a chooser or a chosen cut."""
        if self.chooser is None:
            return []
        # Once the search has settled its trials never change, so the pick (a bootstrap over every
        # cut) is computed once per set of settled trials, not on every ask of the ensemble phase.
        settled = tuple((t._trial_id, t.state) for t in decided_on)
        if self._chosen is None or self._chosen[0] != settled:
            self._chosen = (settled, self.chooser(decided_on))
        cut = self._chosen[1]
        if cut is None:
            return []
        return [Job(SEARCH_STRATEGY, cut, r, ENSEMBLE_PHASE, f)
                for r in range(self.repeats, self.ensemble) for f in range(self.folds)]

    # -- Optuna sampler interface -------------------------------------------------------------
    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return {}

    def expect(self, job: Job) -> None:
        """The next trial asked (of any study using this sampler) trains ``job``, as the caller
        planned it."""
        self._next = job

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        job, self._next = self._next, None
        if job is None:
            plan = self.plan(study.get_trials(deepcopy=False))
            job = plan.job if plan.action == "run" else None
        if job is not None:
            self._pending[trial._trial_id] = job

    def after_trial(self, study, trial, state, values) -> None:
        self._pending.pop(trial._trial_id, None)

    def sample_independent(self, study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        job = self._pending.get(trial._trial_id)
        if job is None:
            raise optuna.exceptions.OptunaError("the plan has nothing to run: call plan() before asking a trial")
        value = {"strategy": job.strategy, "cut": job.cut, "repeat": job.repeat, "fold": job.fold}.get(param_name)
        if value is None:
            raise optuna.exceptions.OptunaError(f"parameter {param_name!r} is not planned by {type(self).__name__}")
        return value

    # -- answers ---------------------------------------------------------------------------------
    def ranking(self, trials: Sequence[FrozenTrial], strategy: str = SEARCH_STRATEGY) -> list[tuple[int, float]]:
        return rank_cuts(search_trials(trials, self.repeats), self.candidates, self.direction, self.tolerance,
                         strategy)


class BaselinesOnlySampler(PlannedSampler):
    """No search: only the configured baselines (a sibling study for comparisons)."""

    def search_jobs(self, ledger: Ledger) -> tuple[list[Job], str, bool, int]:
        return [], "baselines", False, 0


class ExhaustiveSampler(PlannedSampler):
    """Every valid cut, each ``repeats`` times, deepest first."""

    def search_jobs(self, ledger: Ledger) -> tuple[list[Job], str, bool, int]:
        jobs = self._phase_jobs([c.index for c in self.candidates], "exhaustive")
        return jobs, "exhaustive", False, len(jobs)


class TwoStageSampler(PlannedSampler):
    """The paper's two-stage search over the cut points."""

    def __init__(self, candidates: Sequence[CutCandidate], direction: str, repeats: int = 1, max_retries: int = 2,
                 baselines: Sequence[tuple[str, int]] = (), tolerance: float = 0.0, top_k: int = 1,
                 folds: int = 1, ensemble: int = 1, chooser: Chooser | None = None) -> None:
        super().__init__(candidates, direction, repeats, max_retries, baselines, tolerance, folds, ensemble, chooser)
        if top_k < 1:
            raise ConfigError(f"search.top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        stages: dict[int, list[CutCandidate]] = defaultdict(list)
        for c in self.candidates:
            stages[c.stage].append(c)
        self.stages = dict(sorted(stages.items()))
        # The last valid cut of each stage stands for the stage in stage 1.
        self.representatives = {s: cs[-1] for s, cs in self.stages.items()}

    def winning_stages(self, ledger: Ledger) -> list[int]:
        reps = {c.index: s for s, c in self.representatives.items()}
        scores = {cut: m for cut in reps if (m := ledger.mean(SEARCH_STRATEGY, cut)) is not None}
        order = choose_best(scores, {c.index: c.params for c in self.candidates}, self.direction, self.tolerance)
        return [reps[cut] for cut in order[: self.top_k]]

    def search_jobs(self, ledger: Ledger) -> tuple[list[Job], str, bool, int]:
        stage1 = self._phase_jobs([c.index for c in self.representatives.values()], "stage1")
        largest = sorted((len(cs) - 1 for cs in self.stages.values()), reverse=True)[: self.top_k]
        if self._open(stage1, ledger):
            return stage1, "stage1", True, len(stage1) + sum(largest) * self.repeats * self.folds
        winners = self.winning_stages(ledger)
        inner = [c for s in winners for c in self.stages[s] if c is not self.representatives[s]]
        stage2 = self._phase_jobs([c.index for c in inner], "stage2")
        return stage2, "stage2", False, len(stage1) + len(stage2)


GUIDES = ("probe_val", "knn_val", "logme")
"""Probe scores that can rank the cuts of a guided search."""


def probe_ranking(rows: Sequence[dict[str, Any]], guide: str, direction: str) -> list[int]:
    """Cuts of a stored probe table, best first by ``guide`` (``probe_val`` and ``knn_val`` follow
    the study's direction, LogME is higher-better); ties go to the smaller model. Rows without a
    finite score come last."""
    if guide not in GUIDES:
        raise ConfigError(f"unknown search.guide {guide!r}; valid guides: {choices(GUIDES)}")
    sign = 1.0 if guide == "logme" or direction == "maximize" else -1.0

    def key(row: dict[str, Any]) -> tuple:
        value = row.get(guide)
        finite = isinstance(value, (int, float)) and value == value and abs(value) != float("inf")
        return (0 if finite else 1, -sign * value if finite else 0.0, row.get("params") or 0, row["cut"])

    return [int(row["cut"]) for row in sorted(rows, key=key)]


class GuidedSampler(PlannedSampler):
    """Probe-guided search: train the probe's best cuts, then climb to the best trained cut's
    neighbours, within a budget of cut trainings (each ``repeats`` x folds times).

    Its state is the stored trials plus the stored probe table (``probe_order``): a resumed study
    continues exactly where it stopped."""

    def __init__(self, candidates: Sequence[CutCandidate], direction: str, ranking: Sequence[int] | None,
                 budget: int = 5, initial: int = 2, repeats: int = 1, max_retries: int = 2,
                 baselines: Sequence[tuple[str, int]] = (), tolerance: float = 0.0, folds: int = 1,
                 ensemble: int = 1, chooser: Chooser | None = None) -> None:
        super().__init__(candidates, direction, repeats, max_retries, baselines, tolerance, folds, ensemble, chooser)
        if budget < 1 or initial < 1:
            raise ConfigError(f"guided search: search.budget and search.initial must be >= 1, got {budget} and {initial}")
        self.probe_order = None if ranking is None else [c for c in ranking if c in self.by_index]
        """Cuts by probe score, best first (None while the study has no probe table)."""
        self.budget = min(budget, len(self.candidates))
        self.initial = min(initial, self.budget)

    def first_cuts(self) -> list[int]:
        """The probe's best ``initial`` cuts, not next to each other where the ranking allows."""
        ranking = self._ranking()
        chosen: list[int] = []
        for cut in ranking:
            if len(chosen) < self.initial and all(abs(cut - other) > 1 for other in chosen):
                chosen.append(cut)
        for cut in ranking:
            if len(chosen) < self.initial and cut not in chosen:
                chosen.append(cut)
        return chosen

    def _ranking(self) -> list[int]:
        if self.probe_order is None:
            raise ConfigError("the guided search needs the study's probe table, and none is stored; the driver "
                              "runs the probe first (`ttl-search run`/`resume`), or run `ttl-search probe STUDY_FILE`")
        return self.probe_order

    def next_cuts(self, ledger: Ledger) -> list[int]:
        """The climb's current round: the untried neighbours of the best cut trained before it (in
        the probe's order), within the budget; while no cut has a result, the next cut by probe rank.

        Rounds are replayed from the stored results alone, so what is trained does not depend on how
        many trials ran at once. An empty round means the study is finished."""
        ranking = self._ranking()
        rank = {c: i for i, c in enumerate(ranking)}
        params = {c.index: c.params for c in self.candidates}
        tried = list(self.first_cuts())
        while True:
            left = self.budget - len(tried)
            if left <= 0:
                return []
            scores = {c: m for c in tried if (m := ledger.mean(SEARCH_STRATEGY, c)) is not None}
            if scores:
                best = choose_best(scores, params, self.direction, self.tolerance)[0]
                near = [c for c in (best - 1, best + 1) if c in self.by_index and c not in tried]
                round_ = sorted(near, key=lambda c: rank.get(c, len(rank)))[:left]
            else:
                round_ = [c for c in ranking if c not in tried][:1]
            if not round_ or self._open(self._jobs(SEARCH_STRATEGY, round_, "guided2"), ledger):
                return round_
            tried += round_

    def search_jobs(self, ledger: Ledger) -> tuple[list[Job], str, bool, int]:
        expected = self.budget * self.repeats * self.folds
        first = self._jobs(SEARCH_STRATEGY, self.first_cuts(), "guided1")
        if self._open(first, ledger):
            return first, "guided1", True, expected
        climb = self._jobs(SEARCH_STRATEGY, self.next_cuts(ledger), "guided2")
        return climb, "guided2", True, expected


class TPESearch(TPESampler):
    """Optuna's TPE over the cut (and optionally lr and weight decay) with a trial budget."""

    def __init__(self, candidates: Sequence[CutCandidate], direction: str, budget: int, seed: int = 0,
                 max_retries: int = 2, tolerance: float = 0.0) -> None:
        if budget < 1:
            raise ConfigError(f"search.budget must be >= 1 for the tpe search, got {budget}")
        super().__init__(seed=seed, n_startup_trials=min(5, budget))
        self.candidates = list(candidates)
        self.direction = direction
        self.budget = budget
        self.max_retries = max_retries
        self.tolerance = tolerance

    def plan(self, trials: Sequence[FrozenTrial]) -> Plan:
        trials = [t for t in trials if t.params.get("strategy", SEARCH_STRATEGY) == SEARCH_STRATEGY]  # not the probe's
        done = sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
        failed = sum(1 for t in trials if t.state == TrialState.FAIL)
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        if failed > self.max_retries * self.budget:
            return Plan("finished", None, "tpe", self.budget, "too many failed trials")
        if done + running < self.budget:
            return Plan("run", Job(SEARCH_STRATEGY, -1, 0, "tpe"), "tpe", self.budget)
        if running:
            return Plan("wait", None, "tpe", self.budget, "waiting for running trials")
        return Plan("finished", None, "tpe", self.budget, "budget spent")

    def expect(self, job: Job) -> None:
        """TPE samples the cut itself."""

    def ranking(self, trials: Sequence[FrozenTrial], strategy: str = SEARCH_STRATEGY) -> list[tuple[int, float]]:
        return rank_cuts(trials, self.candidates, self.direction, self.tolerance, strategy)


def job_distributions(candidates: Sequence[CutCandidate], strategies: Sequence[str],
                      repeats: int, folds: int = 1, cuts: Sequence[int] | None = None) -> dict[str, BaseDistribution]:
    """The distributions of a study's trial parameters, the same in every trial of the study:
    ``strategy`` (of ``strategies``), ``cut`` (of ``cuts``, default every candidate), ``repeat``
    (seed index) and ``fold`` (of a cross-validated study). A parameter that never varies in the
    study is left out (optuna-dashboard would plot it and rank its importance); the driver writes
    every one as a trial attribute too, and readers take it from there (see :func:`trial_key`)."""
    cuts = [c.index for c in candidates] if cuts is None else list(cuts)
    dists: dict[str, BaseDistribution] = {}
    if len(strategies) > 1:
        dists["strategy"] = CategoricalDistribution(list(strategies))
    if len(cuts) > 1:
        dists["cut"] = CategoricalDistribution(cuts)
    if repeats > 1:
        dists["repeat"] = IntDistribution(0, repeats - 1)
    if folds > 1:
        dists["fold"] = IntDistribution(0, folds - 1)
    return dists


def suggest_params(trial: optuna.Trial, candidates: Sequence[CutCandidate], strategies: Sequence[str],
                   repeats: int, tune_lr: bool = False, folds: int = 1,
                   cuts: Sequence[int] | None = None) -> dict[str, Any]:
    """Ask ``trial`` for its parameters with fixed distributions (the same in every trial); the
    ones that never vary (see :func:`job_distributions`) are filled in, not asked for."""
    cuts = [c.index for c in candidates] if cuts is None else list(cuts)
    dists = job_distributions(candidates, strategies, repeats, folds, cuts)
    params: dict[str, Any] = {
        "strategy": (trial.suggest_categorical("strategy", dists["strategy"].choices) if "strategy" in dists
                     else strategies[0]),
        "cut": trial.suggest_categorical("cut", dists["cut"].choices) if "cut" in dists else cuts[0],
        "repeat": trial.suggest_int("repeat", dists["repeat"].low, dists["repeat"].high) if "repeat" in dists else 0,
    }
    if "fold" in dists:
        params["fold"] = trial.suggest_int("fold", dists["fold"].low, dists["fold"].high)
    if tune_lr:
        params["lr"] = trial.suggest_float("lr", 1e-5, 1e-2, log=True)
        params["weight_decay"] = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    return params


# ---------------------------------------------------------------------------------------------
# The registry of search methods

SamplerBuilder = Callable[..., BaseSampler]


@dataclass(frozen=True)
class SearchMethod:
    """A way to search the cuts, as ``search.method`` names it."""

    name: str
    """Key in study files."""
    description: str
    """One line for help texts and reports."""
    build: SamplerBuilder
    """(cut candidates, direction, the study's ``search`` settings, baselines as (strategy, cut),
    cross-validation folds, the probe's ranking of the cuts or None, the ensemble's seeds, the
    study's selection rule as a :data:`Chooser`) -> the sampler."""
    takes_baselines: bool = True
    """Whether it can schedule baselines in the same study."""
    takes_folds: bool = True
    """Whether it can train every cut on each cross-validation fold."""
    takes_ensemble: bool = True
    """Whether it can train the chosen cut's other seeds after the search (``selection.ensemble``)."""
    needs_probe: bool = False
    """Whether it is guided by the frozen probe (run before the search, stored in the study)."""
    probes_by_default: bool = False
    """Whether the frozen probe runs before it unless ``probe.run`` says otherwise (its models are
    candidates for the answer)."""


def _planned(cls: type[PlannedSampler], **extra: Callable[[Any], Any]) -> SamplerBuilder:
    def build(candidates, direction, s, baselines, folds=1, ranking=None, ensemble=1, chooser=None):
        return cls(candidates, direction=direction, repeats=s.repeats, max_retries=s.max_retries,
                   baselines=baselines, tolerance=s.tolerance, folds=folds, ensemble=ensemble, chooser=chooser,
                   **{k: f(s) for k, f in extra.items()})
    return build


def _tpe(candidates, direction, s, baselines, folds=1, ranking=None, ensemble=1, chooser=None) -> TPESearch:
    budget = s.budget if s.budget is not None else DEFAULT_BUDGETS["tpe"]
    return TPESearch(candidates, direction, budget, seed=s.seed, max_retries=s.max_retries, tolerance=s.tolerance)


def _guided(candidates, direction, s, baselines, folds=1, ranking=None, ensemble=1, chooser=None) -> GuidedSampler:
    budget = s.budget if s.budget is not None else DEFAULT_BUDGETS["guided"]
    return GuidedSampler(candidates, direction, ranking, budget=budget, initial=s.initial, repeats=s.repeats,
                         max_retries=s.max_retries, baselines=baselines, tolerance=s.tolerance, folds=folds,
                         ensemble=ensemble, chooser=chooser)


DEFAULT_BUDGETS = {"tpe": 10, "guided": 5}
"""``search.budget`` when unset: TPE trials, guided cut trainings."""


SEARCH_METHODS: dict[str, SearchMethod] = {m.name: m for m in (
    SearchMethod("two_stage", "the paper's: stage-end cuts first, then the cuts inside the best stage(s)",
                 _planned(TwoStageSampler, top_k=lambda s: s.top_k), probes_by_default=True),
    SearchMethod("exhaustive", "every valid cut", _planned(ExhaustiveSampler), probes_by_default=True),
    SearchMethod("tpe", "Optuna's TPE over the cuts (and optionally lr, weight decay) with a trial budget", _tpe,
                 takes_baselines=False, takes_folds=False, takes_ensemble=False),
    SearchMethod("guided", "the frozen probe ranks every cut; its best cuts are trained, then the best one's "
                 "neighbours, within a budget of trainings", _guided, needs_probe=True),
    SearchMethod("none", "no search: only the baselines (a sibling study for comparisons)",
                 _planned(BaselinesOnlySampler), takes_ensemble=False),
)}


def check_search(name: str) -> None:
    if name not in SEARCH_METHODS:
        raise ConfigError(f"unknown search method {name!r}; valid methods: {choices(SEARCH_METHODS)}")
