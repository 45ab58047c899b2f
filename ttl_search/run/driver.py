"""Running a study: create it and search on Ray (``run_study``), continue it after a crash
(``resume_study``). Reading one needs none of this: see :mod:`ttl_search.results`."""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import optuna

from .. import __version__
from ..config import from_dict, merge, to_dict
from ..data import ensure_data
from ..errors import ConfigError, StudyError
from ..results import CANDIDATES_ATTR, CONFIG_ATTR, artifacts_dir, stored_candidates
from .cluster import ProgressCallback, ray_cluster, run_search
from ..storage import load_study, mask_url, open_storage, reconcile_running, storage_url, study_names
from ..search.study import StudyConfig, cut_candidates, make_sampler, resolve_paths, upgrade_stored_config

log = logging.getLogger(__name__)

EXECUTION_KEYS = ("concurrency", "resources.", "ray_address", "storage", "scheduler.", "artifacts",
                  "trial.data.root", "trial.data.path", "trial.data.download", "trial.device", "trial.amp",
                  "trial.eval_batch_size", "trial.latency_repeats")
"""Keys (or key prefixes) ``resume`` may change: where and how trials run, not what they train."""


def run_study(cfg: StudyConfig, progress: ProgressCallback | None = None) -> optuna.Study:
    """Create the study ``cfg`` describes and run it to the end."""
    url = storage_url(cfg.storage)
    storage = open_storage(url)
    if cfg.name in study_names(storage):
        raise _exists(cfg.name, url)
    resolve_paths(cfg)
    candidates = cut_candidates(cfg)
    sampler = make_sampler(cfg, candidates)  # validates cuts and baselines before anything is stored
    ensure_data(cfg.trial.data)
    with ray_cluster(cfg):  # a cluster that cannot run the trials fails before the study exists
        try:
            study = optuna.create_study(study_name=cfg.name, storage=storage, direction=cfg.resolved_direction,
                                        sampler=sampler)
        except optuna.exceptions.DuplicatedStudyError:  # another `run` created it a moment ago
            raise _exists(cfg.name, url) from None
        resolved = to_dict(cfg)
        resolved["storage"] = mask_url(url)
        study.set_user_attr(CONFIG_ATTR, resolved)
        study.set_user_attr(CANDIDATES_ATTR, [asdict(c) for c in candidates])
        study.set_user_attr("ttl_search_version", __version__)
        study.set_user_attr("backbone", cfg.trial.backbone)
        study.set_user_attr("dataset", cfg.trial.data.dataset)
        study.set_user_attr("search", cfg.search.method)
        study.set_user_attr("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        log.info("study %s created in %s", cfg.name, mask_url(url))
        run_search(study, sampler, cfg, artifacts_dir(cfg, url), progress)
    return study


def _exists(name: str, url: str) -> StudyError:
    return StudyError(f"study {name!r} already exists in {mask_url(url)}; continue it with `ttl-search resume {name}` "
                      "or choose another name (--set name=...)")


def resume_study(name: str, storage: str | None = None, execution: dict[str, Any] | None = None,
                 progress: ProgressCallback | None = None) -> optuna.Study:
    """Continue a study after a crash: RUNNING leftovers become FAIL (and are retrained), completed
    trainings are never repeated. ``execution`` may change how (not what) the study runs."""
    url = storage_url(storage)
    store = open_storage(url)
    probe = load_study(name, store)
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
    sampler = make_sampler(cfg, stored_candidates(probe, cfg))
    ensure_data(cfg.trial.data)
    study = load_study(name, store, sampler)
    with ray_cluster(cfg):
        reconcile_running(store, study, "left RUNNING by a driver that stopped; resumed "
                                 f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
        run_search(study, sampler, cfg, artifacts_dir(cfg, url), progress)
    return study


def _flat_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


