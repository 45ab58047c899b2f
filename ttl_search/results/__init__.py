"""Reading a study: a read-only view of what the database holds (its config, cut candidates,
typed trial records, the chosen cut, comparisons) and optuna-dashboard on it.

Nothing here imports the run side (Ray, the runner): report, export, analysis and the reading
commands work on a database from any machine.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from ..config import from_dict, to_dict
from ..errors import StudyError
from ..search.record import (SEARCH_STRATEGY, CutSummary, TrialRecord, completed_by_cut, fmt_count, fmt_interval,
                             fmt_value, model_name, records, summarize_cut)
from ..search.samplers import CutCandidate, search_trials
from ..storage import BASELINES_OF_ATTR, load_study, open_storage, sqlite_path, study_trials
from ..search.study import StudyConfig, cut_candidates, make_sampler, upgrade_stored_config
from ..search.answer import SAME_ARCHITECTURE, Answer, Ensemble, ProbeModels, paired_difference, study_answer
from ..search.budget import LATENCY_TABLE_ATTR, BudgetConfig, apply_budget, model_mb
from ..models.strategies import PROBE_STRATEGY
from ..train.metrics import compute_metrics, metric_value
from ..train.predictions import decode_predictions
from ..train.trial import TrialConfig

CONFIG_ATTR = "config"
"""Study attribute with the resolved config (``resume`` needs nothing else)."""
CANDIDATES_ATTR = "cut_candidates"
"""Study attribute with the cuts the search may train (index, name, stage, parameters), stored when
the study is created so that reading it needs no model."""
PROBE_ATTR = "probe"
"""Study attribute with the frozen probe's table: per cut its logistic-regression probe's
validation metric with its interval, kNN score, LogME, size and seconds (see
:mod:`ttl_search.train.probe`); stored once, before the search."""
LATENCY_ATTR = "latency"
"""Study attribute with the quiet latency pass's table (see :mod:`ttl_search.train.latency`): per
model (strategy, cut) the median and interquartile range at batch 1 and 64, and the device."""
PROBE_PREDICTIONS_ATTR = "ttl_probe_predictions"
"""Study system attribute with every probed cut's ``val`` and ``test`` predictions (encoded), so
that the probe's metrics and intervals can be recomputed."""
PROBE_HEADS_ATTR = "ttl_probe_heads"
"""Study system attribute with every probed cut's linear head (weight and bias, encoded), so that
the probe's model at any cut can be stored later (when it becomes the answer) without probing again."""


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
    attrs = study.user_attrs
    values = attrs.get(CONFIG_ATTR)
    if BASELINES_OF_ATTR in attrs:
        main = attrs[BASELINES_OF_ATTR]
        raise StudyError(f"study {study.study_name!r} holds the baselines of study {main!r}; read them with that "
                         f"study (`ttl-search status {main}`, `best`, `report`, `compare`)")
    if not isinstance(values, dict):
        raise StudyError(f"study {study.study_name!r} was not created by ttl-search (no stored config)")
    return from_dict(StudyConfig, upgrade_stored_config(values))


def stored_candidates(study: optuna.Study, cfg: StudyConfig) -> list[CutCandidate]:
    """The study's cut candidates as stored when it was created (computed from the config for a
    study from before they were stored)."""
    rows = study.user_attrs.get(CANDIDATES_ATTR)
    if not rows:
        return cut_candidates(cfg)
    stored = [CutCandidate(**row) for row in rows]
    if any(c.macs is None for c in stored):  # stored before candidates kept their MACs
        macs = {c.index: c.macs for c in cut_candidates(cfg)}
        stored = [replace(c, macs=macs.get(c.index)) for c in stored]
    return stored


def stored_probe(study: optuna.Study) -> dict[str, Any] | None:
    """The study's frozen-probe table (None when the probe has not run)."""
    table = study.user_attrs.get(PROBE_ATTR)
    return table if isinstance(table, dict) and table.get("rows") else None


def study_system_attr(study: optuna.Study, key: str) -> Any:
    """A study system attribute (None when absent; Optuna 5's ``Study`` no longer reads them)."""
    return study._storage.get_study_system_attrs(study._study_id).get(key)


def stored_probe_models(study: optuna.Study) -> ProbeModels | None:
    """The frozen probe's model at every probed cut (its table's rows and stored predictions); None
    when the probe has not run."""
    table = stored_probe(study)
    if table is None:
        return None
    predictions = study_system_attr(study, PROBE_PREDICTIONS_ATTR)
    if not isinstance(predictions, dict):
        return None
    return ProbeModels(table["rows"], {int(cut): value for cut, value in predictions.items()})


