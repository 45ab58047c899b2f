"""Typed library functions behind the CLI: run, resume, status, best, compare, dashboard."""

from __future__ import annotations

import logging
import math
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from . import __version__
from .config import from_dict, merge, to_dict
from .data import ensure_data
from .errors import ConfigError, StudyError
from .runner import ProgressCallback, ray_cluster, run_search
from .search import SEARCH_STRATEGY, trial_key
from .storage import artifact_store, load_study, open_storage, reconcile_running, sqlite_path, storage_url, study_names
from .training import TrialConfig
from .study import StudyConfig, make_sampler, resolve_paths

log = logging.getLogger(__name__)

CONFIG_ATTR = "config"
METRIC_NAMES = ("auroc", "auprc", "pr_auc_trapz", "accuracy", "balanced_accuracy", "f1_macro", "loss")
EXECUTION_KEYS = ("concurrency", "resources.", "ray_address", "storage", "scheduler.", "artifacts",
                  "trial.data.root", "trial.data.path", "trial.data.download", "trial.device", "trial.amp",
                  "trial.eval_batch_size", "trial.latency_repeats")
"""Keys (or key prefixes) ``resume`` may change: where and how trials run, not what they train."""


def default_artifacts_dir(url: str) -> Path:
    """``ttl-artifacts`` beside a SQLite database, else in the working directory."""
    db = sqlite_path(url)
    return (db.resolve().parent if db else Path.cwd()) / "ttl-artifacts"


def artifacts_dir(cfg: StudyConfig, url: str) -> Path:
    """Where checkpoints and plots go: ``cfg.artifacts`` or the default for the storage."""
    if cfg.artifacts:
        return Path(cfg.artifacts).expanduser().resolve()
    return default_artifacts_dir(url)


def stored_config(study: optuna.Study) -> StudyConfig:
    """The resolved config saved with the study."""
    values = study.user_attrs.get(CONFIG_ATTR)
    if not isinstance(values, dict):
        raise StudyError(f"study {study.study_name!r} was not created by ttl-search (no stored config)")
    return from_dict(StudyConfig, values)


