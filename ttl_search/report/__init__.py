"""Study reports: PNG plots and a Markdown summary (matplotlib with the Agg backend).

:func:`make_report` writes, for one study:

- ``metric_vs_cut.png``: validation and test metric of every trained cut (mean ± sd over seeds),
  lines only between neighbouring valid cuts that were both trained, backbone stages shaded, the
  chosen cut and the baselines (validation and test) marked;
- ``metric_vs_cost.png``: validation metric against parameters, MACs and latency with the Pareto
  front (models no other model beats on both cost and metric);
- ``search_order.png``: which cut the search trained when, coloured by phase (stage 1, stage 2,
  baselines);
- ``summary.md`` with the results table of TTL next to the baselines (test AUROC, AUPRC, accuracy,
  balanced accuracy, macro F1, parameters and how many of them train, MACs, latency, as in the
  paper's results table), the table of every trained cut (validation and test), and
  ``results.csv``, ``cuts.csv``, ``search_order.csv``.

The PNGs and the summary are attached to the study as Optuna artifacts, so optuna-dashboard lists
them. This module also draws the plots of :mod:`ttl_search.analysis`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from ..errors import StudyError
from ..search.record import completed_by_cut, fmt_count, records, summarize_cut
from ..models.strategies import BASELINES, STRATEGIES

log = logging.getLogger(__name__)

TABLE_METRICS = ("auroc", "auprc", "accuracy", "balanced_accuracy", "f1_macro")
"""Metrics of the results table (test split) and of ``cut_metrics`` (both splits)."""
CUT_TABLE_METRICS = ("accuracy", "balanced_accuracy", "f1_macro")
"""Threshold metrics the table of every trained cut shows beside the study's metric."""
METRIC_HEADERS = {"auroc": "AUROC", "auprc": "AUPRC", "accuracy": "accuracy",
                  "balanced_accuracy": "balanced accuracy", "f1_macro": "macro F1"}
STRATEGY_LABELS = {name: s.label for name, s in STRATEGIES.items()}
BASELINE_MARKERS = {name: s.marker for name, s in STRATEGIES.items() if name in BASELINES}
PHASE_COLORS = {"stage1": "#1f77b4", "stage2": "#ff7f0e", "baseline": "#7f7f7f", "tpe": "#2ca02c",
                "exhaustive": "#9467bd"}
STATE_MARKERS = {"COMPLETE": "o", "FAIL": "x", "PRUNED": "v", "RUNNING": "*", "WAITING": "."}
CHOSEN_COLOR = "#d62728"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# Tables from the study


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


# ---------------------------------------------------------------------------------------------
# Plot helpers (shared with the SVCCA plots)


def partly_trainable(total: Any, trainable: Any) -> bool:
    """Whether fewer than ``total`` parameters train (False where either count is unknown)."""
    return fmt_count(total) != "-" and fmt_count(trainable) != "-" and float(trainable) < float(total)


def trainable_note(total: Any, trainable: Any) -> str:
    """", all trainable", ", 2.60k trainable", or "" where either count is unknown."""
    if fmt_count(total) == "-" or fmt_count(trainable) == "-":
        return ""
    return f", {fmt_count(trainable)} trainable" if partly_trainable(total, trainable) else ", all trainable"


def _stages(cuts: Sequence[dict]) -> list[tuple[int, int, int]]:
    """(stage, first cut index, last cut index) in order."""
    out: list[list[int]] = []
    for c in cuts:
        if out and out[-1][0] == c["stage"]:
            out[-1][2] = c["index"]
        else:
            out.append([c["stage"], c["index"], c["index"]])
    return [tuple(s) for s in out]  # type: ignore[misc]


def shade_stages(ax, cuts: Sequence[dict], lo: float, hi: float, axis: str = "x") -> None:
    """Shade backbone stages (alternating bands labelled "stage k") between cut ``lo`` and ``hi``
    and draw a dashed line after each stage end."""
    import matplotlib.transforms as mtransforms

    for n, (stage, first, last) in enumerate(_stages(cuts)):
        if last < lo or first > hi:
            continue
        a, b = max(first, lo) - 0.5, min(last, hi) + 0.5
        color = "#e8eef7" if n % 2 == 0 else "#f7f1e6"
        if axis == "x":
            ax.axvspan(a, b, color=color, zorder=0, lw=0)
            if last <= hi:
                ax.axvline(last + 0.5, color="#999999", ls=":", lw=1, zorder=1)
            trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
            ax.text((a + b) / 2, 0.985, f"stage {stage}", transform=trans, ha="center", va="top", fontsize=8,
                    color="#555555")
        else:
            ax.axhspan(a, b, color=color, zorder=0, lw=0)
            if last <= hi:
                ax.axhline(last + 0.5, color="#999999", ls=":", lw=1, zorder=1)
            trans = mtransforms.blended_transform_factory(ax.transAxes, ax.transData)
            ax.text(0.995, (a + b) / 2, f"stage {stage}", transform=trans, ha="right", va="center", fontsize=8,
                    color="#555555")