def probe_records(models: ProbeModels | None, cfg: StudyConfig, stored: Sequence[TrialRecord]) -> list[TrialRecord]:
    """A record of the frozen probe at every probed cut that no stored ``probe`` trial holds (part
    ``probe``, numbered by its cut, so that it reads ``probe:CUT``): metrics from its stored
    predictions, size from the probe table, MACs from a fine-tuned trial at the same cut."""
    if models is None:
        return []
    have = {int(r.cut) for r in stored if r.strategy == PROBE_STRATEGY and r.complete and r.cut is not None}
    same = {int(r.cut): r for r in stored if r.strategy == SEARCH_STRATEGY and r.complete}  # same architecture
    out = []
    for row in models.rows:
        cut = int(row["cut"])
        if cut in have or cut not in models.predictions:
            continue
        metrics = {}
        for split in ("val", "test"):
            labels, probs = decode_predictions(models.predictions[cut][split])
            metrics[split] = {k: float(v) for k, v in compute_metrics(
                labels, probs, metric_value("loss", labels, probs)).items()}
        k = int(probs.shape[1])
        out.append(TrialRecord(
            number=cut, part=PROBE_STRATEGY, state=TrialState.COMPLETE.name, value=metrics["val"].get(cfg.metric),
            strategy=PROBE_STRATEGY, cut=cut, repeat=0, cut_name=row.get("name"), stage=row.get("stage"),
            phase="probe", seed=cfg.search.seed, val=metrics["val"], test=metrics["test"], params=row.get("params"),
            trainable_params=(k * (int(row["channels"]) + 1) if row.get("channels") else None), epochs=0,
            train_time_s=row.get("seconds"), macs=getattr(same.get(cut), "macs", None),
            full_params=getattr(same.get(cut), "full_params", None), full_macs=getattr(same.get(cut), "full_macs", None),
        ))
    return out


def stored_latency(study: optuna.Study) -> dict[str, Any] | None:
    """The study's latency table (None before its latency pass ran)."""
    table = study.user_attrs.get(LATENCY_ATTR)
    return table if isinstance(table, dict) and table.get("rows") else None


def probe_cells(table: dict[str, Any], metric: str, fine_tuned: dict[int, float] | None = None,
                confidence: float = 0.95, test: bool = False) -> tuple[list[str], list[list[str]]]:
    """The frozen probe's table for people (``probe``, ``status``, ``report``): columns and rows of
    each cut's probe metric with its interval, kNN score, LogME, seconds, the test metric with
    ``test``, and (with ``fine_tuned``) the fine-tuned cut's mean validation metric beside it."""
    columns = ["cut", "name", "params", f"probe val {metric}", f"{confidence:.0%} interval", f"kNN val {metric}",
               "LogME", *([f"probe test {metric}"] if test else []),
               *([f"fine-tuned val {metric}"] if fine_tuned is not None else []), "seconds", ""]
    rows = []
    for r in table["rows"]:
        mark = "(best probe)" if r.get("best") else ("(same)" if r.get("indistinguishable") else "")
        tuned = [fmt_value(fine_tuned.get(r["cut"]))] if fine_tuned is not None else []
        rows.append([str(r["cut"]), str(r["name"]), fmt_count(r["params"]), fmt_value(r["probe_val"]),
                     fmt_interval(r.get("probe_val_ci")), fmt_value(r["knn_val"]), fmt_value(r["logme"], 3),
                     *([fmt_value(r.get("probe_test"))] if test else []), *tuned, f"{r['seconds']:.1f}s", mark])
    return columns, rows


def study_sampler(study: optuna.Study, cfg: StudyConfig):
    """The study's sampler, to read its plan and ranking (no model is built)."""
    return make_sampler(cfg, stored_candidates(study, cfg), stored_probe(study))


def open_study(name: str, storage: str | None = None) -> tuple[optuna.Study, StudyConfig]:
    study = load_study(name, open_storage(storage))
    return study, stored_config(study)


