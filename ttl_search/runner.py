"""Execution on Ray Tune: each training is a Ray Tune trial, the search is our own ``Searcher``.

The searcher keeps no state beyond the study database: ``suggest`` asks the sampler's plan
(which reads the stored trials), returns ``None`` at a stage barrier ("ask again later") and
``Searcher.FINISHED`` when the plan is done. A resume starts a fresh ``Tuner``; nothing of Tune's
own experiment state is reused. Workers only train and report; the driver (this module's
searcher) is the only writer of the database.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState

from .config import from_dict, to_dict
from .errors import ConfigError, StudyError, TTLSearchError
from .search import CutCandidate, Plan, job_distributions, suggest_params
from .storage import attach_artifact
from .study import StudyConfig, cut_candidates, trial_strategies

log = logging.getLogger(__name__)

VAL_KEY = "val_metric"
ProgressCallback = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------
# Worker side


def _finite(value: float, mode: str) -> float:
    if value is None or not math.isfinite(value):
        return -1e9 if mode == "max" else 1e9
    return float(value)


def trainable(config: dict[str, Any]) -> None:
    """A Ray Tune function trainable: one :func:`~ttl_search.training.run_trial`.

    Reports ``epoch`` and ``val_metric`` after every epoch (for schedulers and the dashboard's
    curves) and a final report with ``final=True`` and the whole result as JSON.
    """
    import ray
    from ray import tune

    from .training import TrialConfig, run_trial

    node_id = ray.get_runtime_context().get_node_id()
    started = time.time()
    mode = config["mode"]
    cfg = from_dict(TrialConfig, config["trial"])
    cfg.threads = max(1, int(config["cpus"]))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        # The last epoch is reported once, with the final result: a scheduler that stops trials
        # at max_t must not cut a trial off between its last epoch and its test evaluation.
        if epoch >= cfg.max_epochs:
            return
        tune.report({"epoch": epoch, VAL_KEY: _finite(metrics[cfg.metric], mode), "val_raw": metrics[cfg.metric],
                     "val_loss": metrics["loss"], "node_id": node_id})

    try:
        result = run_trial(cfg, on_epoch=on_epoch, keep_state=bool(config.get("checkpoint_path")))
        payload = result.to_dict()
        if result.state_dict is not None and result.status == "complete":
            path = Path(config["checkpoint_path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            import torch

            torch.save(result.state_dict, path)
            payload["checkpoint"] = str(path)
    except TTLSearchError as exc:
        payload = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "epochs": 0}
    payload["node_id"] = node_id
    payload["worker_duration_s"] = round(time.time() - started, 3)
    value = payload.get("val", {}).get(cfg.metric) if payload.get("status") == "complete" else None
    tune.report({"final": True, "epoch": max(1, payload.get("epochs", 0)), VAL_KEY: _finite(value, mode),
                 "node_id": node_id, "payload": json.dumps(payload)})


# ---------------------------------------------------------------------------------------------
# Driver side


def trial_user_attrs(payload: dict[str, Any]) -> dict[str, Any]:
    """Flat user attributes optuna-dashboard shows for a finished trial."""
    attrs: dict[str, Any] = {}
    for split in ("val", "test"):
        for name, value in (payload.get(split) or {}).items():
            attrs[f"{split}_{name}"] = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    latency = payload.get("latency_ms") or {}
    full = payload.get("full") or {}
    attrs.update({
        "params": payload.get("params"),
        "trainable_params": payload.get("trainable_params"),
        "macs": payload.get("macs"),
        "latency_batch1_ms": latency.get("batch1"),
        "latency_batch64_ms": latency.get("batch64"),
        "latency_device": latency.get("device"),
        "full_params": full.get("params"),
        "full_macs": full.get("macs"),
        "full_latency_batch1_ms": (full.get("latency_ms") or {}).get("batch1"),
        "epochs": payload.get("epochs"),
        "best_epoch": payload.get("best_epoch"),
        "train_time_s": payload.get("train_time_s"),
        "node_id": payload.get("node_id"),
        "duration_s": payload.get("worker_duration_s"),
        "device": payload.get("device"),
        "input_size": payload.get("input_size"),
        "dataset_md5": (payload.get("data") or {}).get("md5"),
    })
    if payload.get("checkpoint"):
        attrs["checkpoint"] = payload["checkpoint"]
    return {k: v for k, v in attrs.items() if v is not None}


REUSE_DROPPED_ATTRS = ("ray_trial_id", "driver_duration_s")
"""Attributes of a twin that describe its own run, not the model, and are not copied."""


def copy_twin(study: optuna.Study, plan: Plan, distributions: dict[str, BaseDistribution]) -> None:
    """Store ``plan.job`` as COMPLETE with the result of the completed trial ``plan.reuse``, which
    trained the same model with the same seed (full fine-tuning is TTL at the last cut)."""
    source = next(t for t in study.get_trials(deepcopy=False) if t.number == plan.reuse)
    job = plan.job
    attrs = {k: v for k, v in source.user_attrs.items() if k not in REUSE_DROPPED_ATTRS}
    attrs.update(strategy=job.strategy, phase=job.phase, reused_from=source.number, duration_s=0.0,
                 train_time_s=0.0)
    study.add_trial(optuna.trial.create_trial(
        params={"strategy": job.strategy, "cut": job.cut, "repeat": job.repeat}, distributions=distributions,
        value=source.value, user_attrs=attrs, intermediate_values=dict(source.intermediate_values),
        state=TrialState.COMPLETE,
    ))
    log.info("%s cut %d seed %s: the same model as trial %d (%s); its result is stored, not trained again",
             job.strategy, job.cut, attrs.get("seed"), source.number, source.user_attrs.get("strategy"))


@dataclass
class LiveTrial:
    """A trial the driver asked Optuna for and handed to Ray Tune."""

    trial: optuna.Trial
    """The Optuna trial (RUNNING until the driver tells its outcome)."""
    started: float
    """time.time() when it was handed to Ray Tune."""
    reported: set[int] = field(default_factory=set)
    """Epochs whose validation metric is already stored as an intermediate value."""


def make_searcher(study: optuna.Study, sampler, cfg: StudyConfig, artifacts: Path | None,
                  progress: ProgressCallback | None = None):
    """The Ray Tune ``Searcher`` of a study (built lazily so importing this module needs no Ray)."""
    from ray.tune.search import Searcher

    candidates = cut_candidates(cfg)
    by_index = {c.index: c for c in candidates}
    strategies = trial_strategies(cfg)
    distributions = job_distributions(candidates, strategies, cfg.search.repeats)
    mode = "max" if cfg.resolved_direction == "maximize" else "min"

    class _Searcher(Searcher):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[str, LiveTrial] = {}
            self.counts = {"complete": 0, "failed": 0, "pruned": 0}
            self.last_progress: tuple = ()

        def suggest(self, trial_id: str) -> dict | None:
            plan = sampler.plan(study.get_trials(deepcopy=False))
            while plan.reuse is not None:  # a twin already trained this model: store its copy
                copy_twin(study, plan, distributions)
                self.counts["complete"] += 1
                plan = sampler.plan(study.get_trials(deepcopy=False))
            self._progress(plan)
            if plan.action == "wait":
                return None
            if plan.action == "finished":
                return Searcher.FINISHED
            trial = study.ask()
            params = suggest_params(trial, candidates, strategies, cfg.search.repeats, cfg.search.tune_lr)
            config = self._launch(trial_id, trial, params, by_index[params["cut"]], sampler.phase_of(trial.number))
            self._progress(plan)  # the new trial counts as running from now on
            return config

        def _launch(self, trial_id: str, trial: optuna.Trial, params: dict, cut: CutCandidate, phase: str) -> dict:
            seed = cfg.search.seed + params["repeat"]
            trial_dict = to_dict(cfg.trial)
            trial_dict.update(cut=cut.index, strategy=params["strategy"], seed=seed)
            for key in ("lr", "weight_decay"):
                if key in params:
                    trial_dict[key] = params[key]
            for key, value in {"cut": cut.index, "cut_name": cut.name, "stage": cut.stage, "phase": phase,
                               "strategy": params["strategy"], "seed": seed, "repeat": params["repeat"],
                               "ray_trial_id": trial_id}.items():
                trial.set_user_attr(key, value)
            self.live[trial_id] = LiveTrial(trial, time.time())
            checkpoint = str(artifacts / cfg.name / f"trial-{trial.number}.pt") if artifacts else None
            log.info("trial %d: %s cut %d (%s, stage %d, %s), seed %d", trial.number, params["strategy"], cut.index,
                     cut.name, cut.stage, phase, seed)
            return {"trial": trial_dict, "cpus": cfg.resources.cpus, "mode": mode, "number": trial.number,
                    "checkpoint_path": checkpoint}

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            live = self.live.get(trial_id)
            if live is None or result.get("final"):
                return
            self._report(live, int(result["epoch"]), result.get("val_raw"))

        def _report(self, live: LiveTrial, epoch: int, value: float | None) -> None:
            if value is not None and math.isfinite(value) and epoch not in live.reported:
                live.trial.report(float(value), epoch)
                live.reported.add(epoch)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            live = self.live.pop(trial_id, None)
            if live is None:
                return
            trial = live.trial
            trial.set_user_attr("driver_duration_s", round(time.time() - live.started, 3))
            if error or result is None:
                self._fail(trial, "the worker failed: its process was killed or crashed, or its node died "
                                  "(see the Ray logs)")
            elif result.get("final"):
                payload = json.loads(result["payload"])
                for epoch in payload.get("history", []):
                    self._report(live, int(epoch["epoch"]), epoch.get(cfg.metric))
                self._finish(trial, payload)
            else:
                epochs = int(result.get("epoch", 0))
                trial.set_user_attr("epochs", epochs)
                trial.set_user_attr("node_id", result.get("node_id"))
                trial.set_user_attr("stopped_by", "scheduler")
                study.tell(trial, state=TrialState.PRUNED)
                self.counts["pruned"] += 1
                log.info("trial %d pruned by the scheduler after %d epochs", trial.number, epochs)
            self._progress(None)

        def _finish(self, trial: optuna.Trial, payload: dict) -> None:
            for key, value in trial_user_attrs(payload).items():
                trial.set_user_attr(key, value)
            if payload.get("checkpoint") and artifacts is not None:
                if Path(payload["checkpoint"]).is_file():
                    artifact_id = attach_artifact(artifacts, trial, Path(payload["checkpoint"]),
                                                  "application/octet-stream")
                    trial.set_user_attr("checkpoint_artifact_id", artifact_id)
                else:
                    log.warning("trial %d: checkpoint %s was written on node %s and is not visible here; put "
                                "`artifacts` on a filesystem every node shares to attach checkpoints",
                                trial.number, payload["checkpoint"], payload.get("node_id", "?"))
            status = payload.get("status")
            if status == "complete":
                value = payload["val"].get(cfg.metric)
                if value is None or not math.isfinite(value):
                    self._fail(trial, f"validation {cfg.metric} is undefined (single-class validation split?)")
                    return
                study.tell(trial, float(value))
                self.counts["complete"] += 1
                log.info("trial %d complete: val %s %.4f", trial.number, cfg.metric, value)
            elif status == "pruned":
                trial.set_user_attr("stopped_by", payload.get("reason", ""))
                study.tell(trial, state=TrialState.PRUNED)
                self.counts["pruned"] += 1
            else:
                self._fail(trial, payload.get("reason") or "failed")

        def _fail(self, trial: optuna.Trial, reason: str) -> None:
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
            self.counts["failed"] += 1
            log.warning("trial %d failed: %s", trial.number, reason)

        def _progress(self, plan) -> None:
            # Tune asks for suggestions many times a second at a barrier: report changes only.
            state = (plan.phase if plan else None, plan.expected_total if plan else None,
                     tuple(self.counts.values()), len(self.live))
            if progress is not None and state != self.last_progress:
                self.last_progress = state
                progress({"plan": plan, **self.counts, "running": len(self.live)})

        def save(self, checkpoint_path: str) -> None:  # state lives in the database
            pass

        def restore(self, checkpoint_path: str) -> None:
            pass

    return _Searcher()


def init_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``) or start a local Ray; True when started here."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = logging.getLogger("ttl_search").getEffectiveLevel() > logging.INFO
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING if quiet else logging.INFO)
        except Exception as exc:  # noqa: BLE001
            raise StudyError(
                f"cannot join the Ray cluster at {address}: {type(exc).__name__}: {exc}. A Ray driver must run on a "
                f"node of the cluster: run ttl-search on the head, or first join with "
                f"`ray start --address={address} --num-cpus=0 --num-gpus=0`"
            ) from exc
        return True
    # Ray turns token authentication on for a new local cluster and announces it with a warning
    # that would land in the middle of our progress bar; the cluster is ours, so the note is not.
    with _quiet_logger(RAY_TOKEN_NOTICE_LOGGER):
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING if quiet else logging.INFO)
    return True


RAY_TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
"""The logger of Ray's "Token authentication is enabled for this Ray cluster" notice."""


