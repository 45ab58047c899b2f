"""The probe phase (driver side): the frozen probe scores every cut of the pretrained backbone
before the search, and the driver stores what it found in the study.

- the probe table (per cut: logistic-regression probe's validation metric with its bootstrap
  interval, kNN score, LogME, size, seconds) as the study attribute ``probe``;
- every cut's validation and test predictions as a study system attribute (metrics and intervals
  can be recomputed, and a replay of the study stays exact);
- the best probe (by validation metric; a smaller model wins a tie) as a completed trial of
  strategy ``probe``: a cheap candidate model with a checkpoint, listed by ``best`` and
  ``compare`` next to the fine-tuned cuts and the baselines, and exportable.

The probe runs as a Ray task with a trial's resources (so on a trial's device), or in this
process for ``ttl-search probe``. The table is computed once: a resumed study reuses it.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from ..config import from_dict, to_dict
from ..errors import StudyError
from ..models.backbones import load_backbone
from ..models.strategies import PROBE_STRATEGY, build_strategy_model
from ..results import (PROBE_ATTR, PROBE_HEADS_ATTR, PROBE_PREDICTIONS_ATTR, chosen_cut, stored_candidates,
                       stored_probe, study_system_attr)
from ..search.budget import feasible
from ..search.record import PREDICTIONS_ATTR, TrialRecord
from ..search.samplers import job_distributions, probe_ranking
from ..search.selection import Evidence, score_candidates
from ..search.study import StudyConfig, part_space, trial_strategies
from ..storage import attach_artifact, baselines_study
from ..train.metrics import compute_metrics, metric_value
from ..train.predictions import decode_predictions
from ..train.probe import ProbeConfig, ProbeResult, run_probe
from ..train.trial import TrialConfig, resolve_weights, seed_everything
from .cluster import os_reason, run_task, save_checkpoint
from .devices import local_device, on_ray_device

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def probe_phase(study: optuna.Study, cfg: StudyConfig, artifacts: Path | None, remote: bool = True,
                progress: Progress | None = None, lease=None) -> dict[str, Any]:
    """The study's probe table: the stored one, else the probe is run (as a Ray task with a trial's
    resources when ``remote``, else here) and its results stored, unless the driver's ``lease``
    was taken over meanwhile (then nothing is written)."""
    table = stored_probe(study)
    if table is not None:
        return table
    log.info("probing every valid cut of %s (one forward pass of the frozen backbone)", cfg.trial.backbone)
    tcfg = replace(probe_trial_config(cfg), device=local_device(cfg))  # a worker claims what Ray assigns
    result = (run_task(cfg, _probe_task, to_dict(tcfg), to_dict(cfg.probe), cfg.resources.cpus, what="the probe")
              if remote else run_probe(tcfg, cfg.probe, progress=progress))
    if lease is not None:
        lease.ensure_held()
    return store_probe(study, cfg, result, artifacts)


def _probe_task(trial_values: dict[str, Any], probe_values: dict[str, Any], cpus: float) -> ProbeResult:
    """The probe on a Ray worker (threads as a trial's, on the device Ray assigned it)."""
    tcfg = from_dict(TrialConfig, on_ray_device(trial_values))
    tcfg.threads = max(1, int(cpus))
    return run_probe(tcfg, from_dict(ProbeConfig, probe_values))


def probe_trial_config(cfg: StudyConfig) -> TrialConfig:
    """The trial settings the probe runs with: the study's, with repeat 0's seed (the seed its
    stored model records, so a backbone with random weights is rebuilt identically)."""
    return replace(cfg.trial, seed=cfg.search.seed)


def probe_scores(cfg: StudyConfig, result: ProbeResult) -> list[dict[str, Any]]:
    """The probe's rows with each cut's bootstrap interval of the validation metric and whether it
    is indistinguishable (paired bootstrap) from the best probe, as the study stores them."""
    rows = [row.as_dict() for row in result.rows]
    best = probe_ranking(rows, "probe_val", cfg.resolved_direction)[0]
    evidence = {}
    for row in rows:
        labels, probs = decode_predictions(result.predictions[row["cut"]]["val"])
        evidence[row["cut"]] = Evidence({0: (labels, [probs])})
    scores = score_candidates(evidence, cfg.metric, cfg.resolved_direction, cfg.selection, reference=best)
    for row in rows:
        score = scores[row["cut"]]
        row["probe_val_ci"] = [float(score.ci[0]), float(score.ci[1])]
        row["indistinguishable"] = bool(score.indistinguishable)
        row["best"] = row["cut"] == best
    return rows


def store_probe(study: optuna.Study, cfg: StudyConfig, result: ProbeResult, artifacts: Path | None) -> dict[str, Any]:
    """Store ``result`` in the study (table, predictions and linear heads of every cut, the best
    probe's trial); the table."""
    rows = probe_scores(cfg, result)
    best = next(row for row in rows if row["best"])
    table = {
        "metric": result.metric, "backbone": result.backbone, "input_size": result.input_size,
        "in_channels": result.in_channels, "num_classes": result.num_classes, "device": result.device,
        "feature_seconds": round(result.feature_seconds, 3), "seconds": round(result.seconds, 3),
        "peak_feature_mb": round(result.peak_feature_mb, 2), "best_cut": best["cut"], "data": result.data,
        "rows": rows,
    }
    storage = study._storage
    storage.set_study_system_attr(study._study_id, PROBE_PREDICTIONS_ATTR,
                                  {str(cut): preds for cut, preds in result.predictions.items()})
    storage.set_study_system_attr(study._study_id, PROBE_HEADS_ATTR,
                                  {str(cut): encode_head(*head) for cut, head in result.heads.items()})
    if PROBE_STRATEGY in trial_strategies(cfg):
        model = _best_within_budget(cfg, rows, {c.index for c in feasible(stored_candidates(study, cfg))})
        _store_probe_trial(study, cfg, table, model, result.predictions[model["cut"]], result.heads[model["cut"]],
                           artifacts)
    else:  # its trials' strategy parameter has no "probe" choice, and Optuna cannot widen it
        log.info("study %s was created without the probe (probe.run false): its table is stored, its best probe "
                 "is not stored as a candidate model", cfg.name)
    study.set_user_attr(PROBE_ATTR, table)  # last: a table stored means the phase is done
    log.info("probe: %d cuts in %.1f s; best probe at cut %d (%s), val %s %.4f", len(rows), result.seconds,
             best["cut"], best["name"], cfg.metric, best["probe_val"])
    return table


def _best_within_budget(cfg: StudyConfig, rows: list[dict[str, Any]], cuts: set[int]) -> dict[str, Any]:
    """The best probe row among ``cuts`` (the cuts within the study's budget): the probe model the
    study stores as a candidate."""
    order = probe_ranking([r for r in rows if r["cut"] in cuts] or rows, "probe_val", cfg.resolved_direction)
    return next(r for r in rows if r["cut"] == order[0])


def encode_head(weight: np.ndarray, bias: np.ndarray) -> dict[str, Any]:
    """A probe's linear head ``(W (K, C), b (K,))`` in a JSON-ready form (base64 float32)."""
    weight, bias = np.asarray(weight, dtype="<f4"), np.asarray(bias, dtype="<f4")
    return {"shape": list(weight.shape), "weight": base64.b64encode(weight.tobytes()).decode("ascii"),
            "bias": base64.b64encode(bias.tobytes()).decode("ascii")}


def decode_head(value: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` from :func:`encode_head`'s form."""
    k, c = value["shape"]
    weight = np.frombuffer(base64.b64decode(value["weight"]), dtype="<f4").reshape(k, c)
    return weight, np.frombuffer(base64.b64decode(value["bias"]), dtype="<f4").reshape(k)


def store_answer_probe(study: optuna.Study, cfg: StudyConfig, artifacts: Path | None,
                       best: dict[str, Any] | None = None) -> int | None:
    """When the study's answer (``best``: its ``chosen_cut``, when already computed) is the frozen
    probe at a cut that no trial holds yet, store that probe as a completed ``probe`` trial with its
    checkpoint (from the heads the probe stored), so that ``export`` writes the answer like any
    model; its cut, or None when nothing was stored."""
    best = chosen_cut(study, cfg) if best is None else best
    if not best or best["strategy"] != PROBE_STRATEGY or not str(best["trial"]).startswith(f"{PROBE_STRATEGY}:"):
        return None
    cut = best["cut"]
    if PROBE_STRATEGY not in trial_strategies(cfg):
        log.warning("the answer of study %s is the frozen probe at cut %d, which this study (created without "
                    "probe.run) cannot store as a model; export a trained model with --trial N", cfg.name, cut)
        return None
    heads = study_system_attr(study, PROBE_HEADS_ATTR) or {}
    if str(cut) not in heads:
        log.warning("the answer of study %s is the frozen probe at cut %d, whose head was not stored (a probe run "
                    "by an earlier version): it cannot be exported", cfg.name, cut)
        return None
    table = stored_probe(study)
    row = next(r for r in table["rows"] if int(r["cut"]) == cut)
    predictions = study_system_attr(study, PROBE_PREDICTIONS_ATTR)[str(cut)]
    _store_probe_trial(study, cfg, table, row, predictions, decode_head(heads[str(cut)]), artifacts)
    log.info("the answer of study %s, the frozen probe at cut %d, is stored as a model", cfg.name, cut)
    return cut


def _store_probe_trial(study: optuna.Study, cfg: StudyConfig, table: dict[str, Any], row: dict[str, Any],
                       predictions: dict[str, Any], head: tuple[np.ndarray, np.ndarray],
                       artifacts: Path | None) -> None:
    """The probe of ``row``'s cut as a completed ``probe`` trial with its checkpoint (the truncated
    pretrained units and the probe's linear ``head``), in the study's baselines study when it has
    one; ``table``: the probe table (device, sizes, data)."""
    cut = row["cut"]
    metrics = {split: _metrics(predictions[split]) for split in ("val", "test")}
    record = TrialRecord(
        strategy=PROBE_STRATEGY, cut=cut, repeat=0, cut_name=row["name"], stage=row["stage"], phase="probe",
        seed=cfg.search.seed, val=metrics["val"], test=metrics["test"], params=row["params"],
        trainable_params=int(head[0].size + head[1].size), epochs=0,
        train_time_s=round(row["seconds"], 3), duration_s=round(table["seconds"], 3), device=table["device"],
        input_size=table["input_size"], dataset_md5=(table.get("data") or {}).get("md5"),
    )
    if artifacts is not None:
        path = artifacts / cfg.name / f"probe-cut-{cut}.pt"
        saved = save_checkpoint(_probe_state(cfg, table, cut, head), path)
        if "infrastructure" in saved:
            raise StudyError(f"{saved['infrastructure']}; the probe's table is not stored. Free space or set another "
                             f"folder (--set artifacts=...), then `ttl-search resume {cfg.name}`")
        record.checkpoint = saved["checkpoint"]
    baselines = baselines_study(study)
    candidates = stored_candidates(study, cfg)
    strategies, cuts = part_space(cfg, candidates, PROBE_STRATEGY, baselines is not None)
    distributions = job_distributions(candidates, strategies, cfg.seed_count, cfg.selection.folds, cuts)
    study = baselines or study
    params = {"strategy": PROBE_STRATEGY, "cut": cut, "repeat": 0, "fold": 0}
    # Stored RUNNING first: Optuna attaches artifacts only to unfinished trials.
    study.add_trial(optuna.trial.create_trial(
        params={k: v for k, v in params.items() if k in distributions}, distributions=distributions,
        user_attrs=record.to_attrs(), state=TrialState.RUNNING, system_attrs={PREDICTIONS_ATTR: predictions},
    ))
    trial = study.get_trials(deepcopy=False)[-1]
    if record.checkpoint and artifacts is not None:
        _attach(study, trial, artifacts, Path(record.checkpoint))
    study._storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [float(metrics["val"][cfg.metric])])


def _attach(study: optuna.Study, trial, artifacts: Path, path: Path) -> None:
    try:
        artifact_id = attach_artifact(artifacts, trial, path, "application/octet-stream", storage=study._storage)
    except OSError as exc:
        log.warning("the probe's checkpoint %s could not be copied into the artifact store: %s", path, os_reason(exc))
        return
    study._storage.set_trial_user_attr(trial._trial_id, "checkpoint_artifact_id", artifact_id)


def _metrics(encoded: dict[str, Any]) -> dict[str, float]:
    labels, probs = decode_predictions(encoded)
    return {k: float(v) for k, v in compute_metrics(labels, probs, metric_value("loss", labels, probs)).items()}


def _probe_state(cfg: StudyConfig, table: dict[str, Any], cut: int,
                 head: tuple[np.ndarray, np.ndarray]) -> dict[str, torch.Tensor]:
    """The state dict of the ``probe`` strategy's model at ``cut``: pretrained units, probe ``head``."""
    seed_everything(cfg.search.seed)  # as the probe (and a restore) did before loading: random weights agree
    loaded = load_backbone(cfg.trial.backbone, resolve_weights(cfg.trial), table["in_channels"])
    model = build_strategy_model(loaded, PROBE_STRATEGY, cut, table["num_classes"], "pool",
                                 table["input_size"]).model
    weight, bias = head
    model.head.fc.weight.data.copy_(torch.tensor(np.array(weight)))  # a copy: arrays from Ray are read-only
    model.head.fc.bias.data.copy_(torch.tensor(np.array(bias)))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