def trial_config(cfg: StudyConfig, trial: FrozenTrial) -> TrialConfig:
    """The exact TrialConfig a stored trial trained with (study config + its cut, strategy, seed)."""
    record = TrialRecord.from_trial(trial)
    if record.cut is None:
        raise StudyError(f"trial {trial.number} has no cut (it never started)")
    values = to_dict(cfg.trial)
    values.update(cut=record.cut, strategy=record.strategy,
                  seed=record.seed if record.seed is not None else cfg.search.seed)
    values["data"]["fold"] = record.fold or 0
    for key in ("lr", "weight_decay"):
        if getattr(record, key) is not None:
            values[key] = getattr(record, key)
    return from_dict(TrialConfig, values)


def trial_rows(study: optuna.Study, metric: str) -> pd.DataFrame:
    """One row per trial of the study and its baselines study: number (``baselines:N``), strategy, cut, stage, phase, state, val/test metric, size, time."""
    rows = []
    for r in records(study_trials(study)):
        rows.append({
            "trial": r.ref, "strategy": r.strategy, "cut": r.cut, "cut_name": r.cut_name, "stage": r.stage,
            "phase": r.phase, "seed": r.seed, "state": r.state, f"val_{metric}": r.val.get(metric),
            f"test_{metric}": r.test.get(metric), "params": r.params, "trainable_params": r.trainable_params,
            "macs": r.macs, "epochs": r.epochs, "duration_s": r.wall_s, "node_id": (r.node_id or "")[:8],
            "note": r.note,
        })
    return pd.DataFrame(rows)


def _summary_dict(summary: CutSummary) -> dict[str, Any]:
    """A cut summary as ``best`` reports it (JSON-ready)."""
    out = {k: v for k, v in asdict(summary).items() if k not in ("strategy", "cut", "cut_name", "stage",
                                                                  "full_params", "full_macs")}
    out["repeats"] = summary.repeats
    return out


def best_cut(name: str, storage: str | None = None) -> dict[str, Any]:
    """The search's chosen cut of study ``name`` under its selection rule (see :func:`chosen_cut`);
    a :class:`StudyError` while no search trial has completed."""
    return required_cut(*open_study(name, storage))


def required_cut(study: optuna.Study, cfg: StudyConfig, budget: BudgetConfig | None = None) -> dict[str, Any]:
    """:func:`chosen_cut` of an open study (within ``budget``); a :class:`StudyError` while it has none."""
    best = chosen_cut(study, cfg, budget=budget)
    if best is None:
        raise StudyError(f"study {study.study_name!r} has no completed search trial yet")
    return best


def cut_latency(study: optuna.Study, batch: int) -> dict[str, Any]:
    """Every cut's latency at ``batch`` that the study measured: its pre-training table (a latency
    budget's), and the quiet latency pass's after the search (the models of a cut's architecture);
    a cut latency table (``rows`` of ``cut``, ``batch{B}_ms``) with the device(s) it came from."""
    column = f"batch{batch}_ms"
    rows: dict[int, dict[str, Any]] = {}
    devices = []
    for table, kind in ((study.user_attrs.get(LATENCY_TABLE_ATTR), "before training"),
                        (stored_latency(study), "after the search")):
        if not isinstance(table, dict):
            continue
        for row in table.get("rows", []):
            if row.get(column) is not None and row.get("strategy", SEARCH_STRATEGY) in SAME_ARCHITECTURE:
                rows.setdefault(int(row["cut"]), {"cut": int(row["cut"]), column: row[column]})
        devices.append(f"{table.get('device_name')} ({kind})")
    return {"rows": sorted(rows.values(), key=lambda r: r["cut"]), "device_name": "; ".join(devices) or None}


def budget_view(study: optuna.Study, cfg: StudyConfig, budget: BudgetConfig) -> tuple[StudyConfig, list[CutCandidate]]:
    """The study's config and candidates as if its selection had ``budget``: every cut marked with
    it, latency from what the study measured (:func:`cut_latency`)."""
    cfg = replace(cfg, selection=replace(cfg.selection, budget=budget))
    latency = cut_latency(study, budget.latency_batch) if budget.latency_ms is not None else None
    return cfg, apply_budget(stored_candidates(study, cfg), budget, latency)


