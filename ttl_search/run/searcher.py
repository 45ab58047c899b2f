"""The driver's side of a study on Ray Tune: a ``Searcher`` that turns the sampler's plan into
Tune trials and every Tune outcome into a stored Optuna trial.

The searcher keeps no state beyond the study database: ``suggest`` asks the sampler's plan
(which reads the stored trials), returns ``None`` at a stage barrier ("ask again later") and
``Searcher.FINISHED`` when the plan is done. What a finished Tune trial means for the study
(COMPLETE with its value, PRUNED, or FAIL with a reason) is decided by :func:`trial_outcome`, a
pure function; the searcher only applies it. Workers train and report; the driver (this
searcher) is the only writer of the database.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState
from ray.tune import Stopper
from ray.tune.search import Searcher

from ..config import to_dict
from ..errors import StudyError, TTLSearchError
from ..search.record import PREDICTIONS_ATTR, SEARCH_STRATEGY, TrialRecord, part_ref
from .cluster import ProgressCallback, os_reason
from ..search.samplers import CutCandidate, Job, Plan, job_distributions, suggest_params
from ..storage import (StorageUnavailableError, attach_artifact, baselines_study, copied_system_attrs,
                       set_trial_system_attr, study_trials, trial_ref)
from ..search.study import StudyConfig, part_space

log = logging.getLogger(__name__)

WORKER_LOST = "the worker failed: its process was killed or crashed, or its node died (see the Ray logs)"

NO_RETRY_ATTR = "retry"
"""User attribute set to False on a failed trial that running again cannot fix (its device ran out
of memory, or failed): the plan counts it as every retry spent, as long as the settings it failed
with (:data:`FAILED_WITH_ATTR`) are the study's."""
FAILED_WITH_ATTR = "failed_with"
"""User attribute of such a trial: the settings that decide its memory (see :func:`memory_settings`);
a study resumed with others (a larger ``resources.gpus``) trains it again."""
DEVICE_ATTR = "device_assignment"
"""User attribute: the device a trial got on its Ray worker (``device``, Ray's ``gpu_ids`` and the
``visible`` GPUs, see :class:`~ttl_search.run.devices.DeviceAssignment`)."""


# ---------------------------------------------------------------------------------------------
# What a finished Tune trial means for the study


@dataclass(frozen=True)
class Outcome:
    """How a finished Tune trial is stored."""

    state: TrialState
    """COMPLETE, PRUNED or FAIL."""
    value: float | None = None
    """The validation metric (COMPLETE only)."""
    record: TrialRecord = field(default_factory=TrialRecord)
    """What the trial measured, and why it failed or stopped (``fail_reason``, ``stopped_by``)."""
    history: tuple[tuple[int, float], ...] = ()
    """(epoch, validation metric) of every epoch the worker reported, for intermediate values."""
    predictions: dict[str, Any] = field(default_factory=dict)
    """The selected checkpoint's encoded ``val`` and ``test`` predictions (COMPLETE only)."""
    infrastructure: str = ""
    """Why the trial failed when the fault is the infrastructure's, not the trial's (the artifact
    folder is full): the study stops rather than burn its retries on the same fault."""
    retry: bool = True
    """Whether the plan may retry the trial when it failed: not when its device failed (out of
    memory, a CUDA error), since the same trial fails the same way."""
    extra: dict[str, Any] = field(default_factory=dict)
    """User attributes beyond the record's: the device assignment, the device's name and memory
    figures, ``retry: False``."""

    @property
    def attrs(self) -> dict[str, Any]:
        """The user attributes to store before the state."""
        return {**self.record.measured_attrs(), **self.extra}

    @property
    def where(self) -> str:
        """The device the trial ran on, in words (empty when the worker did not say)."""
        assigned = self.extra.get(DEVICE_ATTR) or {}
        device, name = assigned.get("device") or self.record.device, self.extra.get("device_name")
        if not device:
            return ""
        ids = assigned.get("gpu_ids")
        ray = (f"Ray GPU {','.join(ids)}" if ids else "Ray assigned no GPU") if assigned else ""
        return f"{device} ({'; '.join(x for x in (name, ray) if x)})" if name or ray else device

    @property
    def reason(self) -> str:
        """Why the trial failed or stopped ("" when it completed)."""
        return self.record.note


