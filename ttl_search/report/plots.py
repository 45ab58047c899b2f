"""The report's plots and the SVCCA/CKA plots of :mod:`ttl_search.analysis` (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from ..models.strategies import BASELINES, STRATEGIES
from ..search.record import fmt_count, partly_trainable
from .tables import pareto_front, spreads_overlap

STRATEGY_LABELS = {name: s.label for name, s in STRATEGIES.items()}
BASELINE_MARKERS = {name: s.marker for name, s in STRATEGIES.items() if name in BASELINES}
PHASE_COLORS = {"stage1": "#1f77b4", "stage2": "#ff7f0e", "baseline": "#7f7f7f", "tpe": "#2ca02c",
                "exhaustive": "#9467bd", "ensemble": "#17becf"}
STATE_MARKERS = {"COMPLETE": "o", "FAIL": "x", "PRUNED": "v", "RUNNING": "*", "WAITING": "."}
CHOSEN_COLOR = "#d62728"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# Plot helpers (shared with the SVCCA plots)


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
                        path: Path, budget: dict | None = None) -> Path:
    """Validation metric (with its bootstrap interval where known) against parameters, MACs and
    latency, the Pareto front, the chosen model, and ``budget``'s limits (``best``'s budget dict):
    a dashed red line, the region over it shaded."""
    plt = _pyplot()
    costs = [("params", "parameters"), ("macs", "MACs per image"),
             ("latency_batch1_ms", "latency, batch 1 (ms; median, bars: interquartile range)")]
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
        if key == "latency_batch1_ms":
            q1 = pd.to_numeric(data.get("latency_batch1_q1", pd.Series(np.nan, index=data.index)),
                               errors="coerce").to_numpy(dtype=float)
            q3 = pd.to_numeric(data.get("latency_batch1_q3", pd.Series(np.nan, index=data.index)),
                               errors="coerce").to_numpy(dtype=float)
            known = np.isfinite(q1) & np.isfinite(q3)
            if known.any():
                ax.errorbar(x[known], y[known], xerr=[x[known] - q1[known], q3[known] - x[known]], fmt="none",
                            ecolor="#999999", elinewidth=1, capsize=2, zorder=2)
            if spreads_overlap(q1[front], q3[front]):
                front = np.zeros_like(front)
                why = ("interquartile ranges overlap" if known.all() else "spread not measured (timed during "
                       "training)")
                ax.text(0.02, 0.02, f"no Pareto front: latency {why}", transform=ax.transAxes, fontsize=8,
                        color="#555555")
        if "val_ci_low" in data:
            low = pd.to_numeric(data["val_ci_low"], errors="coerce").to_numpy(dtype=float)
            high = pd.to_numeric(data["val_ci_high"], errors="coerce").to_numpy(dtype=float)
            known = np.isfinite(low) & np.isfinite(high)
            if known.any():
                ax.errorbar(x[known], y[known], yerr=[y[known] - low[known], high[known] - y[known]], fmt="none",
                            ecolor="#bbbbbb", elinewidth=1, capsize=2, zorder=1)
        limit = _budget_limit(budget, key)
        if limit is not None:
            ax.axvline(limit, color="#cc0000", ls="--", lw=1.2, zorder=2)
            ax.axvspan(limit, max(limit, float(x.max())) * 10, color="#cc0000", alpha=0.06, zorder=0)
            ax.annotate(f"budget {fmt_count(limit) if key != 'latency_batch1_ms' else f'{limit:g} ms'}", (limit, 0.02),
                        xycoords=("data", "axes fraction"), xytext=(3, 0), textcoords="offset points", fontsize=8,
                        color="#cc0000")
        if front.any():
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
        if limit is not None:
            ax.set_xlim(right=max(ax.get_xlim()[1], limit * 1.5))
        ax.set_xlabel(name + " (log scale)" if x.min() > 0 else name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation {label} (mean over seeds; bars: bootstrap interval)")
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
    if budget:
        handles.append(Line2D([], [], color="#cc0000", ls="--", label=f"budget: {budget['limits']} (shaded: over it)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(f"{title}\nPareto front: models that no other model beats on both cost and "
                 f"{'higher' if maximize else 'lower'} validation {label}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


def _budget_limit(budget: dict | None, key: str) -> float | None:
    """The budget's limit on the cost plotted as ``key`` (None when it sets none): parameters (or
    the size's equivalent in parameters, whichever is lower), MACs, batch-1 latency."""
    if not budget:
        return None
    if key == "params":
        limits = [v for v in (budget.get("params"),
                              None if budget.get("model_mb") is None else budget["model_mb"] * 1e6 / 4) if v]
        return min(limits) if limits else None
    if key == "macs":
        return budget.get("macs")
    if key == "latency_batch1_ms" and budget.get("latency_batch") == 1:
        return budget.get("latency_ms")
    return None


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
    order = order.reset_index(drop=True)
    for x, r in enumerate(order.itertuples()):
        color = PHASE_COLORS.get(r.phase, "#8c564b")
        marker = STATE_MARKERS.get(r.state, "o")
        ax.scatter([x], [r.cut], color=color, marker=marker, s=90, zorder=3,
                   edgecolors=CHOSEN_COLOR if chosen and r.trial in chosen.get("trials", []) else "none", linewidths=2)
        value = getattr(r, key)
        text = f"{value:.3f}" if isinstance(value, float) and not math.isnan(value) else r.state.lower()
        if r.strategy != "ttl":
            text = f"{STRATEGY_LABELS.get(r.strategy, r.strategy)}\n{text}"
        ax.annotate(text, (x, r.cut), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    # Link the search's own trials in order.
    ttl = order[order["strategy"] == "ttl"]
    ax.plot(ttl.index, ttl["cut"], color="#bbbbbb", lw=1, zorder=2)
    cut_ticks(ax, cuts, 1, len(cuts), axis="y")
    ax.set_ylim(0.5, len(cuts) + 0.9)  # room for the labels above the top cut
    ax.set_xticks(range(len(order)), [str(t) for t in order["trial"]], fontsize=7,
                  rotation=90 if order["trial"].map(lambda t: isinstance(t, str)).any() else 0)
    ax.set_xlim(-0.7, len(order) - 0.3)
    ax.set_xlabel("trial (in the order the study started them; baselines:N in the baselines study)")
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