@contextmanager
def _quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise ``name``'s level for the duration of the block."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def check_cluster_resources(cfg: StudyConfig) -> None:
    """Fail fast where Ray would wait forever: a trial asking for more than any cluster has."""
    import ray

    total = ray.cluster_resources()
    if cfg.resources.gpus > 0 and total.get("GPU", 0) < cfg.resources.gpus:
        raise ConfigError(f"resources.gpus={cfg.resources.gpus} but the Ray cluster has {total.get('GPU', 0):g} GPUs; "
                          "set resources.gpus=0 or join a cluster with GPUs (--ray-address)")
    if total.get("CPU", 0) < cfg.resources.cpus:
        raise ConfigError(f"resources.cpus={cfg.resources.cpus} but the Ray cluster has {total.get('CPU', 0):g} CPUs")


def run_search(study: optuna.Study, sampler, cfg: StudyConfig, artifacts: Path | None,
               progress: ProgressCallback | None = None) -> None:
    """Run the study's remaining trials on Ray Tune until the sampler's plan is finished."""
    # Tune's own console output (experiment tables, result paths) is not ours to show; our
    # progress comes through ``progress`` and the log.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tune_dir = Path(tempfile.mkdtemp(prefix="ttl-search-tune-"))
    try:
        mode = "max" if cfg.resolved_direction == "maximize" else "min"
        if cfg.scheduler.type == "asha":
            scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.trial.max_epochs,
                                      grace_period=cfg.scheduler.grace_period,
                                      reduction_factor=cfg.scheduler.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        searcher = make_searcher(study, sampler, cfg, artifacts, progress)
        resources = {"cpu": cfg.resources.cpus, "gpu": cfg.resources.gpus}
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            tune_config=tune.TuneConfig(metric=VAL_KEY, mode=mode, search_alg=searcher, scheduler=scheduler,
                                        num_samples=-1, max_concurrent_trials=cfg.concurrency,
                                        trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=tune.RunConfig(name=f"{cfg.name}-{int(time.time())}", storage_path=str(tune_dir), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        tuner.fit()
    finally:
        shutil.rmtree(tune_dir, ignore_errors=True)


@contextmanager
def ray_cluster(cfg: StudyConfig) -> Iterator[None]:
    """Join (or start) Ray and check it can run the study's trials, before anything is stored;
    shut Ray down afterwards when it was started here."""
    started_here = init_ray(cfg.ray_address)
    try:
        check_cluster_resources(cfg)
        yield
    finally:
        if started_here:
            import ray

            ray.shutdown()