def trial_outcome(result: dict[str, Any] | None, error: bool, metric: str) -> Outcome:
    """The stored outcome of a Tune trial that ended with ``result`` (its last report) or ``error``.

    - an error, or no result: the worker was lost (FAIL);
    - the final report: COMPLETE with the validation ``metric`` when it is a number, else FAIL
      (undefined metric, or the trial's own failure such as a diverged loss), PRUNED when the
      trial stopped itself;
    - any earlier report: a Tune scheduler stopped the trial (PRUNED, with its epochs).
    """
    if error or result is None:
        return Outcome(TrialState.FAIL, record=TrialRecord(fail_reason=WORKER_LOST))
    if not result.get("final"):
        return Outcome(TrialState.PRUNED, record=TrialRecord(epochs=int(result.get("epoch", 0)),
                                                             node_id=result.get("node_id"), stopped_by="scheduler"))
    payload = json.loads(result["payload"])
    record = TrialRecord.from_payload(payload)
    extra = device_attrs(payload)
    history = tuple((int(e["epoch"]), float(e[metric])) for e in payload.get("history", [])
                    if e.get(metric) is not None and math.isfinite(e[metric]))
    status = payload.get("status")
    if status == "complete":
        value = record.val.get(metric)
        if value is None:
            record.fail_reason = f"validation {metric} is undefined (single-class validation split?)"
            return Outcome(TrialState.FAIL, record=record, history=history, extra=extra)
        return Outcome(TrialState.COMPLETE, float(value), record, history, payload.get("predictions") or {},
                       extra=extra)
    if status == "pruned":
        record.stopped_by = payload.get("reason", "")
        return Outcome(TrialState.PRUNED, record=record, history=history, extra=extra)
    record.fail_reason = payload.get("reason") or "failed"
    retry = payload.get("retry", True) is not False
    if not retry:
        extra[NO_RETRY_ATTR] = False
    return Outcome(TrialState.FAIL, record=record, history=history, infrastructure=payload.get("infrastructure", ""),
                   retry=retry, extra=extra)


def device_attrs(payload: dict[str, Any]) -> dict[str, Any]:
    """The attributes a worker's payload gives about its device: the assignment (``device``,
    ``gpu_ids``, ``visible``), the device's name, and on CUDA the memory figures."""
    keys = {DEVICE_ATTR: "device_assignment", "device_name": "device_name", "device_memory": "memory"}
    return {attr: payload[key] for attr, key in keys.items() if payload.get(key)}


def memory_settings(cfg: StudyConfig) -> dict[str, Any]:
    """The settings of a study that decide how much memory its trials take on a GPU."""
    return {"resources.gpus": cfg.resources.gpus, "trial.batch_size": cfg.trial.batch_size,
            "trial.eval_batch_size": cfg.trial.eval_batch_size, "trial.amp": cfg.trial.amp}


def planning_trials(trials: list[FrozenTrial], max_retries: int,
                    settings: dict[str, Any] | None = None) -> list[FrozenTrial]:
    """The stored trials as the sampler's plan reads them: a failure that running again cannot fix
    (``retry`` False: out of memory, a CUDA error) counts as every retry spent, so the plan gives
    that training up at once instead of failing it ``max_retries`` more times; unless it failed
    with other memory ``settings`` than the study's now (a study resumed with a larger share of the
    GPU or a smaller eval batch tries it again)."""
    out: list[FrozenTrial] = []
    for t in trials:
        spent = (t.state == TrialState.FAIL and t.user_attrs.get(NO_RETRY_ATTR) is False
                 and (settings is None or t.user_attrs.get(FAILED_WITH_ATTR, settings) == settings))
        out.extend([t] * (max_retries + 1 if spent else 1))
    return out


