"""Running a study: create it and search on Ray (``run_study``), continue it after a crash
(``resume_study``). Reading one needs none of this: see :mod:`ttl_search.results`."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import optuna

from .. import __version__
from ..config import from_dict, merge, to_dict
from ..data import ensure_data, load_data
from ..errors import ConfigError, StudyError, TTLSearchError
from ..lease import DriverLease, Lease
from ..results.dashboard import ANSWER_ATTR, ANSWER_PENDING, name_metric, publish_answer
from ..results import (CANDIDATES_ATTR, CONFIG_ATTR, artifacts_dir, chosen_cut, stored_candidates, stored_config,
                       stored_probe)
from .cluster import ProgressCallback, ray_cluster, run_search
from .latency import budget_candidates, cut_latency_table, latency_phase
from .probe import probe_phase, store_answer_probe
from ..search.record import SEARCH_STRATEGY
from ..search.budget import LATENCY_TABLE_ATTR
from ..search.samplers import CutCandidate
from ..storage import (BASELINES_ATTR, BASELINES_OF_ATTR, baselines_name, baselines_study, driver_storage,
                       load_study, mask_url, open_storage, reconcile_running, storage_url, study_names)
from ..search.study import (StudyConfig, baseline_cut, cut_candidates, make_sampler, needs_probe, resolve_paths,
                            splits_baselines, upgrade_stored_config)
from ..train.trial import prepare_trial

log = logging.getLogger(__name__)

EXECUTION_KEYS = ("concurrency", "resources.", "ray_address", "storage", "scheduler.", "artifacts",
                  "trial.data.root", "trial.data.path", "trial.data.download", "trial.device", "trial.amp",
                  "trial.eval_batch_size", "trial.latency_repeats", "trial.compile", "trial.deterministic", "driver.")
"""Keys (or key prefixes) ``resume`` may change: where and how trials run, not what they train."""


def run_study(cfg: StudyConfig, progress: ProgressCallback | None = None) -> optuna.Study:
    """Create the study ``cfg`` describes and run it to the end."""
    url = storage_url(cfg.storage)
    rdb = open_storage(url)
    _check_free(cfg, rdb, url)
    resolve_paths(cfg)
    candidates = budget_candidates(cfg, cut_candidates(cfg))  # a budget no cut meets fails here
    sampler = make_sampler(cfg, candidates)  # validates cuts and baselines before anything is stored
    preflight(cfg, candidates)

    def creating(held: Lease) -> str:
        return (f"study {cfg.name!r} is being created by {held.describe()}; continue it later with "
                f"`ttl-search resume {cfg.name}` or choose another name (--set name=...)")

    with _driver_lease(rdb, cfg, force=False, refuse=creating) as (lease, _), ray_cluster(cfg) as local:
        # a cluster that cannot run the trials fails before the study exists
        candidates, latency = _latency_budget(cfg, candidates, remote=not local)
        sampler = make_sampler(cfg, candidates) if latency is not None else sampler
        study = _create_study(cfg, rdb, url, sampler, candidates, latency)
        sampler = _probe_first(study, cfg, sampler, candidates, artifacts_dir(cfg, url), lease)
        run_search(study, sampler, cfg, artifacts_dir(cfg, url), progress, lease)
        _latency(study, cfg, lease, remote=not local)
        _publish(study, cfg, lease, artifacts_dir(cfg, url))
    return study


def _latency_budget(cfg: StudyConfig, candidates: Sequence[CutCandidate], remote: bool,
                    progress: Callable[[int, int], None] | None = None
                    ) -> tuple[list[CutCandidate], dict[str, Any] | None]:
    """With a latency budget: every cut's latency before training (read from the study's table, or
    measured here when Ray is local, else on a Ray worker) and the candidates marked with it; a
    budget no cut meets fails here, before the study exists. Without one: as they are, None."""
    latency = cut_latency_table(cfg, candidates, remote, progress)
    if latency is None:
        return list(candidates), None
    return budget_candidates(cfg, candidates, latency), latency


def _latency(study: optuna.Study, cfg: StudyConfig, lease: DriverLease, remote: bool) -> None:
    """The quiet latency pass after the search: here when Ray is local (the trials' machine, and
    no worker process to start), else on a Ray worker. Its failure costs the study its latency
    figures (``ttl-search report --measure-latency`` measures them later), never the finished
    study. A driver taken over meanwhile stops."""
    try:
        latency_phase(study, cfg, remote=remote, lease=lease)
    except TTLSearchError as exc:
        lease.ensure_held()
        log.warning("the latency pass of study %s failed: %s; `ttl-search report %s --measure-latency` runs it "
                    "again", cfg.name, exc, cfg.name)


def _publish(study: optuna.Study, cfg: StudyConfig, lease: DriverLease, artifacts: Path | None = None) -> None:
    """Store the answer's model when it is a frozen probe that no trial holds yet (so that
    ``export`` writes it), and the answer where optuna-dashboard shows it; a failure there costs
    the dashboard its copy of the answer, never the finished study (``ttl-search best`` publishes
    it again). A driver taken over meanwhile stops without writing it."""
    lease.ensure_held()
    try:
        best = chosen_cut(study, cfg)
        if store_answer_probe(study, cfg, artifacts, best) is not None:
            best = None  # its trial is new: read the answer again
        publish_answer(study, cfg, best)
    except Exception as exc:  # noqa: BLE001 - the study is finished and stored; this is a view of it
        log.warning("the answer of study %s is not stored for the dashboard: %s", cfg.name, exc)


def _create_study(cfg: StudyConfig, rdb, url: str, sampler, candidates: Sequence[CutCandidate],
                  latency: dict[str, Any] | None = None) -> optuna.Study:
    """Create the study with its resolved config, cut candidates (with their budget marks) and the
    cuts' pre-training latency table, when it has one (the caller holds the lease)."""
    split = _check_free(cfg, rdb, url)  # a driver that held the name a moment ago may have created it
    storage = driver_storage(url, cfg.driver.storage_patience_s, cfg.name)
    try:
        # the baselines study first: a study that exists has its baselines study
        baselines = (optuna.create_study(study_name=baselines_name(cfg.name), storage=storage,
                                         direction=cfg.resolved_direction, sampler=sampler) if split else None)
        study = optuna.create_study(study_name=cfg.name, storage=storage, direction=cfg.resolved_direction,
                                    sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:  # another `run` created it a moment ago
        raise _exists(cfg.name, url) from None
    resolved = to_dict(cfg)
    resolved["storage"] = mask_url(url)
    study.set_user_attr(ANSWER_ATTR, ANSWER_PENDING)  # first: the dashboard's attribute table shows it first
    study.set_user_attr(CONFIG_ATTR, resolved)
    study.set_user_attr(CANDIDATES_ATTR, [asdict(c) for c in candidates])
    if latency is not None:
        study.set_user_attr(LATENCY_TABLE_ATTR, latency)
    study.set_user_attr("ttl_search_version", __version__)
    study.set_user_attr("backbone", cfg.trial.backbone)
    study.set_user_attr("dataset", cfg.trial.data.dataset)
    study.set_user_attr("search", cfg.search.method)
    study.set_user_attr("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    name_metric(study, cfg.metric)
    if baselines is not None:
        study.set_user_attr(BASELINES_ATTR, baselines.study_name)
        baselines.set_user_attr(BASELINES_OF_ATTR, cfg.name)
        for key in ("backbone", "dataset"):
            baselines.set_user_attr(key, study.user_attrs[key])
        baselines.set_user_attr("strategies", list(cfg.baselines) + (["probe"] if needs_probe(cfg) else []))
        name_metric(baselines, cfg.metric)
    log.info("study %s created in %s%s", cfg.name, mask_url(url),
             f", its baselines in study {baselines.study_name}" if baselines is not None else "")
    return study


def _probe_first(study: optuna.Study, cfg: StudyConfig, sampler, candidates: Sequence[CutCandidate],
                 artifacts, lease: DriverLease) -> Any:
    """Run the probe phase when the study has one (on a Ray worker, once: a stored table is
    reused); the sampler, rebuilt with the probe's ranking for a guided search."""
    if not needs_probe(cfg):
        return sampler
    table = probe_phase(study, cfg, artifacts, remote=True, lease=lease)
    sampler = make_sampler(cfg, candidates, table)
    study.sampler = sampler
    return sampler


def probe_study(cfg: StudyConfig, progress: Callable[[int, int], None] | None = None
                ) -> tuple[optuna.Study, dict[str, Any], bool]:
    """``ttl-search probe``: the study's probe table, computed here and stored when the study has
    none (the study is created first when it does not exist; ``resume`` then runs its search).
    Returns (study, table, whether it was computed now)."""
    url = storage_url(cfg.storage)
    rdb = open_storage(url)
    resolve_paths(cfg)
    if cfg.name in study_names(rdb):
        study = load_study(cfg.name, rdb)
        table = stored_probe(study)
        if table is not None:
            return study, table, False
        cfg = stored_config(study)  # the study's own settings, whatever the file says now
        cfg.storage = url
        resolve_paths(cfg)
        candidates, create = stored_candidates(study, cfg), False
    else:  # a study created to be probed keeps the probe: its best probe is a candidate model
        cfg = replace(cfg, probe=replace(cfg.probe, run=True))
        candidates, create = budget_candidates(cfg, cut_candidates(cfg)), True
    make_sampler(cfg, candidates)  # validates cuts and baselines before anything is stored
    preflight(cfg, candidates)
    with _driver_lease(rdb, cfg, force=False) as (lease, _):
        if create:
            candidates, latency = _latency_budget(cfg, candidates, remote=False)
            study = _create_study(cfg, rdb, url, make_sampler(cfg, candidates), candidates, latency)
        else:
            study = load_study(cfg.name, driver_storage(url, cfg.driver.storage_patience_s, cfg.name))
        table = probe_phase(study, cfg, artifacts_dir(cfg, url), remote=False, progress=progress, lease=lease)
    return study, table, True


def preflight(cfg: StudyConfig, candidates: Sequence[CutCandidate]) -> None:
    """Check once, in the driver and before anything is stored or trained, what every trial needs:
    the data is found, decodes and splits (a truncated or corrupt file fails here, not in nine
    trainings); the backbone's weights load; the model of every planned strategy builds at its
    cut (the cuts themselves were checked at the input size by :func:`cut_candidates`)."""
    ensure_data(cfg.trial.data)
    data = load_data(cfg.trial.data)
    models = [(SEARCH_STRATEGY, max(c.index for c in candidates))] if cfg.search.method != "none" else []
    models += [(b, baseline_cut(cfg, b, candidates)) for b in cfg.baselines]
    for strategy, cut in models:
        prepare_trial(replace(cfg.trial, strategy=strategy, cut=cut), data)
    log.info("checked the data (%d/%d/%d images), the weights and %d model(s) before the study starts",
             len(data.train), len(data.val), len(data.test), len(models))


@contextmanager
def _driver_lease(rdb, cfg: StudyConfig, force: bool, refuse: Callable[[Lease], str] | None = None
                  ) -> Iterator[tuple[DriverLease, Lease | None]]:
    """Hold the study's driver lease for the block: (the lease, the stale lease taken over)."""
    lease = DriverLease(rdb.engine, cfg.name, cfg.driver.heartbeat_s, cfg.driver.stale_after_s)
    previous = lease.acquire(force=force, refuse=refuse)
    try:
        yield lease, previous
    finally:
        lease.release()


def _check_free(cfg: StudyConfig, rdb, url: str) -> bool:
    """Refuse a study name in use (or whose baselines study's name is); whether the new study
    keeps its baselines in a baselines study."""
    names = study_names(rdb)
    if cfg.name in names:
        raise _exists(cfg.name, url)
    split = splits_baselines(cfg)
    if split and baselines_name(cfg.name) in names:
        raise StudyError(f"study {baselines_name(cfg.name)!r} already exists in {mask_url(url)}, and a study named "
                         f"{cfg.name!r} keeps its baselines there; delete it or choose another name (--set name=...)")
    return split


def _exists(name: str, url: str) -> StudyError:
    return StudyError(f"study {name!r} already exists in {mask_url(url)}; continue it with `ttl-search resume {name}` "
                      "or choose another name (--set name=...)")


def resume_study(name: str, storage: str | None = None, execution: dict[str, Any] | None = None,
                 progress: ProgressCallback | None = None, force: bool = False) -> optuna.Study:
    """Continue a study after a crash: RUNNING leftovers become FAIL (and are retrained), completed
    trainings are never repeated. ``execution`` may change how (not what) the study runs.

    A study whose driver is alive (fresh heartbeat) is refused; ``force`` takes it over anyway
    (for a driver known to be dead whose heartbeat is not stale yet)."""
    url = storage_url(storage)
    rdb = open_storage(url)
    probe = load_study(name, rdb)
    stored_config(probe)  # a study from elsewhere, or a baselines study: named in the error
    values = upgrade_stored_config(dict(probe.user_attrs.get(CONFIG_ATTR) or {}))
    if not values:
        raise StudyError(f"study {name!r} was not created by ttl-search (no stored config)")
    for key in _flat_keys(execution or {}):
        if not key.startswith(EXECUTION_KEYS):
            raise ConfigError(f"resume can change how a study runs, not what it trains: {key!r} is none of "
                              f"{', '.join(EXECUTION_KEYS)}")
    cfg = from_dict(StudyConfig, merge(values, execution or {}))
    cfg.storage = url
    resolve_paths(cfg)
    candidates = stored_candidates(probe, cfg)
    sampler = make_sampler(cfg, candidates)
    DriverLease(rdb.engine, cfg.name, cfg.driver.heartbeat_s, cfg.driver.stale_after_s).check_free(force)
    preflight(cfg, candidates)
    with _driver_lease(rdb, cfg, force) as (lease, previous), ray_cluster(cfg) as local:
        store = driver_storage(url, cfg.driver.storage_patience_s, cfg.name)
        study = load_study(name, store, sampler)
        driver = f" ({previous.describe()})" if previous else ""
        reason = (f"left RUNNING by a driver that stopped{driver}; resumed "
                  f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
        for part in (study, baselines_study(study)):
            if part is not None:
                reconcile_running(store, part, reason)
        sampler = _probe_first(study, cfg, sampler, candidates, artifacts_dir(cfg, url), lease)
        run_search(study, sampler, cfg, artifacts_dir(cfg, url), progress, lease)
        _latency(study, cfg, lease, remote=not local)
        _publish(study, cfg, lease, artifacts_dir(cfg, url))
    return study


def _flat_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


