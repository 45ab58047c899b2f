"""Execution on Ray Tune: each training is a Ray Tune trial (:func:`trainable`, the worker side),
the search is our own ``Searcher`` (:mod:`ttl_search.searcher`, the driver side).

A resume starts a fresh ``Tuner``; nothing of Tune's own experiment state is reused. Workers only
train and report; the driver is the only writer of the database.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna

from ..config import from_dict
from ..errors import ConfigError, StudyError, TTLSearchError
from ..search.schedulers import SCHEDULERS
from ..search.study import StudyConfig

log = logging.getLogger(__name__)

VAL_KEY = "val_metric"
ProgressCallback = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------
# Worker side


def _finite(value: float, mode: str) -> float:
    if value is None or not math.isfinite(value):
        return -1e9 if mode == "max" else 1e9
    return float(value)


_DATA: dict[str, Any] = {}
"""The last dataset a worker process loaded, by its data config: Tune reuses the worker for the
study's next trial (``reuse_actors``), which then starts without reading and decoding it again."""


def _cached_data(cfg):
    """The trial's data, loaded once per worker process (the last dataset only, to bound memory)."""
    from ..config import to_dict
    from ..data import load_data

    key = json.dumps(to_dict(cfg.data), sort_keys=True)
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = load_data(cfg.data)
    return _DATA[key]


def trainable(config: dict[str, Any]) -> None:
    """A Ray Tune function trainable: one :func:`~ttl_search.training.run_trial`.

    The trial runs on the device Ray assigned it (:func:`~ttl_search.run.devices.claim_ray_device`:
    the CPU, with every GPU hidden, when it got none). Reports ``epoch`` and ``val_metric`` after
    every epoch (for schedulers and the dashboard's curves) and a final report with ``final=True``
    and the whole result as JSON, with the device assignment.
    """
    import ray
    from ray import tune

    from ..train.trial import TrialConfig, run_trial
    from .devices import claim_ray_device

    node_id = ray.get_runtime_context().get_node_id()
    started = time.time()
    mode = config["mode"]
    cfg = from_dict(TrialConfig, config["trial"])
    cfg.threads = max(1, int(config["cpus"]))
    gpus = float(config.get("gpus") or 0)
    assignment = None

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        # The last epoch is reported once, with the final result: a scheduler that stops trials
        # at max_t must not cut a trial off between its last epoch and its test evaluation.
        if epoch >= cfg.max_epochs:
            return
        tune.report({"epoch": epoch, VAL_KEY: _finite(metrics[cfg.metric], mode), "val_raw": metrics[cfg.metric],
                     "val_loss": metrics["loss"], "node_id": node_id})

    try:
        assignment = claim_ray_device(cfg.device)
        cfg.device = assignment.device
        result = run_trial(cfg, on_epoch=on_epoch, data=_cached_data(cfg), keep_state=bool(config.get("checkpoint_path")),
                           gpu_share=gpus if 0 < gpus < 1 else 1.0)
        payload = result.to_dict()
        if result.state_dict is not None and result.status == "complete":
            payload.update(save_checkpoint(result.state_dict, Path(config["checkpoint_path"])))
    except TTLSearchError as exc:
        payload = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "epochs": 0}
    payload["node_id"] = node_id
    if assignment is not None:
        payload["device_assignment"] = assignment.to_dict()
    payload["worker_duration_s"] = round(time.time() - started, 3)
    value = payload.get("val", {}).get(cfg.metric) if payload.get("status") == "complete" else None
    tune.report({"final": True, "epoch": max(1, payload.get("epochs", 0)), VAL_KEY: _finite(value, mode),
                 "node_id": node_id, "payload": json.dumps(payload)})


def save_checkpoint(state_dict: dict, path: Path) -> dict[str, Any]:
    """Write a trial's checkpoint; what the trial's payload says about it. A file that cannot be
    written (full disk, read-only folder) fails the trial with the folder and the reason, and
    marks the failure as the infrastructure's (``infrastructure``), which stops the study."""
    import torch

    buffer = io.BytesIO()  # serialised in memory: a failed write is then an OSError with its errno
    torch.save(state_dict, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getbuffer())
        return {"checkpoint": str(path)}
    except OSError as exc:
        path.unlink(missing_ok=True)
        reason = f"cannot write the checkpoint to the artifact folder {path.parent}: {os_reason(exc)}"
        return {"status": "failed", "reason": reason, "infrastructure": reason}