# ---------------------------------------------------------------------------------------------
# Reuse of a twin's result


def copy_twin(study: optuna.Study, plan: Plan, distributions: dict[str, BaseDistribution]) -> None:
    """Store ``plan.job`` in ``study`` as COMPLETE with the result of the completed trial
    ``plan.reuse`` (of this study or of its baselines study), which trained the same model with
    the same seed (full fine-tuning is TTL at the last cut)."""
    source = plan.reuse
    job = plan.job
    twin = TrialRecord.from_trial(source)
    params = {"strategy": job.strategy, "cut": job.cut, "repeat": job.repeat, "fold": job.fold}
    copy = replace(twin, part="", strategy=job.strategy, phase=job.phase, reused_from=trial_ref(source),
                   duration_s=0.0, train_time_s=0.0, ray_trial_id=None, driver_duration_s=None)
    study.add_trial(optuna.trial.create_trial(
        params={k: v for k, v in params.items() if k in distributions}, distributions=distributions,
        value=source.value, user_attrs=copy.to_attrs(), intermediate_values=dict(source.intermediate_values),
        state=TrialState.COMPLETE, system_attrs=copied_system_attrs(source),
    ))
    log.info("%s cut %d seed %s: the same model as trial %s (%s); its result is stored, not trained again",
             job.strategy, job.cut, copy.seed, trial_ref(source), twin.strategy)


# ---------------------------------------------------------------------------------------------
# The searcher


@dataclass
class LiveTrial:
    """A trial the driver asked Optuna for and handed to Ray Tune."""

    trial: optuna.Trial
    """The Optuna trial (RUNNING until the driver tells its outcome), of the study or of its
    baselines study."""
    ref: int | str
    """How logs and messages name it: its number, or ``baselines:N``."""
    started: float
    """time.time() when it was handed to Ray Tune."""
    reported: set[int] = field(default_factory=set)
    """Epochs whose validation metric is already stored as an intermediate value."""