def chosen_cut(study: optuna.Study, cfg: StudyConfig, trials: Sequence[FrozenTrial] | None = None,
               budget: BudgetConfig | None = None) -> dict[str, Any] | None:
    """The chosen model of an open study (``trials``: its trials, when already read) under the
    study's selection rule, with its summary over seeds, its validation interval, the candidates
    indistinguishable from the best, the ones the rule may not choose (and why), and every
    candidate's interval; None while no search trial has completed. ``budget``: the answer within
    that deployment budget instead of the study's, from the stored trials (nothing is trained),
    with its paired difference to the study's own answer."""
    name = study.study_name
    trials = study_trials(study) if trials is None else trials
    own = cfg
    if budget is not None:
        cfg, candidates = budget_view(study, cfg, budget)
    else:
        candidates = stored_candidates(study, cfg)
    models = stored_probe_models(study)
    answer = study_answer(trials, cfg, candidates, models)
    if answer.pick is None:
        return None
    key = answer.key
    stored = records(search_trials(trials, cfg.search.repeats))
    groups = completed_by_cut(stored + probe_records(models, cfg, stored))
    chosen = groups[key]
    latency = stored_latency(study)
    summary = summarize_cut(chosen, latency)
    best_trial = max(chosen, key=lambda r: r.value if cfg.resolved_direction == "maximize" else -r.value)
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    plan = study_sampler(study, cfg).plan(trials)
    score = answer.scores.get(key)
    return {
        "study": name, "strategy": answer.strategy, "cut": answer.pick, "model": model_name(*key),
        "cut_name": summary.cut_name, "stage": summary.stage,
        "backbone": cfg.trial.backbone, "metric": cfg.metric, "direction": cfg.resolved_direction,
        "rule": answer.rule, "confidence": cfg.selection.confidence, "folds": cfg.selection.folds,
        "candidates": cfg.selection.candidates, "guards": list(cfg.selection.guards),
        **_summary_dict(summary), "trial": best_trial.ref,
        "val_ci": list(score.ci) if score else None,
        "reference_cut": answer.reference, "reference_strategy": answer.reference_strategy,
        "reference": model_name(*answer.reference_key) if answer.reference_key else None,
        "indistinguishable": answer.indistinguishable, "close": [model_name(*k) for k in answer.close],
        "excluded": [{"strategy": s, "cut": c, "model": model_name(s, c), "why": why}
                     for (s, c), why in answer.excluded.items()],
        "finished": plan.action == "finished" and running == 0,
        "full": {"params": summary.full_params, "macs": summary.full_macs},
        "ranking": _ranking_rows(answer, groups, cfg, latency),
        "note": answer.note, "chance": answer.chance, "majority": answer.majority,
        "at_chance": key in answer.at_chance, "below_majority": key in answer.below_majority,
        "warnings": answer.warnings(cfg.metric),
        "ensemble": _ensemble_dict(answer.ensemble),
        "budget": _budget_dict(cfg, candidates, answer, trials, models,
                               None if budget is None else study_answer(trials, own, stored_candidates(study, own),
                                                                        models)),
    }


def _budget_dict(cfg: StudyConfig, candidates: Sequence[CutCandidate], answer: Answer,
                 trials: Sequence[FrozenTrial], models: ProbeModels | None,
                 free: Answer | None) -> dict[str, Any] | None:
    """The budget the answer was chosen within (None without one): its limits, every cut and
    candidate over it with why, each cut's cost, and (``free``: the study's own answer, for a
    budget asked about afterwards) the study's own answer and the paired difference to it."""
    budget = cfg.selection.budget
    if not budget.active:
        return None
    over = {(SEARCH_STRATEGY, c.index): c.over_budget for c in candidates if c.over_budget}
    over.update(answer.over_budget)
    out: dict[str, Any] = {
        "limits": budget.describe(), **{k: getattr(budget, k) for k in ("params", "macs", "latency_ms", "model_mb")},
        "latency_batch": budget.latency_batch,
        "over_budget": [{"strategy": s, "cut": c, "model": model_name(s, c), "why": why}
                        for (s, c), why in sorted(over.items(), key=lambda kv: (kv[0][1], kv[0][0]))],
        "cuts": [{"cut": c.index, "name": c.name, "params": c.params, "macs": c.macs, "model_mb": model_mb(c.params),
                  "latency_ms": c.latency_ms, "over_budget": c.over_budget} for c in candidates],
    }
    if free is not None and free.key is not None:
        paired = paired_difference(trials, cfg, models, answer.key, free.key)
        score, reference = paired if paired else (None, None)
        out["unconstrained"] = {"model": model_name(*free.key), "strategy": free.strategy, "cut": free.pick,
                                "val": reference.value if reference else None,
                                "diff": score.diff if score else None,
                                "diff_ci": list(score.diff_ci) if score else None,
                                "indistinguishable": score.indistinguishable if score else None}
    return out