def run_study(cfg: StudyConfig, progress: ProgressCallback | None = None) -> optuna.Study:
    """Create the study ``cfg`` describes and run it to the end."""
    url = storage_url(cfg.storage)
    storage = open_storage(url)
    if cfg.name in study_names(storage):
        raise StudyError(f"study {cfg.name!r} already exists in {url}; continue it with `ttl-search resume {cfg.name}` "
                         "or choose another name (--set name=...)")
    resolve_paths(cfg)
    sampler = make_sampler(cfg)  # validates cuts and baselines before anything is stored
    ensure_data(cfg.trial.data)
    with ray_cluster(cfg):  # a cluster that cannot run the trials fails before the study exists
        study = optuna.create_study(study_name=cfg.name, storage=storage, direction=cfg.resolved_direction,
                                    sampler=sampler)
        resolved = to_dict(cfg)
        resolved["storage"] = url
        study.set_user_attr(CONFIG_ATTR, resolved)
        study.set_user_attr("ttl_search_version", __version__)
        study.set_user_attr("backbone", cfg.trial.backbone)
        study.set_user_attr("dataset", cfg.trial.data.dataset)
        study.set_user_attr("search", cfg.search.strategy)
        study.set_user_attr("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        log.info("study %s created in %s", cfg.name, url)
        run_search(study, sampler, cfg, artifacts_dir(cfg, url), progress)
    return study


def resume_study(name: str, storage: str | None = None, execution: dict[str, Any] | None = None,
                 progress: ProgressCallback | None = None) -> optuna.Study:
    """Continue a study after a crash: RUNNING leftovers become FAIL (and are retrained), completed
    trainings are never repeated. ``execution`` may change how (not what) the study runs."""
    url = storage_url(storage)
    store = open_storage(url)
    probe = load_study(name, store)
    values = dict(probe.user_attrs.get(CONFIG_ATTR) or {})
    if not values:
        raise StudyError(f"study {name!r} was not created by ttl-search (no stored config)")
    for key in _flat_keys(execution or {}):
        if not key.startswith(EXECUTION_KEYS):
            raise ConfigError(f"resume can change how a study runs, not what it trains: {key!r} is none of "
                              f"{', '.join(EXECUTION_KEYS)}")
    cfg = from_dict(StudyConfig, merge(values, execution or {}))
    cfg.storage = url
    resolve_paths(cfg)
    sampler = make_sampler(cfg)
    ensure_data(cfg.trial.data)
    study = load_study(name, store, sampler)
    with ray_cluster(cfg):
        reconcile_running(study, "left RUNNING by a driver that stopped; resumed "
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


def open_study(name: str, storage: str | None = None) -> tuple[optuna.Study, StudyConfig]:
    study = load_study(name, open_storage(storage))
    return study, stored_config(study)


def trial_config(cfg: StudyConfig, trial: FrozenTrial) -> TrialConfig:
    """The exact TrialConfig a stored trial trained with (study config + its cut, strategy, seed)."""
    values = to_dict(cfg.trial)
    a = trial.user_attrs
    if "cut" not in a:
        raise StudyError(f"trial {trial.number} has no cut (it never started)")
    values.update(cut=a["cut"], strategy=a.get("strategy", SEARCH_STRATEGY), seed=a.get("seed", cfg.search.seed))
    for key in ("lr", "weight_decay"):
        if key in trial.params:
            values[key] = trial.params[key]
    return from_dict(TrialConfig, values)


def _duration(trial: FrozenTrial) -> float | None:
    if trial.datetime_start and trial.datetime_complete:
        return round((trial.datetime_complete - trial.datetime_start).total_seconds(), 2)
    return None


def trial_rows(study: optuna.Study, metric: str) -> pd.DataFrame:
    """One row per trial: number, strategy, cut, stage, phase, state, val/test metric, size, time."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({
            "trial": t.number, "strategy": a.get("strategy"), "cut": a.get("cut"), "cut_name": a.get("cut_name"),
            "stage": a.get("stage"), "phase": a.get("phase"), "seed": a.get("seed"), "state": t.state.name,
            f"val_{metric}": a.get(f"val_{metric}"), f"test_{metric}": a.get(f"test_{metric}"),
            "params": a.get("params"), "trainable_params": a.get("trainable_params"), "macs": a.get("macs"),
            "epochs": a.get("epochs"), "duration_s": _duration(t), "node_id": (a.get("node_id") or "")[:8],
            "note": a.get("fail_reason") or a.get("stopped_by") or _reuse_note(a),
        })
    return pd.DataFrame(rows)


def _reuse_note(attrs: dict[str, Any]) -> str:
    source = attrs.get("reused_from")
    return "" if source is None else f"same model as trial {source}: stored, not trained again"


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    clean = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not clean:
        return None, None
    return statistics.fmean(clean), (statistics.stdev(clean) if len(clean) > 1 else 0.0)


def _cut_summary(trials: list[FrozenTrial], metric: str) -> dict[str, Any]:
    """Mean (and sd) over repeats of every metric of completed trials of one cut."""
    out: dict[str, Any] = {"val": {}, "test": {}, "val_sd": {}, "test_sd": {}}
    for split in ("val", "test"):
        for name in METRIC_NAMES:
            mean, sd = _mean_sd([t.user_attrs.get(f"{split}_{name}") for t in trials])
            if mean is not None:
                out[split][name], out[f"{split}_sd"][name] = mean, sd
    first = trials[0].user_attrs
    out.update({
        "params": first.get("params"), "trainable_params": first.get("trainable_params"), "macs": first.get("macs"),
        "latency_batch1_ms": _mean_sd([t.user_attrs.get("latency_batch1_ms") for t in trials])[0],
        "latency_batch64_ms": _mean_sd([t.user_attrs.get("latency_batch64_ms") for t in trials])[0],
        "trials": [t.number for t in trials], "seeds": [t.user_attrs.get("seed") for t in trials],
        "repeats": len(trials),
    })
    return out


def best_cut(name: str, storage: str | None = None) -> dict[str, Any]:
    """The search's chosen cut: best mean validation metric (smaller model within tolerance)."""
    study, cfg = open_study(name, storage)
    return _best(study, cfg)


def _best(study: optuna.Study, cfg: StudyConfig) -> dict[str, Any]:
    name = study.study_name
    trials = study.get_trials(deepcopy=False)
    sampler = make_sampler(cfg)
    ranking = sampler.ranking(trials, SEARCH_STRATEGY)
    if not ranking:
        raise StudyError(f"study {name!r} has no completed search trial yet")
    cut, _ = ranking[0]
    chosen = [t for t in trials if t.state == TrialState.COMPLETE and (k := trial_key(t)) and
              k.strategy == SEARCH_STRATEGY and k.cut == cut]
    first = chosen[0].user_attrs
    best_trial = max(chosen, key=lambda t: t.value if cfg.resolved_direction == "maximize" else -t.value)
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    plan = sampler.plan(trials)
    return {
        "study": name, "cut": cut, "cut_name": first.get("cut_name"), "stage": first.get("stage"),
        "backbone": cfg.trial.backbone, "metric": cfg.metric, "direction": cfg.resolved_direction,
        **_cut_summary(chosen, cfg.metric), "trial": best_trial.number,
        "finished": plan.action == "finished" and running == 0,
        "full": {"params": first.get("full_params"), "macs": first.get("full_macs")},
        "ranking": [{"cut": c, "mean_val": v} for c, v in ranking],
    }


def compare_studies(names: Sequence[str], storage: str | None = None) -> pd.DataFrame:
    """Every (study, strategy, cut) with completed trials: mean ± sd metrics, size and latency."""
    rows = []
    for name in names:
        study, cfg = open_study(name, storage)
        groups: dict[tuple[str, int], list[FrozenTrial]] = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            key = trial_key(t)
            if key is not None:
                groups.setdefault((key.strategy, key.cut), []).append(t)
        chosen = None
        try:
            chosen = _best(study, cfg)["cut"]
        except StudyError:
            pass
        for (strategy, cut), trials in sorted(groups.items()):
            summary = _cut_summary(trials, cfg.metric)
            row = {"study": name, "strategy": strategy, "cut": cut, "cut_name": trials[0].user_attrs.get("cut_name"),
                   "chosen": strategy == SEARCH_STRATEGY and cut == chosen, "repeats": summary["repeats"]}
            for split in ("val", "test"):
                for metric in ("auroc", "auprc", "accuracy"):
                    row[f"{split}_{metric}"] = summary[split].get(metric)
                    row[f"{split}_{metric}_sd"] = summary[f"{split}_sd"].get(metric)
            row.update(params=summary["params"], trainable_params=summary["trainable_params"], macs=summary["macs"],
                       latency_batch1_ms=summary["latency_batch1_ms"])
            rows.append(row)
    return pd.DataFrame(rows)


def serve_dashboard(storage: str | None = None, host: str = "127.0.0.1", port: int = 8080,
                    artifacts: str | None = None) -> None:
    """Serve optuna-dashboard on the study database (blocks), with the artifact store when there is one."""
    try:
        from optuna_dashboard import run_server
    except ImportError as exc:
        raise ConfigError("the dashboard needs optuna-dashboard: pip install 'ttl-search[dashboard]'") from exc
    url = storage_url(storage)
    base = Path(artifacts) if artifacts else default_artifacts_dir(url)
    store = artifact_store(base) if base.exists() or artifacts else None
    run_server(open_storage(url), host=host, port=port, artifact_store=store)