def cut_ticks(ax, cuts: Sequence[dict], lo: int, hi: int, axis: str = "x") -> None:
    """Tick every cut as "index name"; cuts that end a stage in bold."""
    shown = [c for c in cuts if lo <= c["index"] <= hi]
    many = len(shown) > 12
    labels = [f"{c['index']} {c['name']}" if many or axis == "y" else f"{c['index']}\n{c['name']}" for c in shown]
    if axis == "x":
        ax.set_xticks([c["index"] for c in shown])
        ax.set_xticklabels(labels, rotation=60 if many else 0, ha="right" if many else "center", fontsize=8)
        ticks = ax.get_xticklabels()
        ax.set_xlim(lo - 0.5, hi + 0.5)
    else:
        ax.set_yticks([c["index"] for c in shown])
        ax.set_yticklabels(labels, fontsize=8)
        ticks = ax.get_yticklabels()
        ax.set_ylim(lo - 0.5, hi + 0.5)
    for tick, c in zip(ticks, shown):
        if c.get("stage_end"):
            tick.set_fontweight("bold")


def short_count(v: float) -> str:
    """Tick label of a count or a time: 2k, 1.5M, 0.5."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def _log_axis(ax, values: np.ndarray) -> None:
    """Log x axis labelled 2k, 5M...: ticks at powers of ten, also at 2 and 5 times them over
    short ranges."""
    from matplotlib import ticker

    ax.set_xscale("log")
    decades = math.log10(max(values.max(), 1e-12) / max(values.min(), 1e-12))
    subs = (1.0, 2.0, 5.0) if decades < 2 else (1.0,)
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: short_count(v)))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def _headroom(ax, share: float = 0.1) -> None:
    """Room above the data for the stage labels."""
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + share * (high - low))


def _cut_dicts(spec) -> list[dict]:
    return [{"index": c.index, "name": c.name, "stage": c.stage, "stage_end": c.stage_end} for c in spec.cuts]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=130, bbox_inches="tight")
    _pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Report plots


def line_segments(trained_cuts: Iterable[int], candidate_cuts: Iterable[int]) -> list[list[int]]:
    """The trained cuts in runs of neighbours: two trained cuts share a line segment only when no
    valid cut between them went untrained (``candidate_cuts`` are the valid cuts). A trained cut
    that is not a candidate stands alone."""
    position = {cut: i for i, cut in enumerate(sorted(set(candidate_cuts)))}
    segments: list[list[int]] = []
    previous: int | None = None
    for cut in sorted(set(trained_cuts)):
        here = position.get(cut)
        if segments and here is not None and previous is not None and here == previous + 1:
            segments[-1].append(cut)
        else:
            segments.append([cut])
        previous = here
    return segments


BASELINE_SPLITS = (("val", "validation", -0.3), ("test", "test", -0.16))
"""(split, label, x offset from the baseline's cut) of the baseline points in the metric-vs-cut plot."""


def baseline_points(baselines: pd.DataFrame) -> pd.DataFrame:
    """Points of the baselines in the metric-vs-cut plot: per baseline its validation and its
    test metric (mean, sd over seeds), just left of its cut."""
    rows = [{"strategy": r["strategy"], "split": split, "label": label, "x": r["cut"] + offset,
             "mean": r[f"{split}_mean"], "sd": r[f"{split}_sd"]}
            for r in baselines.to_dict("records") for split, label, offset in BASELINE_SPLITS]
    return pd.DataFrame(rows, columns=["strategy", "split", "label", "x", "mean", "sd"])


def _plot_segments(ax, ttl: pd.DataFrame, segments: list[list[int]], split: str, offset: float, label: str,
                   **style: Any) -> None:
    """One errorbar series per run of neighbouring trained cuts, labelled once."""
    by_cut = ttl.set_index("cut")
    for k, segment in enumerate(segments):
        rows = by_cut.loc[segment]
        ax.errorbar(np.asarray(segment) + offset, rows[f"{split}_mean"], yerr=rows[f"{split}_sd"], capsize=3,
                    label=label if k == 0 else None, zorder=3, **style)


def plot_metric_vs_cut(ttl: pd.DataFrame, baselines: pd.DataFrame, cuts: list[dict], candidates: Sequence[int],
                       chosen: dict | None, metric: str, title: str, path: Path) -> Path:
    """TTL's validation and test metric per trained cut (lines only between neighbouring
    ``candidates`` that were both trained), the baselines' validation (filled) and test (hollow)
    metric, and the chosen cut."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 5.2))
    n_cuts = len(cuts)
    shade_stages(ax, cuts, 1, n_cuts)
    label = metric.upper() if metric in ("auroc", "auprc") else metric
    if len(ttl):
        segments = line_segments(ttl["cut"], candidates)
        _plot_segments(ax, ttl, segments, "val", 0.0, f"TTL, validation {label}", fmt="o-", color="#1f77b4")
        _plot_segments(ax, ttl, segments, "test", 0.12, f"TTL, test {label}", fmt="s--", color="#1f77b4",
                       mfc="white", alpha=0.8)
    for r in baseline_points(baselines).itertuples():
        ax.errorbar([r.x], [r.mean], yerr=[r.sd], fmt=BASELINE_MARKERS.get(r.strategy, "o"), color="#555555", ms=8,
                    mfc="white" if r.split == "test" else "#555555", capsize=3, zorder=4,
                    label=f"{STRATEGY_LABELS.get(r.strategy, r.strategy)} (baseline), {r.label}")
    if chosen:
        ax.axvline(chosen["cut"], color=CHOSEN_COLOR, lw=1.5, zorder=2)
        ax.plot([chosen["cut"]], [chosen["val"]], marker="*", ms=18, color=CHOSEN_COLOR, zorder=5, ls="none",
                label=f"chosen: cut {chosen['cut']} ({chosen['cut_name']})")
    cut_ticks(ax, cuts, 1, n_cuts)
    _headroom(ax)
    ax.set_xlabel("cut point (index and last kept unit; bold: ends a stage)")
    ax.set_ylabel(label)
    seeds = int(ttl["n"].max()) if len(ttl) else 0
    ax.set_title(f"{title}\nmean over {seeds} seed(s) per cut" + (", bars: ± sd" if seeds > 1 else "")
                 + "; cuts without a point were not trained by the search,\nlines join only neighbouring valid cuts "
                 "that were both trained", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    return _save(fig, path)


def plot_metric_vs_cost(rows: pd.DataFrame, chosen: dict | None, metric: str, direction: str, title: str,
                        path: Path) -> Path:
    plt = _pyplot()
    costs = [("params", "parameters"), ("macs", "MACs per image"), ("latency_batch1_ms", "latency, batch 1 (ms)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
    label = metric.upper() if metric in ("auroc", "auprc") else metric
    maximize = direction == "maximize"
    cmap = plt.get_cmap("tab10")
    for ax, (key, name) in zip(axes, costs):
        data = rows[pd.to_numeric(rows[key], errors="coerce").notna()]
        if data.empty:
            ax.text(0.5, 0.5, f"no {name} recorded", transform=ax.transAxes, ha="center")
            ax.set_xlabel(name)
            continue
        x = data[key].astype(float).to_numpy()
        y = data["val_mean"].astype(float).to_numpy()
        front = pareto_front(x, y, maximize)
        order = np.argsort(x[front])
        fx, fy = x[front][order], y[front][order]
        ax.step(fx, fy, where="post", color="black", ls="--", lw=1.2, label="Pareto front", zorder=2)
        for (r, xi, yi, on_front) in zip(data.itertuples(), x, y, front):
            edge = "black" if on_front else "none"
            trainable = (f"\n({fmt_count(r.trainable_params)} trainable)"
                         if key == "params" and partly_trainable(r.params, r.trainable_params) else "")
            if r.strategy == "ttl":
                ax.scatter([xi], [yi], color=cmap((int(r.stage) - 1) % 10), s=55, edgecolors=edge, linewidths=1.5,
                           zorder=3)
                ax.annotate(f"{r.cut}{trainable}", (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
            else:
                ax.scatter([xi], [yi], marker=BASELINE_MARKERS.get(r.strategy, "o"), color="#555555", s=70,
                           edgecolors=edge, linewidths=1.5, zorder=3)
                ax.annotate(STRATEGY_LABELS.get(r.strategy, r.strategy) + trainable, (xi, yi),
                            textcoords="offset points", xytext=(5, -3), fontsize=8, color="#555555", va="top")
        if chosen and chosen.get(key) is not None:
            ax.scatter([chosen[key]], [chosen["val"]], marker="*", s=300, facecolors="none", edgecolors=CHOSEN_COLOR,
                       linewidths=1.8, zorder=4)
        if x.min() > 0:
            _log_axis(ax, x)
        ax.set_xlabel(name + " (log scale)" if x.min() > 0 else name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation {label} (mean over seeds)")
    from matplotlib.lines import Line2D

    stages = sorted({int(s) for s in rows.loc[rows["strategy"] == "ttl", "stage"].dropna()})
    handles = [Line2D([], [], color="black", ls="--", label="Pareto front (black outline: on it)")]
    handles += [Line2D([], [], marker="o", ls="none", color=cmap((s - 1) % 10), label=f"TTL cut in stage {s} (number = cut)")
                for s in stages]
    handles += [Line2D([], [], marker=BASELINE_MARKERS.get(s, "o"), ls="none", color="#555555",
                       label=STRATEGY_LABELS.get(s, s) + " (baseline)") for s in rows["strategy"].unique() if s != "ttl"]
    if chosen:
        handles.append(Line2D([], [], marker="*", ls="none", mfc="none", mec=CHOSEN_COLOR, ms=14,
                              label=f"chosen cut {chosen['cut']} ({chosen['cut_name']})"))
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(f"{title}\nPareto front: models that no other model beats on both cost and "
                 f"{'higher' if maximize else 'lower'} validation {label}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


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


SEARCH_NOTES = {
    "two_stage": "stage 1 trains the cuts that end a stage, stage 2 the cuts inside the best stage",
    "exhaustive": "the exhaustive search trains every valid cut",
    "tpe": "Optuna's TPE picks each next cut from the results so far",
    "none": "baselines only",
}


def plot_search_order(order: pd.DataFrame, cuts: list[dict], chosen: dict | None, metric: str, title: str,
                      path: Path, search: str = "two_stage") -> Path:
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(order) + 4), 0.32 * len(cuts) + 3.2))
    shade_stages(ax, cuts, 1, len(cuts), axis="y")
    key = f"val_{metric}"
    for r in order.itertuples():
        color = PHASE_COLORS.get(r.phase, "#8c564b")
        marker = STATE_MARKERS.get(r.state, "o")
        ax.scatter([r.trial], [r.cut], color=color, marker=marker, s=90, zorder=3,
                   edgecolors=CHOSEN_COLOR if chosen and r.trial in chosen.get("trials", []) else "none", linewidths=2)
        value = getattr(r, key)
        text = f"{value:.3f}" if isinstance(value, float) and not math.isnan(value) else r.state.lower()
        if r.strategy != "ttl":
            text = f"{STRATEGY_LABELS.get(r.strategy, r.strategy)}\n{text}"
        ax.annotate(text, (r.trial, r.cut), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    # Link the search's own trials in order.
    ttl = order[order["strategy"] == "ttl"]
    ax.plot(ttl["trial"], ttl["cut"], color="#bbbbbb", lw=1, zorder=2)
    cut_ticks(ax, cuts, 1, len(cuts), axis="y")
    ax.set_ylim(0.5, len(cuts) + 0.9)  # room for the labels above the top cut
    ax.set_xticks(list(order["trial"]))
    ax.set_xlim(order["trial"].min() - 0.7, order["trial"].max() + 0.7)
    ax.set_xlabel("trial number (order in which the search asked for it)")
    ax.set_ylabel("cut trained")
    phases = list(dict.fromkeys(order["phase"]))
    handles = [Line2D([], [], marker="o", ls="none", color=PHASE_COLORS.get(p, "#8c564b"), label=f"phase {p}")
               for p in phases]
    handles += [Line2D([], [], marker=STATE_MARKERS.get(s, "o"), ls="none", color="black", label=s.lower())
                for s in dict.fromkeys(order["state"]) if s != "COMPLETE"]
    if chosen:
        handles.append(Line2D([], [], marker="o", ls="none", mfc="white", mec=CHOSEN_COLOR, mew=2,
                              label=f"chosen cut {chosen['cut']}"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"{title}\nnumbers: validation {metric} of each trial; {SEARCH_NOTES.get(search, search)}",
                 fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Artifacts


def attach_files(study: optuna.Study, cfg, url: str, paths: Sequence[Path]) -> list[str]:
    """Register files with the study's artifact store (optuna-dashboard lists them); a file
    identical to one already attached under the same name is not attached again."""
    from optuna.artifacts import get_all_artifact_meta

    from ..results import artifacts_dir
    from ..storage import attach_artifact

    base = artifacts_dir(cfg, url)
    existing = get_all_artifact_meta(study)
    ids = []
    for path in paths:
        path = Path(path)
        content = path.read_bytes()
        same = [m for m in existing if m.filename == path.name and (base / "store" / m.artifact_id).is_file()
                and (base / "store" / m.artifact_id).read_bytes() == content]
        if same:
            ids.append(same[0].artifact_id)
            continue
        mimetype = {".png": "image/png", ".md": "text/markdown", ".csv": "text/csv"}.get(path.suffix)
        ids.append(attach_artifact(base, study, path, mimetype))
    return ids


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class Report:
    """What :func:`make_report` wrote."""

    output: Path
    """Folder of the report."""
    files: dict[str, Path] = field(default_factory=dict)
    """Written files by kind."""
    results: pd.DataFrame | None = None
    """The results table (TTL's chosen cut and the baselines)."""
    artifact_ids: list[str] = field(default_factory=list)
    """Optuna artifact ids of the attached files."""


def _pm(mean: Any, sd: Any, n: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if n > 1 and sd is not None and not math.isnan(sd) else "")


def _row(cells: Sequence[str]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _ms(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def results_table(cm_all: pd.DataFrame, chosen: dict | None) -> pd.DataFrame:
    """TTL at the chosen cut, then every baseline: test metrics (mean, sd), size (parameters,
    trainable parameters, MACs) and latency."""
    rows = []
    if chosen:
        sel = cm_all[(cm_all["strategy"] == "ttl") & (cm_all["cut"] == chosen["cut"])]
        rows += [dict(r, method="TruncatedTL (chosen cut)") for r in sel.to_dict("records")]
    for r in cm_all[cm_all["strategy"] != "ttl"].to_dict("records"):
        rows.append(dict(r, method=STRATEGY_LABELS.get(r["strategy"], r["strategy"])))
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    keep = ["method", "strategy", "cut", "cut_name", "n", "seeds"] + [
        f"test_{m}{sd}" for m in TABLE_METRICS for sd in ("", "_sd")] + [
        "params", "trainable_params", "macs", "latency_batch1_ms"]
    return frame[keep]


def _markdown(name: str, cfg, study: optuna.Study, chosen: dict | None, results: pd.DataFrame, ttl: pd.DataFrame,
              order: pd.DataFrame, files: dict[str, Path]) -> str:
    metric = cfg.metric
    trials = study.get_trials(deepcopy=False)
    states = pd.Series([t.state.name for t in trials]).value_counts().to_dict()
    a = study.user_attrs
    lines = [
        f"# Study `{name}`",
        "",
        f"- Backbone `{cfg.trial.backbone}` (weights `{cfg.trial.weights}`), dataset `{cfg.trial.data.dataset}` "
        f"(size {cfg.trial.data.size}), input {cfg.trial.input_size or cfg.trial.data.size} px.",
        f"- Search `{cfg.search.method}` on validation {metric} ({cfg.resolved_direction}), "
        f"{cfg.search.repeats} seed(s) per cut; baselines: {', '.join(cfg.baselines) or 'none'}.",
        f"- Trials: {len(trials)} ({', '.join(f'{k.lower()} {v}' for k, v in states.items()) or 'none'}); "
        f"created {a.get('created', '-')} with ttl-search {a.get('ttl_search_version', '-')}.",
        "",
    ]
    if chosen:
        full = chosen.get("full_params")
        share = f" ({100 * chosen['params'] / full:.1f}% of the full model's {fmt_count(full)})" if full and chosen.get("params") else ""
        lines += [
            "## Chosen cut",
            "",
            f"Cut **{chosen['cut']}** (`{chosen['cut_name']}`, stage {chosen['stage']}): validation {metric} "
            f"{_pm(chosen['val'], chosen.get('val_sd'), chosen['n'])}, test {metric} "
            f"{_pm(chosen['test'], chosen.get('test_sd'), chosen['n'])} over seed(s) {chosen['seeds']}; "
            f"{fmt_count(chosen.get('params'))} parameters{share}"
            f"{trainable_note(chosen.get('params'), chosen.get('trainable_params'))}, "
            f"{fmt_count(chosen.get('macs'))} MACs.",
            "",
        ]
    lines += ["## Results (test split, mean ± sd over seeds)", ""]
    if results is not None and not results.empty:
        header = ["method", "cut", "seeds"] + [METRIC_HEADERS[m] for m in TABLE_METRICS] + [
            "parameters", "trainable", "MACs", "latency b1 (ms)"]
        lines += [_row(header), "|" + "---|" * len(header)]
        for r in results.to_dict("records"):
            n = int(r["n"])
            lines.append(_row([r["method"], f"{r['cut']} ({r['cut_name']})", str(n)]
                              + [_pm(r[f"test_{m}"], r[f"test_{m}_sd"], n) for m in TABLE_METRICS]
                              + [fmt_count(r["params"]), fmt_count(r["trainable_params"]), fmt_count(r["macs"]),
                                 _ms(r["latency_batch1_ms"])]))
        lines.append("")
        lines.append("Trainable: the parameters the method updates (a linear probe trains only its head). "
                     "Latency: median forward time measured after training, on the trial's device.")
    else:
        lines.append("No completed search trial or baseline yet.")
    extra = [m for m in CUT_TABLE_METRICS if m != metric]
    header = ["cut", "last unit", "stage", "seeds", f"val {metric}", f"test {metric}"] + [
        f"{split} {METRIC_HEADERS[m]}" for m in extra for split in ("val", "test")] + [
        "parameters", "trainable", "MACs", "latency b1 (ms)"]
    lines += ["", "## Every trained cut (TTL)", "", _row(header), "|" + "---|" * len(header)]
    for r in ttl.to_dict("records"):
        n = int(r["n"])
        mark = " **(chosen)**" if chosen and r["cut"] == chosen["cut"] else ""
        lines.append(_row([f"{r['cut']}{mark}", str(r["cut_name"]), str(r["stage"]), str(n),
                           _pm(r["val_mean"], r["val_sd"], n), _pm(r["test_mean"], r["test_sd"], n)]
                          + [_pm(r[f"{split}_{m}"], r[f"{split}_{m}_sd"], n)
                             for m in extra for split in ("val", "test")]
                          + [fmt_count(r["params"]), fmt_count(r["trainable_params"]), fmt_count(r["macs"]),
                             _ms(r["latency_batch1_ms"])]))
    lines += [
        "",
        "## Plots",
        "",
        f"![{metric} by cut]({files['metric_vs_cut_png'].name})",
        "",
        f"{metric} of the truncated model at each cut: validation (filled) and test (hollow), mean over seeds with "
        "± sd bars; a line joins two cuts only when they are neighbouring valid cuts and both were trained, so a "
        "break means a cut in between was not trained. Shaded bands are the backbone's stages, the red line the "
        "chosen cut, grey markers the baselines (filled: validation, hollow: test).",
        "",
        f"![{metric} vs cost]({files['metric_vs_cost_png'].name})",
        "",
        f"Validation {metric} against parameters, MACs and latency; the dashed line is the Pareto front (no other "
        "model is both cheaper and better); numbers are cut indices, and the parameters panel says how many "
        "parameters train where not all do.",
        "",
        f"![search order]({files['search_order_png'].name})",
        "",
        "Which cut the search trained when (trial order), coloured by phase.",
        "",
        "## Search order",
        "",
        f"| trial | phase | strategy | cut | state | val {metric} | note |",
        "|---|---|---|---|---|---|---|",
    ]
    key = f"val_{metric}"
    for r in order.to_dict("records"):
        v = r[key]
        lines.append(f"| {r['trial']} | {r['phase']} | {r['strategy']} | {r['cut']} ({r['cut_name']}) | "
                     f"{r['state'].lower()} | {'-' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.4f}'} | "
                     f"{r['note']} |")
    lines.append("")
    return "\n".join(lines)


def make_report(name: str, storage: str | None = None, output: str | Path | None = None,
                attach: bool = True) -> Report:
    """Plots and a Markdown summary of study ``name`` in ``output`` (default
    ``<artifacts>/<study>/report``); the plots and summary are attached to the study."""
    from ..results import artifacts_dir, best_cut, open_study, stored_candidates
    from ..models.backbones import get_backbone
    from ..storage import storage_url

    url = storage_url(storage)
    study, cfg = open_study(name, url)
    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        states = ", ".join(f"{t.number}: {t.state.name}" for t in trials) or "no trials at all"
        raise StudyError(f"study {name!r} has no completed trial ({states}); nothing to report")
    metric = cfg.metric
    spec = get_backbone(cfg.trial.backbone)
    cuts = _cut_dicts(spec)
    cm_all = cut_metrics(trials, metric, strategy=None)
    ttl = cm_all[cm_all["strategy"] == "ttl"].reset_index(drop=True)
    baselines = cm_all[cm_all["strategy"] != "ttl"].reset_index(drop=True)
    chosen = None
    try:
        best = best_cut(name, url)
    except StudyError:
        best = None
    if best is not None:
        row = ttl[ttl["cut"] == best["cut"]].iloc[0].to_dict()
        chosen = {"cut": best["cut"], "cut_name": best["cut_name"], "stage": best["stage"], "val": row["val_mean"],
                  "val_sd": row["val_sd"], "test": row["test_mean"], "test_sd": row["test_sd"], "n": int(row["n"]),
                  "seeds": row["seeds"], "trials": row["trials"], "params": row["params"], "macs": row["macs"],
                  "trainable_params": row["trainable_params"], "latency_batch1_ms": row["latency_batch1_ms"],
                  "full_params": best["full"]["params"]}
    out = Path(output) if output else artifacts_dir(cfg, url) / name / "report"
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    label = metric.upper() if metric in ("auroc", "auprc") else metric
    head = f"study {name}: {spec.name} on {cfg.trial.data.dataset}"
    files: dict[str, Path] = {}
    candidates = [c.index for c in stored_candidates(study, cfg)]
    files["metric_vs_cut_png"] = plot_metric_vs_cut(ttl, baselines, cuts, candidates, chosen, metric,
                                                    f"{head}: {label} of the model truncated at each cut",
                                                    out / "metric_vs_cut.png")
    files["metric_vs_cost_png"] = plot_metric_vs_cost(cm_all, chosen, metric, cfg.resolved_direction,
                                                      f"{head}: validation {label} against model cost",
                                                      out / "metric_vs_cost.png")
    order = search_order_rows(trials, metric)
    files["search_order_png"] = plot_search_order(order, cuts, chosen, metric,
                                                  f"{head}: search order ({cfg.search.method})",
                                                  out / "search_order.png", cfg.search.method)
    results = results_table(cm_all, chosen)
    files["results_csv"] = out / "results.csv"
    results.to_csv(files["results_csv"], index=False)
    files["cuts_csv"] = out / "cuts.csv"
    cm_all.to_csv(files["cuts_csv"], index=False)
    files["search_order_csv"] = out / "search_order.csv"
    order.to_csv(files["search_order_csv"], index=False)
    files["summary_md"] = out / "summary.md"
    files["summary_md"].write_text(_markdown(name, cfg, study, chosen, results, ttl, order, files))
    ids = []
    if attach:
        ids = attach_files(study, cfg, url, [files["metric_vs_cut_png"], files["metric_vs_cost_png"],
                                             files["search_order_png"], files["summary_md"]])
    log.info("report of study %s written to %s", name, out)
    return Report(out, files, results, ids)


# ---------------------------------------------------------------------------------------------
# SVCCA plots (for ttl_search.analysis)


def plot_svcca(units: pd.DataFrame, pairs: pd.DataFrame, coefficients: pd.DataFrame, ctx: dict[str, Any],
               out: Path) -> dict[str, Path]:
    """The three SVCCA figures: per unit with the validation metric, coefficient curves, unit pairs."""
    plt = _pyplot()
    files: dict[str, Path] = {}
    cuts = ctx["cuts"]
    for c in cuts:
        c["stage_end"] = c["index"] in ctx["stage_ends"]
    metric = ctx["metric"]
    label = metric.upper() if metric in ("auroc", "auprc") else metric
    val = {int(k): v for k, v in ctx["val_by_cut"].items()}
    hi = max([ctx["cut"]] + list(val))
    baseline_kind = ctx["options"]["baseline"]
    who = (f"study {ctx['study']}, trial {ctx['trial']} ({ctx['strategy']} at cut {ctx['cut']} {ctx['cut_name']}, "
           f"seed {ctx['seed']}), {ctx['backbone']}")
    sample = f"{ctx['images']} {ctx['split']} images; {ctx['spatial_note']}"

    # (a) + (c): pretrained vs fine-tuned per unit, validation metric on a second axis.
    fig, ax = plt.subplots(figsize=(max(9, 0.8 * hi + 3), 5.4))
    shade_stages(ax, cuts, 1, hi)
    ax.plot(units["unit"], units["svcca"], "o-", color="#1f77b4", label="SVCCA (mean coefficient)", zorder=3)
    ax.plot(units["unit"], units["cka"], "s-", color="#ff7f0e", label="linear CKA", zorder=3)
    ax.plot(units["unit"], units["baseline_svcca"], "o:", color="#1f77b4", mfc="white", alpha=0.8,
            label=f"SVCCA of unrelated features ({baseline_kind} baseline)", zorder=3)
    ax.plot(units["unit"], units["baseline_cka"], "s:", color="#ff7f0e", mfc="white", alpha=0.8,
            label=f"CKA of unrelated features ({baseline_kind} baseline)", zorder=3)
    ax.axvline(ctx["cut"], color=CHOSEN_COLOR, lw=1.2, ls="-", zorder=2,
               label=f"cut of this model ({ctx['cut']})")
    ax.set_ylim(-0.03, 1.08)
    ax.set_ylabel("similarity, pretrained vs fine-tuned\n(1 = unchanged by fine-tuning)")
    cut_ticks(ax, cuts, 1, hi)
    ax.set_xlabel("unit (cut index and name; bold: ends a stage)")
    ax2 = ax.twinx()
    if val:
        xs = sorted(val)
        ax2.errorbar(xs, [val[k]["mean"] for k in xs], yerr=[val[k]["sd"] for k in xs], fmt="^--", color="#2ca02c",
                     capsize=3, label=f"validation {label} of the model cut here (TTL)", zorder=3)
        _headroom(ax2, 0.15)
    ax2.set_ylabel(f"validation {label} (mean over seeds)", color="#2ca02c")
    ax2.tick_params(axis="y", colors="#2ca02c")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    below = -0.31 if sum(1 for c in cuts if c["index"] <= hi) > 12 else -0.17  # below rotated tick labels
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, below), ncol=2)
    ax.set_title(f"How much fine-tuning changed each kept unit\n{who}\n{sample}", fontsize=9)
    files["units_png"] = _save(fig, out / "svcca_units.png")

    # Sorted SVCCA coefficient curves.
    fig, ax = plt.subplots(figsize=(9.5, 5))
    n_units = max(1, len(units))
    tab, vir = plt.get_cmap("tab10"), plt.get_cmap("viridis")
    for k, r in enumerate(units.itertuples()):
        color = tab(k) if n_units <= 10 else vir(0.9 * k / (n_units - 1))
        sel = coefficients[(coefficients["unit"] == r.unit) & (coefficients["comparison"] == "pretrained_vs_finetuned")]
        ax.plot(sel["rank"], sel["coefficient"], "-", marker=".", color=color, label=f"{r.unit} {r.unit_name}")
        base = coefficients[(coefficients["unit"] == r.unit) & (coefficients["comparison"] != "pretrained_vs_finetuned")]
        ax.plot(base["rank"], base["coefficient"], ":", color=color, alpha=0.7,
                label=f"baseline ({baseline_kind})" if k == n_units - 1 else None)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("canonical direction (sorted, strongest first)")
    ax.set_ylabel("canonical correlation, pretrained vs fine-tuned")
    ax.grid(alpha=0.3)
    ax.legend(title="unit\n(solid: pretrained vs fine-tuned,\ndotted: unrelated features)", fontsize=7,
              title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), ncol=2 if n_units > 16 else 1)
    ax.set_title(f"SVCCA coefficients per unit (SVD keeps {ctx['options']['keep']:.0%} of the variance)\n{who}\n"
                 f"{sample}", fontsize=9)
    files["coefficients_png"] = _save(fig, out / "svcca_coefficients.png")

    # (b) unit vs unit of the fine-tuned model.
    names = [f"{r.unit} {r.unit_name}" for r in units.itertuples()]
    index = {int(u): i for i, u in enumerate(units["unit"])}
    side = 0.6 * len(names) + 2.2
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 2 * side + 1), max(4.5, side + 0.6)))
    for ax, key, title in zip(axes, ("svcca", "cka"), ("SVCCA (mean coefficient)", "linear CKA")):
        mat = np.full((len(names), len(names)), np.nan)
        for r in pairs.itertuples():
            i, j = index[int(r.unit_a)], index[int(r.unit_b)]
            mat[i, j] = mat[j, i] = getattr(r, key)
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(names)):
            for j in range(len(names)):
                if not np.isnan(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if mat[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        lo, hi_ = units[f"baseline_{key}"].min(), units[f"baseline_{key}"].max()
        scale = f"about {lo:.2f}" if f"{lo:.2f}" == f"{hi_:.2f}" else f"{lo:.2f} to {hi_:.2f}"
        ax.set_title(f"{title}\n(unrelated features score {scale})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"Similarity between units of the fine-tuned model (1 = same representation)\n{who}\n{sample}; "
                 "maps of different sizes pooled to the smaller grid" if ctx["options"]["spatial"] != "pool" else
                 f"Similarity between units of the fine-tuned model (1 = same representation)\n{who}\n{sample}",
                 fontsize=9)
    fig.tight_layout()
    files["pairs_png"] = _save(fig, out / "svcca_unit_pairs.png")
    return files