def _ensemble_dict(ensemble: Ensemble | None) -> dict[str, Any] | None:
    """The answer's ensemble as ``best`` reports it (JSON-ready): kind (``seeds`` or ``cuts``), seeds
    per cut, repeats and their seeds, trials, member cuts and their summed parameters, whether it is
    complete, validation value, interval and paired difference to the best cut, test value and
    interval."""
    if ensemble is None:
        return None
    val, test = ensemble.val, ensemble.test
    return {"size": ensemble.size, "repeats": ensemble.repeats, "seeds": ensemble.seeds, "trials": ensemble.trials,
            "kind": ensemble.kind, "cuts": ensemble.cuts, "params": ensemble.params, "complete": ensemble.complete,
            "left_out": ensemble.left_out, "cap": ensemble.cap,
            "val": val.value if val else None, "val_ci": list(val.ci) if val else None,
            "diff": val.diff if val else None, "diff_ci": list(val.diff_ci) if val else None,
            "test": test.value if test else None, "test_ci": list(test.ci) if test else None}


def _ranking_rows(answer: Answer, groups: dict[tuple[str, int], list[TrialRecord]],
                  cfg: StudyConfig, latency: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every completed (strategy, cut), best mean validation metric first: mean, interval, paired
    difference to the reference cut, and whether it is indistinguishable from it."""
    sign = 1.0 if cfg.resolved_direction == "maximize" else -1.0
    rows = []
    for (strategy, cut), group in groups.items():
        summary = summarize_cut(group, latency)
        score = answer.scores.get((strategy, cut))
        rows.append({
            "strategy": strategy, "cut": cut, "cut_name": summary.cut_name, "params": summary.params,
            "trainable_params": summary.trainable_params, "repeats": summary.repeats,
            "mean_val": summary.val.get(cfg.metric),
            "val_ci": list(score.ci) if score else None,
            "diff": score.diff if score else None, "diff_ci": list(score.diff_ci) if score else None,
            "indistinguishable": score.indistinguishable if score else None,
            "at_chance": (strategy, cut) in answer.at_chance if score else None,
            "excluded": answer.excluded.get((strategy, cut)),
            "chosen": (strategy, cut) == answer.key,
            "trials": [r.ref for r in group],
        })
    rows.sort(key=lambda r: -sign * r["mean_val"] if r["mean_val"] is not None else float("inf"))
    return rows


COMPARE_METRICS = ("auroc", "auprc", "accuracy")
"""Metrics (validation and test, mean and sd) in a comparison."""


def compare_studies(names: Sequence[str], storage: str | None = None) -> pd.DataFrame:
    """Every (study, strategy, cut) with completed trials: mean ± sd metrics, size and latency."""
    rows = []
    for name in names:
        study, cfg = open_study(name, storage)
        trials = study_trials(study)
        models = stored_probe_models(study)
        answer = study_answer(trials, cfg, stored_candidates(study, cfg), models)
        latency = stored_latency(study)
        stored = records(search_trials(trials, cfg.search.repeats))
        for (strategy, cut), group in completed_by_cut(stored + probe_records(models, cfg, stored)).items():
            summary = summarize_cut(group, latency)
            score = answer.scores.get((strategy, cut))
            row = {"study": name, "strategy": strategy, "cut": cut, "cut_name": summary.cut_name,
                   "chosen": (strategy, cut) == answer.key, "repeats": summary.repeats,
                   "metric": cfg.metric,
                   "val_ci_low": score.ci[0] if score else None, "val_ci_high": score.ci[1] if score else None,
                   "diff_to_best": score.diff if score else None,
                   "diff_ci_low": score.diff_ci[0] if score else None,
                   "diff_ci_high": score.diff_ci[1] if score else None,
                   "indistinguishable": score.indistinguishable if score else None}
            for split in ("val", "test"):
                for metric in COMPARE_METRICS:
                    row[f"{split}_{metric}"] = getattr(summary, split).get(metric)
                    row[f"{split}_{metric}_sd"] = getattr(summary, f"{split}_sd").get(metric)
            row.update(params=summary.params, trainable_params=summary.trainable_params, macs=summary.macs,
                       latency_batch1_ms=summary.latency_batch1_ms,
                       latency_batch1_iqr=list(summary.latency_batch1_iqr) if summary.latency_batch1_iqr else None,
                       latency_device=summary.latency_device)
            rows.append(row)
    return pd.DataFrame(rows)