class StudySearcher(Searcher):
    """Ray Tune's search algorithm for one study: the sampler's plan in, stored trials out.

    Everything it decides comes from the study database; ``save``/``restore`` keep nothing, so a
    resumed study starts a fresh searcher on the same database.
    """

    def __init__(self, study: optuna.Study, sampler, cfg: StudyConfig, artifacts: Path | None,
                 progress: ProgressCallback | None = None, lease=None) -> None:
        super().__init__()
        self.lease = lease
        self.fatal: TTLSearchError | None = None
        """Set when the study must stop: Tune then stops every trial (see :class:`Halt`) and the
        driver raises it. Nothing more is written to the study from then on."""
        storage = getattr(study, "_storage", None)
        if hasattr(storage, "on_wait"):  # the driver's RetryingStorage: say on the progress line that it waits
            storage.on_wait = self._database_notice
        self.study = study
        self.baselines = baselines_study(study, sampler)
        """The study's baselines study, where baseline trainings are stored (None when the study
        keeps its baselines itself: one from before the split, or a baselines-only study)."""
        self.sampler = sampler
        self.cfg = cfg
        self.artifacts = artifacts
        self.progress = progress
        self.candidates = list(getattr(sampler, "study_candidates", sampler.candidates))  # baselines' cuts too
        self.by_index = {c.index: c for c in self.candidates}
        split = self.baselines is not None
        self.spaces = {part: part_space(cfg, self.candidates, part, split) for part in (SEARCH_STRATEGY, "baseline")}
        """(strategies, cuts) of the study and of the baselines study (the same with one study)."""
        self.tune_mode = "max" if cfg.resolved_direction == "maximize" else "min"
        self.live: dict[str, LiveTrial] = {}
        self.counts = {"complete": 0, "failed": 0, "pruned": 0}
        self.last_progress: tuple = ()
        self.waiting = False
        """The plan said wait (for running trials, e.g. at a stage barrier): it cannot say anything
        else until one of them ends, so Tune's frequent asks are answered without reading the
        study again (hundreds of reads at one barrier, seconds of the driver's CPU)."""

    # -- stopping -----------------------------------------------------------------------------------
    def fail(self, error: TTLSearchError) -> None:
        """Stop the study with ``error`` (the first fatal error wins)."""
        if self.fatal is None:
            self.fatal = error
            log.error("%s", error)

    def halted(self) -> bool:
        """Whether the study must stop (a fatal error, or the lease was taken over)."""
        if self.fatal is None and self.lease is not None and self.lease.lost.is_set():
            self.fail(StudyError(self.lease.lost_reason))
        return self.fatal is not None

    def _check_lease(self) -> None:
        """Renew the lease now, before a result is stored: a driver taken over since its last
        heartbeat learns it here instead of writing into the new driver's study."""
        if self.lease is not None and not self.lease.lost.is_set():
            try:
                self.lease.renew()
            except Exception as exc:  # noqa: BLE001 - a database outage: the storage's own retries handle it
                log.debug("lease not renewed before storing a result: %s", exc)

    def stop_unfinished(self) -> None:
        """After Tune stopped every trial of a halted study (it does not tell the searcher): store
        the trials that were running as FAIL where the study may still be written, else leave
        them RUNNING for ``status`` to call orphaned and ``resume`` to retrain."""
        for trial_id in list(self.live):
            live = self.live.pop(trial_id)
            if self._may_write():
                self._store_failure(live, f"stopped unfinished when the study stopped: {self.fatal}")

    def _may_write(self) -> bool:
        """Whether a halted study may still store trials: not when the database is gone, nor when
        another driver took the study over."""
        lost = self.lease is not None and self.lease.lost.is_set()
        return not lost and not isinstance(self.fatal, StorageUnavailableError)

    def _database_notice(self, line: str | None) -> None:
        if self.progress is not None:
            self.progress({"notice": line, **self.counts, "running": len(self.live)})

    # -- Tune asks for the next trial ------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict | None:
        if self.halted():
            return Searcher.FINISHED
        if self.waiting:
            return None
        try:
            return self._suggest(trial_id)
        except StorageUnavailableError as exc:
            self.fail(exc)
            return Searcher.FINISHED

    def _trials(self) -> list:
        return planning_trials(study_trials(self.study, self.baselines or False), self.cfg.search.max_retries,
                               memory_settings(self.cfg))

    def _part(self, job: Job) -> tuple[optuna.Study, list[str], list[int]]:
        """The study that stores ``job``'s trial, and the (strategies, cuts) its trials have."""
        part = SEARCH_STRATEGY if job.strategy == SEARCH_STRATEGY else "baseline"
        study = self.study if part == SEARCH_STRATEGY or self.baselines is None else self.baselines
        return (study, *self.spaces[part])

    def _suggest(self, trial_id: str) -> dict | None:
        s = self.cfg.search
        plan = self.sampler.plan(self._trials())
        while plan.reuse is not None:  # a twin already trained this model: store its copy
            study, strategies, cuts = self._part(plan.job)
            copy_twin(study, plan, job_distributions(self.candidates, strategies, self.cfg.seed_count,
                                                     self.cfg.selection.folds, cuts))
            self.counts["complete"] += 1
            plan = self.sampler.plan(self._trials())
        self._progress(plan)
        if plan.action == "wait":
            self.waiting = bool(self.live)  # nothing running to wait for: ask the plan again next time
            return None
        if plan.action == "finished":
            return Searcher.FINISHED
        study, strategies, cuts = self._part(plan.job)
        self.sampler.expect(plan.job)
        trial = study.ask()
        params = suggest_params(trial, self.candidates, strategies, self.cfg.seed_count,
                                s.tune_lr and study is self.study, self.cfg.selection.folds, cuts)
        config = self._launch(trial_id, trial, params, self.by_index[params["cut"]], plan.job.phase,
                              part="" if study is self.study else "baselines")
        self._progress(plan)  # the new trial counts as running from now on
        return config

    def _launch(self, trial_id: str, trial: optuna.Trial, params: dict, cut: CutCandidate, phase: str,
                part: str = "") -> dict:
        cfg = self.cfg
        seed = cfg.search.seed + params["repeat"]
        trial_dict = to_dict(cfg.trial)
        trial_dict.update(cut=cut.index, strategy=params["strategy"], seed=seed)
        trial_dict["latency_repeats"] = 0  # timed in the study's quiet latency pass, not beside other trials
        trial_dict["data"]["fold"] = params.get("fold", 0)
        for key in ("lr", "weight_decay"):
            if key in params:
                trial_dict[key] = params[key]
        launched = TrialRecord(strategy=params["strategy"], cut=cut.index, repeat=params["repeat"],
                               fold=params.get("fold"), cut_name=cut.name,
                               stage=cut.stage, phase=phase, seed=seed, ray_trial_id=trial_id)
        for key, value in launched.to_attrs().items():
            trial.set_user_attr(key, value)
        ref = part_ref(part, trial.number)
        self.live[trial_id] = LiveTrial(trial, ref, time.time())
        file = f"{part}-trial-{trial.number}.pt" if part else f"trial-{trial.number}.pt"
        checkpoint = str(self.artifacts / cfg.name / file) if self.artifacts else None
        log.info("trial %s: %s cut %d (%s, stage %d, %s), seed %d", ref, params["strategy"], cut.index,
                 cut.name, cut.stage, phase, seed)
        return {"trial": trial_dict, "cpus": cfg.resources.cpus, "gpus": cfg.resources.gpus, "mode": self.tune_mode,
                "number": ref, "checkpoint_path": checkpoint}

    # -- Tune reports ------------------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        live = self.live.get(trial_id)
        if live is None or self.halted():
            return
        if result.get("final"):
            # Stored now, not when Tune reports the trial complete a step later: the plan's next
            # trials (stage 2, after a barrier) are then asked for while this trial's worker is
            # still alive, and Tune hands it to one of them instead of starting a new worker.
            self._finish(trial_id, result, error=False)
            return
        try:
            self._report(live, int(result["epoch"]), result.get("val_raw"))
        except StorageUnavailableError as exc:
            self.fail(exc)

    def _report(self, live: LiveTrial, epoch: int, value: float | None) -> None:
        if value is not None and math.isfinite(value) and epoch not in live.reported:
            live.trial.report(float(value), epoch)
            live.reported.add(epoch)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._finish(trial_id, result, error)  # nothing to do when its final result was stored

    def _finish(self, trial_id: str, result: dict | None, error: bool) -> None:
        """Store the outcome of a live trial (once: it is no longer live afterwards)."""
        live = self.live.pop(trial_id, None)
        if live is None:
            return
        self.waiting = False  # the plan may go on once this trial is stored
        self._check_lease()
        if self.halted():  # Tune stopped the trial because the study stops
            self.live[trial_id] = live
            self.stop_unfinished()
            return
        try:
            self._store(live, trial_outcome(result, error, self.cfg.metric))
        except StorageUnavailableError as exc:
            self.fail(exc)
        except Exception as exc:  # noqa: BLE001 - never leave the trial RUNNING: the plan would wait for it forever
            log.exception("trial %s: its result could not be stored", live.ref)
            self._store_failure(live, f"the driver could not store this trial's result: {type(exc).__name__}: {exc}")
        self._progress(None)

    def _store_failure(self, live: LiveTrial, reason: str) -> None:
        """End a trial whose result could not be stored as FAIL with ``reason``; stop the study
        when even that cannot be stored."""
        try:
            for key, value in TrialRecord(fail_reason=reason).measured_attrs().items():
                live.trial.set_user_attr(key, value)
            live.trial.study.tell(live.trial, None, state=TrialState.FAIL)
            self.counts["failed"] += 1
        except Exception as exc:  # noqa: BLE001
            self.fail(exc if isinstance(exc, StorageUnavailableError) else StudyError(
                f"trial {live.ref} could not be stored ({reason}; then {type(exc).__name__}: {exc}); the "
                f"study stops: `ttl-search resume {self.cfg.name}` retrains it"))

    def _store(self, live: LiveTrial, outcome: Outcome) -> None:
        """Write ``outcome`` to the study: intermediate values, attributes, checkpoint, state. A
        checkpoint that cannot be stored fails the trial and, as the infrastructure's fault, stops
        the study."""
        trial = live.trial
        for epoch, value in outcome.history:
            self._report(live, epoch, value)
        record = outcome.record
        record.driver_duration_s = round(time.time() - live.started, 3)
        state, value, infrastructure = outcome.state, outcome.value, outcome.infrastructure
        if record.checkpoint:
            try:
                record.checkpoint_artifact_id = self._attach_checkpoint(live, record.checkpoint,
                                                                        record.node_id or "?")
            except OSError as exc:
                infrastructure = record.fail_reason = (
                    f"cannot store the checkpoint in the artifact folder {self.artifacts}: {os_reason(exc)}")
                state, value = TrialState.FAIL, None
        extra = outcome.extra if outcome.retry else {**outcome.extra, FAILED_WITH_ATTR: memory_settings(self.cfg)}
        for key, attr in {**record.measured_attrs(), **extra}.items():
            trial.set_user_attr(key, attr)
        if outcome.predictions and state == TrialState.COMPLETE:
            set_trial_system_attr(trial, PREDICTIONS_ATTR, outcome.predictions)
        trial.study.tell(trial, value, state=state)
        key = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}[state]
        self.counts[key] += 1
        on = f" on {outcome.where}" if outcome.where else ""
        if state == TrialState.COMPLETE:
            log.info("trial %s complete%s: val %s %.4f", live.ref, on, self.cfg.metric, value)
        elif state == TrialState.PRUNED:
            log.info("trial %s stopped early%s (%s)", live.ref, on, record.note)
        else:
            log.warning("trial %s failed%s: %s", live.ref, on, record.note)
        if infrastructure:
            self.fail(StudyError(
                f"{infrastructure}; the study stops (trial {live.ref} is stored as failed). Free space or set "
                f"another folder (--set artifacts=...), then `ttl-search resume {self.cfg.name}`"))

    def _attach_checkpoint(self, live: LiveTrial, checkpoint: str, node_id: str) -> str | None:
        """Register the checkpoint in the study's artifact store; its artifact id, or None when
        there is no store or the file is not visible from the driver."""
        if self.artifacts is None:
            return None
        if Path(checkpoint).is_file():
            return attach_artifact(self.artifacts, live.trial, Path(checkpoint), "application/octet-stream")
        log.warning("trial %s: checkpoint %s was written on node %s and is not visible here; put "
                    "`artifacts` on a filesystem every node shares to attach checkpoints",
                    live.ref, checkpoint, node_id)
        return None

    def _progress(self, plan: Plan | None) -> None:
        # Tune asks for suggestions many times a second at a barrier: report changes only.
        state = (plan.phase if plan else None, plan.expected_total if plan else None,
                 tuple(self.counts.values()), len(self.live))
        if self.progress is not None and state != self.last_progress:
            self.last_progress = state
            self.progress({"plan": plan, **self.counts, "running": len(self.live)})

    def __getstate__(self) -> dict:  # Tune pickles its config once; the lease (a thread) stays here
        return {**self.__dict__, "lease": None}

    def save(self, checkpoint_path: str) -> None:  # state lives in the database
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass


class Halt(Stopper):
    """Ray Tune's stopper for a study that must stop: every trial is stopped at once when the
    searcher hit a fatal error (the database stayed unreachable, the artifact folder is full) or
    this driver's lease was taken over."""

    def __init__(self, searcher: StudySearcher) -> None:
        self.searcher = searcher

    def __getstate__(self) -> dict:  # Tune pickles its run config; the searcher stays with the driver
        return {"searcher": None}

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.searcher is not None and self.searcher.halted()