def os_reason(exc: BaseException) -> str:
    """``[Errno 28] No space left on device`` from an OSError, or from the OSError behind it."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__
    return f"[Errno {exc.errno}] {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else str(exc)


# ---------------------------------------------------------------------------------------------
# Driver side


def run_task(cfg: StudyConfig, fn: Callable[..., Any], *args: Any, what: str) -> Any:
    """``fn(*args)`` as one Ray task with a trial's resources (a phase of the study that runs on a
    worker: the probe, the latency pass). A ttl-search error in it (bad data, weights, config) is
    raised as it is; any other failure, or a worker that died, is a :class:`StudyError` naming
    ``what`` and how to run it again."""
    import ray

    task = ray.remote(num_cpus=cfg.resources.cpus, num_gpus=cfg.resources.gpus, max_retries=0)(fn)
    try:
        return ray.get(task.remote(*args))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, TTLSearchError):  # the user's to fix
            raise exc.cause from None
        raise StudyError(f"{what} failed on its Ray worker: {str(exc).strip().splitlines()[-1]}") from exc
    except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory)
        raise StudyError(f"{what}'s Ray worker died: {type(exc).__name__}: {exc}; "
                         f"`ttl-search resume {cfg.name}` runs it again") from exc


RAY_LOCAL, RAY_JOINED, RAY_ALREADY = "local", "joined", "already"
"""What :func:`init_ray` did: started a local Ray for this process, joined a running cluster, or
found Ray already initialized (by the caller, who also shuts it down)."""


def init_ray(address: str | None, num_cpus: int | None = None) -> str:
    """Join ``address`` (or ``$RAY_ADDRESS``) or start a local Ray; says which
    (:data:`RAY_LOCAL`, :data:`RAY_JOINED` or :data:`RAY_ALREADY`)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = logging.getLogger("ttl_search").getEffectiveLevel() > logging.INFO
    if ray.is_initialized():
        return RAY_ALREADY
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
        return RAY_JOINED
    # Ray turns token authentication on for a new local cluster and announces it with a warning
    # that would land in the middle of our progress bar; the cluster is ours, so the note is not.
    with _quiet_logger(RAY_TOKEN_NOTICE_LOGGER):
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING if quiet else logging.INFO)
    return RAY_LOCAL


def shutdown_ray(how: str) -> None:
    """Leave the Ray that :func:`init_ray` reached: disconnect from a joined cluster, stop a local
    one (quickly: see :func:`_stop_monitor`); a Ray found already initialized is the caller's."""
    import ray

    if how == RAY_LOCAL:
        _stop_monitor()
    if how in (RAY_LOCAL, RAY_JOINED):
        ray.shutdown()


def _stop_monitor() -> None:
    """Kill a local Ray's autoscaler monitor before ``ray.shutdown()``.

    ``ray.shutdown()`` stops the GCS first and then sends the monitor SIGTERM, whose handler tries
    to report its death to the GCS that is gone; Ray waits a full second for it before SIGKILL, a
    second of every study's wall time (about 1.4 s of shutdown becomes 0.4 s). The cluster was
    started for this study and is done, so nothing is lost. This uses Ray's private node handle;
    where a Ray version lacks it, shutdown just takes that second."""
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        if node is not None and ray_constants.PROCESS_TYPE_MONITOR in node.all_processes:
            node._kill_process_type(ray_constants.PROCESS_TYPE_MONITOR, allow_graceful=False, check_alive=False)
    except Exception as exc:  # noqa: BLE001 - only a faster shutdown is at stake
        log.debug("could not stop Ray's autoscaler monitor early: %s", exc)


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
               progress: ProgressCallback | None = None, lease=None) -> None:
    """Run the study's remaining trials on Ray Tune until the sampler's plan is finished.

    Raises the searcher's fatal error (after Tune stopped every trial), e.g. a database that
    stayed unreachable, a full artifact folder, or a lease another driver took over."""
    # Tune's own console output (experiment tables, result paths) is not ours to show; our
    # progress comes through ``progress`` and the log.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune

    from .searcher import Halt, StudySearcher

    tune_dir = Path(tempfile.mkdtemp(prefix="ttl-search-tune-"))
    try:
        mode = "max" if cfg.resolved_direction == "maximize" else "min"
        scheduler = SCHEDULERS[cfg.scheduler.type].build(cfg.scheduler, cfg.trial.max_epochs)
        searcher = StudySearcher(study, sampler, cfg, artifacts, progress, lease)
        resources = {"cpu": cfg.resources.cpus, "gpu": cfg.resources.gpus}
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            tune_config=tune.TuneConfig(metric=VAL_KEY, mode=mode, search_alg=searcher, scheduler=scheduler,
                                        num_samples=-1, max_concurrent_trials=cfg.concurrency, reuse_actors=True,
                                        trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=tune.RunConfig(name=f"{cfg.name}-{int(time.time())}", storage_path=str(tune_dir), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0), stop=Halt(searcher)),
        )
        tuner.fit()
        if searcher.fatal is not None:
            searcher.stop_unfinished()
            raise searcher.fatal
    finally:
        shutil.rmtree(tune_dir, ignore_errors=True)


@contextmanager
def ray_cluster(cfg: StudyConfig) -> Iterator[bool]:
    """Join (or start) Ray and check it can run the study's trials, before anything is stored;
    shut Ray down afterwards when it was started here. Yields whether Ray is local (started here
    for this study: the driver's machine is the trials' machine)."""
    from .devices import check_device_settings

    check_device_settings(cfg)  # before Ray starts: settings no trial can honour
    how = init_ray(cfg.ray_address)
    try:
        check_cluster_resources(cfg)
        yield how == RAY_LOCAL
    finally:
        shutdown_ray(how)
