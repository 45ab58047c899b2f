"""Tables of a study for reports: per-cut metrics (mean and sd over seeds), the Pareto front and the
search order."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
from optuna.trial import FrozenTrial

from ..search.record import completed_by_cut, records, summarize_cut

TABLE_METRICS = ("auroc", "auprc", "accuracy", "balanced_accuracy", "f1_macro")
"""Metrics of the results table (test split) and of ``cut_metrics`` (both splits)."""
CUT_TABLE_METRICS = ("accuracy", "balanced_accuracy", "f1_macro")
"""Threshold metrics the table of every trained cut shows beside the study's metric."""
METRIC_HEADERS = {"auroc": "AUROC", "auprc": "AUPRC", "accuracy": "accuracy",
                  "balanced_accuracy": "balanced accuracy", "f1_macro": "macro F1"}

def _nan(value: Any) -> float:
    """A number for a table or plot: NaN where there is none."""
    return float("nan") if value is None else value


def cut_metrics(trials: Sequence[FrozenTrial], metric: str, strategy: str | None = "ttl") -> pd.DataFrame:
    """One row per (strategy, cut) with completed trials: mean and sd over seeds of the
    validation/test ``metric`` and of the table metrics (``val_<m>``, ``test_<m>``), size
    (``params``, ``trainable_params``) and latency. ``strategy=None`` keeps every strategy."""
    rows = []
    for (s, cut), group in completed_by_cut(records(trials), strategy).items():
        summary = summarize_cut(group)
        row: dict[str, Any] = {"strategy": s, "cut": cut, "cut_name": summary.cut_name, "stage": summary.stage,
                               "n": summary.repeats, "seeds": summary.seeds, "trials": summary.trials}
        for split in ("val", "test"):
            means, sds = getattr(summary, split), getattr(summary, f"{split}_sd")
            row[f"{split}_mean"], row[f"{split}_sd"] = _nan(means.get(metric)), _nan(sds.get(metric))
            for m in TABLE_METRICS:
                row[f"{split}_{m}"], row[f"{split}_{m}_sd"] = _nan(means.get(m)), _nan(sds.get(m))
        row.update(params=summary.params, trainable_params=summary.trainable_params, macs=summary.macs,
                   latency_batch1_ms=_nan(summary.latency_batch1_ms),
                   latency_batch64_ms=_nan(summary.latency_batch64_ms))
        rows.append(row)
    columns = ["strategy", "cut", "cut_name", "stage", "n", "seeds", "trials", "val_mean", "val_sd", "test_mean",
               "test_sd"] + [f"{split}_{m}{sd}" for split in ("val", "test") for m in TABLE_METRICS
                             for sd in ("", "_sd")] + [
               "params", "trainable_params", "macs", "latency_batch1_ms", "latency_batch64_ms"]
    return pd.DataFrame(rows, columns=columns)


def pareto_front(costs: Sequence[float], values: Sequence[float], maximize: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point dominates (cost no higher and value no worse,
    one of them strictly). Points with a missing cost or value are never on the front."""
    c = np.asarray(costs, dtype=float)
    v = np.asarray(values, dtype=float) * (1 if maximize else -1)
    ok = np.isfinite(c) & np.isfinite(v)
    mask = np.zeros(len(c), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok & (c <= c[i]) & (v >= v[i]) & ((c < c[i]) | (v > v[i]))
        mask[i] = not others.any()
    return mask



def search_order_rows(trials: Sequence[FrozenTrial], metric: str) -> pd.DataFrame:
    rows = []
    for r in records(trials):
        if r.cut is None:
            continue
        rows.append({"trial": r.number, "phase": r.phase or "-", "strategy": r.strategy, "cut": r.cut,
                     "cut_name": r.cut_name, "stage": r.stage, "seed": r.seed, "state": r.state,
                     f"val_{metric}": r.val.get(metric),
                     "started": r.started.isoformat(timespec="seconds") if r.started else None, "note": r.note})
    return pd.DataFrame(rows, columns=["trial", "phase", "strategy", "cut", "cut_name", "stage", "seed", "state",
                                       f"val_{metric}", "started", "note"])
