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


def cut_metrics(trials: Sequence[FrozenTrial], metric: str, strategy: str | None = "ttl",
                latency: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per (strategy, cut) with completed trials: mean and sd over seeds of the
    validation/test ``metric`` and of the table metrics (``val_<m>``, ``test_<m>``), size
    (``params``, ``trainable_params``) and latency (median and quartiles from the study's latency
    table ``latency`` when it has one). ``strategy=None`` keeps every strategy."""
    rows = []
    for (s, cut), group in completed_by_cut(records(trials), strategy).items():
        summary = summarize_cut(group, latency)
        row: dict[str, Any] = {"strategy": s, "cut": cut, "cut_name": summary.cut_name, "stage": summary.stage,
                               "n": summary.repeats, "seeds": summary.seeds, "trials": summary.trials}
        for split in ("val", "test"):
            means, sds = getattr(summary, split), getattr(summary, f"{split}_sd")
            row[f"{split}_mean"], row[f"{split}_sd"] = _nan(means.get(metric)), _nan(sds.get(metric))
            for m in TABLE_METRICS:
                row[f"{split}_{m}"], row[f"{split}_{m}_sd"] = _nan(means.get(m)), _nan(sds.get(m))
        row.update(params=summary.params, trainable_params=summary.trainable_params, macs=summary.macs,
                   latency_batch1_ms=_nan(summary.latency_batch1_ms),
                   latency_batch1_q1=_nan(summary.latency_batch1_iqr[0] if summary.latency_batch1_iqr else None),
                   latency_batch1_q3=_nan(summary.latency_batch1_iqr[1] if summary.latency_batch1_iqr else None),
                   latency_batch64_ms=_nan(summary.latency_batch64_ms))
        rows.append(row)
    columns = ["strategy", "cut", "cut_name", "stage", "n", "seeds", "trials", "val_mean", "val_sd", "test_mean",
               "test_sd"] + [f"{split}_{m}{sd}" for split in ("val", "test") for m in TABLE_METRICS
                             for sd in ("", "_sd")] + [
               "params", "trainable_params", "macs", "latency_batch1_ms", "latency_batch1_q1", "latency_batch1_q3",
               "latency_batch64_ms"]
    return pd.DataFrame(rows, columns=columns)


def spreads_overlap(low: Sequence[float], high: Sequence[float]) -> bool:
    """Whether any two of the intervals [low, high] overlap (NaN bounds count as no spread known:
    no overlap can be ruled out, so they count as overlapping)."""
    lo, hi = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    if len(lo) < 2:
        return False
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        return True
    order = np.argsort(lo)
    return bool((lo[order][1:] <= hi[order][:-1]).any())


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
    # the study's and its baselines' trials in the order they started (to the microsecond)
    for r in sorted(records(trials), key=lambda r: (r.started is None, r.started or 0)):
        if r.cut is None:
            continue
        rows.append({"trial": r.ref, "phase": r.phase or "-", "strategy": r.strategy, "cut": r.cut,
                     "cut_name": r.cut_name, "stage": r.stage, "seed": r.seed, "state": r.state,
                     f"val_{metric}": r.val.get(metric),
                     "started": r.started.isoformat(timespec="seconds") if r.started else None, "note": r.note})
    return pd.DataFrame(rows, columns=["trial", "phase", "strategy", "cut", "cut_name", "stage", "seed", "state",
                                       f"val_{metric}", "started", "note"])
