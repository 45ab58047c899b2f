"""The study's quiet latency pass (see :mod:`ttl_search.train.latency`): after the search, every
trained model is timed one at a time, with nothing else of the study running, and the table is
stored with the study (attribute ``latency``). The driver runs it on a Ray worker with a trial's
resources; ``ttl-search report --measure-latency`` runs it where the command runs."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable, Sequence

import optuna

from ..config import from_dict, to_dict
from ..results import LATENCY_ATTR, stored_candidates, stored_latency
from ..search.record import SEARCH_STRATEGY, completed_by_cut, records
from ..search.budget import apply_budget, check_feasible, read_latency_table
from ..search.samplers import CutCandidate
from ..search.study import StudyConfig, model_input
from ..storage import study_trials
from ..train.cut_latency import measure_cut_latency
from ..train.latency import DEFAULT_REPEATS, measure_models
from ..train.trial import TrialConfig
from .cluster import run_task
from .devices import local_device, on_ray_device

log = logging.getLogger(__name__)


def latency_models(study: optuna.Study, cfg: StudyConfig) -> list[tuple[str, int]]:
    """Every completed (strategy, cut) of the study and its baselines study, and the full model
    (TTL at the last cut) as the yardstick."""
    models = list(completed_by_cut(records(study_trials(study))))
    full = (SEARCH_STRATEGY, max(c.index for c in stored_candidates(study, cfg)))
    return models + ([full] if full not in models else [])


def latency_repeats(cfg: StudyConfig) -> int:
    """Timed batch-1 passes per model: ``trial.latency_repeats``, at least
    :data:`~ttl_search.train.latency.DEFAULT_REPEATS` (enough for quartiles); 0 turns the pass off."""
    repeats = cfg.trial.latency_repeats
    return 0 if repeats <= 0 else max(repeats, DEFAULT_REPEATS)


def _latency_task(trial_values: dict[str, Any], models: list[tuple[str, int]], repeats: int) -> dict[str, Any]:
    """The latency pass on a Ray worker (on the device Ray assigned it)."""
    return measure_models(from_dict(TrialConfig, on_ray_device(trial_values)), [tuple(m) for m in models], repeats)


def latency_phase(study: optuna.Study, cfg: StudyConfig, remote: bool = True, lease=None,
                  progress: Callable[[int, int], None] | None = None, again: bool = False) -> dict[str, Any] | None:
    """Time every trained model of the study, one at a time with a trial's threads (on a Ray
    worker with a trial's resources when ``remote``, else here), and store the table with the
    study; None when the study measures no latency (``trial.latency_repeats: 0``) or has no
    completed trial. A stored table that covers every model is kept (a resumed study that trained
    nothing new) unless ``again``."""
    repeats = latency_repeats(cfg)
    models = latency_models(study, cfg) if repeats else []
    if len(models) < 2:  # no completed trial: only the yardstick
        return None
    stored = stored_latency(study)
    if not again and stored and {(r["strategy"], r["cut"]) for r in stored["rows"]} >= set(models):
        return stored
    log.info("latency pass: %d models, one at a time, %d timed passes each at batch 1", len(models), repeats)
    tcfg = replace(cfg.trial, seed=cfg.search.seed, threads=max(1, int(cfg.resources.cpus)),  # a trial's threads
                   device=local_device(cfg))  # here: what the trials ran on; on a worker: what Ray assigns
    if remote:
        table = run_task(cfg, _latency_task, to_dict(tcfg), models, repeats, what="the latency pass")
    else:
        table = measure_models(tcfg, models, repeats, progress=progress)
    if lease is not None:
        lease.ensure_held()
    study.set_user_attr(LATENCY_ATTR, table)
    log.info("latency pass: %d models in %.1f s on %s", len(models), table["seconds"], table["device_name"])
    return table


# ------------------------------------------------------------------- before training: the budget


def _cut_latency_task(cfg_values: dict[str, Any], cuts: list[int]) -> dict[str, Any]:
    """The pre-training latency pass on a Ray worker (on the device Ray assigned it)."""
    cfg = from_dict(StudyConfig, {**cfg_values, "trial": on_ray_device(cfg_values["trial"])})
    return measure_study_cuts(cfg, cuts)


def measure_study_cuts(cfg: StudyConfig, cuts: Sequence[int],
                       progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Time ``cuts`` as the study's trials build them (input size, channels, head), at the budget's
    batch, with a trial's threads on the trial's device."""
    size, channels = model_input(cfg.trial)
    table = measure_cut_latency(cfg.trial.backbone, size, cuts, channels, cfg.trial.head,
                                batches=(cfg.selection.budget.latency_batch,), repeats=latency_repeats(cfg) or
                                DEFAULT_REPEATS, device=local_device(cfg), threads=max(1, int(cfg.resources.cpus)),
                                amp=cfg.trial.amp, progress=progress)
    table["source"] = "measured at study start"
    return table


def cut_latency_table(cfg: StudyConfig, candidates: Sequence[CutCandidate], remote: bool,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any] | None:
    """The latency of every candidate cut before training, for ``selection.budget.latency_ms``:
    read from ``selection.budget.latency_table`` (measured on the target machine), else measured
    now, one cut at a time (on a Ray worker with a trial's resources when ``remote``). None when
    the budget bounds no latency."""
    budget = cfg.selection.budget
    if budget.latency_ms is None:
        return None
    if budget.latency_table:
        size, channels = model_input(cfg.trial)
        table = read_latency_table(budget.latency_table, cfg.trial.backbone, size, channels)
        log.info("latency budget: cut latencies read from %s (%s)", budget.latency_table, table["device_name"])
        return table
    cuts = [c.index for c in candidates]
    log.info("latency budget: timing %d cuts before training, one at a time", len(cuts))
    if remote:
        table = run_task(cfg, _cut_latency_task, to_dict(cfg), cuts, what="the pre-training latency pass")
    else:
        table = measure_study_cuts(cfg, cuts, progress)
    log.info("latency budget: %d cuts timed in %.1f s on %s", len(cuts), table["seconds"], table["device_name"])
    return table


def budget_candidates(cfg: StudyConfig, candidates: Sequence[CutCandidate],
                      latency: dict[str, Any] | None = None) -> list[CutCandidate]:
    """The candidates with their budget marks (see :func:`~ttl_search.search.budget.apply_budget`);
    a :class:`ConfigError` naming the smallest cut's cost when none fits. With a latency budget and
    no ``latency`` table yet, only the other limits are checked (the early check, before Ray)."""
    budget = cfg.selection.budget
    if not budget.active:
        return list(candidates)
    if latency is None:
        budget = replace(budget, latency_ms=None)
    marked = apply_budget(candidates, budget, latency)
    check_feasible(marked, budget, cfg.trial.backbone)
    over = [c.index for c in marked if c.over_budget]
    if over:
        log.info("budget %s: cuts %s are over it and will not be trained", budget.describe(), over)
    return marked
