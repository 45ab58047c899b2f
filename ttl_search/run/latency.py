"""The study's quiet latency pass (see :mod:`ttl_search.train.latency`): after the search, every
trained model is timed one at a time, with nothing else of the study running, and the table is
stored with the study (attribute ``latency``). The driver runs it on a Ray worker with a trial's
resources; ``ttl-search report --measure-latency`` runs it where the command runs."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable

import optuna

from ..config import from_dict, to_dict
from ..results import LATENCY_ATTR, stored_candidates, stored_latency
from ..search.record import SEARCH_STRATEGY, completed_by_cut, records
from ..search.study import StudyConfig
from ..storage import study_trials
from ..train.latency import DEFAULT_REPEATS, measure_models
from ..train.trial import TrialConfig
from .cluster import run_task

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
    """The latency pass on a Ray worker."""
    return measure_models(from_dict(TrialConfig, trial_values), [tuple(m) for m in models], repeats)


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
    tcfg = replace(cfg.trial, seed=cfg.search.seed, threads=max(1, int(cfg.resources.cpus)))  # a trial's threads
    if remote:
        table = run_task(cfg, _latency_task, to_dict(tcfg), models, repeats, what="the latency pass")
    else:
        table = measure_models(tcfg, models, repeats, progress=progress)
    if lease is not None:
        lease.ensure_held()
    study.set_user_attr(LATENCY_ATTR, table)
    log.info("latency pass: %d models in %.1f s on %s", len(models), table["seconds"], table["device_name"])
    return table
