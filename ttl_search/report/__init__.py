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
from typing import Any, Sequence

import optuna
import pandas as pd
from optuna.trial import TrialState

from ..errors import StudyError
from ..search.record import ensemble_line, fmt_count, fmt_diff, fmt_interval
from ..search.samplers import search_trials
from ..storage import study_trials, trial_ref
from .plots import (
    STRATEGY_LABELS, _cut_dicts, plot_metric_vs_cost, plot_metric_vs_cut, plot_search_order, trainable_note,
)
from .tables import CUT_TABLE_METRICS, METRIC_HEADERS, TABLE_METRICS, cut_metrics, search_order_rows

log = logging.getLogger(__name__)


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


def _latency_cell(row: dict) -> str:
    """``1.234 [1.200, 1.310]``: the median batch-1 latency and its interquartile range."""
    q1, q3 = row.get("latency_batch1_q1"), row.get("latency_batch1_q3")
    spread = f" [{q1:.3f}, {q3:.3f}]" if q1 is not None and q3 is not None and q1 == q1 and q3 == q3 else ""
    return _ms(row.get("latency_batch1_ms")) + spread


def _latency_note(latency: dict | None) -> str:
    """Where and how the latency column was measured."""
    if latency:
        return (f"Latency: median forward time at batch 1 [interquartile range], {latency['repeats']} timed passes per "
                f"model, measured one model at a time after the search on {latency['device_name']}.")
    return ("Latency: measured inside each trial while other trials trained, so not comparable between cuts; "
            "`ttl-search report NAME --measure-latency` measures every model one at a time.")


def _bold_model(chosen: dict) -> str:
    """``Cut **6**`` for a fine-tuned cut, ``**frozen probe at cut 4**`` for another model."""
    return f"Cut **{chosen['cut']}**" if chosen["strategy"] == "ttl" else f"**{chosen['model']}**"


def answer_row(best: dict) -> dict:
    """The answer (``chosen_cut``'s dict: a fine-tuned cut, a frozen probe or a baseline) as a row of
    the results table."""
    row = {"strategy": best["strategy"], "cut": best["cut"], "cut_name": best["cut_name"], "n": best["repeats"],
           "seeds": best["seeds"], "params": best["params"], "trainable_params": best["trainable_params"],
           "macs": best["macs"], "latency_batch1_ms": best["latency_batch1_ms"],
           "latency_batch1_q1": (best.get("latency_batch1_iqr") or [None, None])[0],
           "latency_batch1_q3": (best.get("latency_batch1_iqr") or [None, None])[1]}
    for m in TABLE_METRICS:
        row[f"test_{m}"], row[f"test_{m}_sd"] = best["test"].get(m), best["test_sd"].get(m)
    return row


def results_table(cm_all: pd.DataFrame, chosen: dict | None) -> pd.DataFrame:
    """The answer (a fine-tuned cut, a frozen probe or a baseline), then every baseline: test metrics (mean, sd), size (parameters,
    trainable parameters, MACs) and latency."""
    rows = []
    if chosen:
        method = "TruncatedTL (chosen cut)" if chosen["strategy"] == "ttl" else f"the answer: {chosen['model']}"
        rows.append(dict(chosen["answer_row"], method=method))
    for r in cm_all[cm_all["strategy"] != "ttl"].to_dict("records"):
        if not chosen or (r["strategy"], r["cut"]) != (chosen["strategy"], chosen["cut"]):
            rows.append(dict(r, method=STRATEGY_LABELS.get(r["strategy"], r["strategy"])))
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    keep = ["method", "strategy", "cut", "cut_name", "n", "seeds"] + [
        f"test_{m}{sd}" for m in TABLE_METRICS for sd in ("", "_sd")] + [
        "params", "trainable_params", "macs", "latency_batch1_ms", "latency_batch1_q1", "latency_batch1_q3"]
    return frame[keep]


def budget_section(budget: dict | None) -> list[str]:
    """The deployment budget for the summary: every cut's cost (the latency measured before
    training included) and whether it fits; the candidates over it. Empty without a budget."""
    if not budget:
        return []
    latency = any(c["latency_ms"] is not None for c in budget["cuts"])
    header = ["cut", "name", "parameters", "MB", "MACs"] + ([f"latency b{budget['latency_batch']} (ms)"] if latency
                                                           else []) + ["budget"]
    lines = [f"## Budget: {budget['limits']}", "",
             "Cuts over budget are never trained by the search and never chosen (the baselines still train for "
             "comparison; the plot of the metric against cost marks the limits).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in budget["cuts"]:
        cells = [c["cut"], c["name"], fmt_count(c["params"]), f"{c['model_mb']:.2f}", fmt_count(c["macs"])]
        cells += [_ms(c["latency_ms"])] if latency else []
        lines.append("| " + " | ".join(map(str, cells + [c["over_budget"] or "fits"])) + " |")
    others = [o for o in budget["over_budget"] if o["strategy"] != "ttl"]
    if others:
        lines += ["", "Other candidates over budget: " + "; ".join(f"{o['model']} ({o['why']})" for o in others) + "."]
    return lines + [""]


def add_intervals(frame: pd.DataFrame, ranking: list[dict]) -> None:
    """Columns ``val_ci_low``/``val_ci_high``, ``diff`` (to the best cut), ``diff_ci_low``/``diff_ci_high``
    and ``indistinguishable`` of ``frame`` (rows by strategy and cut) from ``chosen_cut``'s ranking."""
    by_key = {(r["strategy"], r["cut"]): r for r in ranking}
    for column in ("val_ci_low", "val_ci_high", "diff", "diff_ci_low", "diff_ci_high", "indistinguishable"):
        frame[column] = None
    for i, row in frame.iterrows():
        r = by_key.get((row["strategy"], row["cut"]))
        if r is None or r["val_ci"] is None:
            continue
        frame.at[i, "val_ci_low"], frame.at[i, "val_ci_high"] = r["val_ci"]
        frame.at[i, "diff"] = r["diff"]
        frame.at[i, "diff_ci_low"], frame.at[i, "diff_ci_high"] = r["diff_ci"]
        frame.at[i, "indistinguishable"] = r["indistinguishable"]


def probe_section(study: optuna.Study, cfg, ttl: pd.DataFrame) -> list[str]:
    """The frozen probe's table beside the fine-tuned cuts' validation metric (empty when the study
    has no probe)."""
    from ..results import probe_cells, stored_probe

    table = stored_probe(study)
    if table is None:
        return []
    tuned = {int(r["cut"]): r["val_mean"] for r in ttl.to_dict("records")} if ttl is not None and not ttl.empty else {}
    header, rows = probe_cells(table, cfg.metric, tuned, cfg.selection.confidence, test=True)
    lines = ["", "## Frozen probe (one forward pass of the pretrained backbone)", "",
             f"A logistic regression on the globally pooled frozen features of every cut (C chosen by 3-fold "
             f"cross-validation on the training split), a {cfg.probe.knn_k}-nearest-neighbour score and LogME; "
             f"{len(table['rows'])} cuts in {table['seconds']:.1f} s on {table['device']} (features "
             f"{table['feature_seconds']:.1f} s). The best probe (cut {table['best_cut']}) is stored as a model "
             "of its own when the study ran the probe first.", "", _row(header), "|" + "---|" * len(header)]
    lines += [_row(cells) for cells in rows]
    return lines


def _markdown(name: str, cfg, study: optuna.Study, chosen: dict | None, results: pd.DataFrame, ttl: pd.DataFrame,
              order: pd.DataFrame, files: dict[str, Path], latency: dict | None = None) -> str:
    metric = cfg.metric
    trials = study_trials(study)
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
            f"{_bold_model(chosen)} (`{chosen['cut_name']}`, stage {chosen['stage']}): validation {metric} "
            f"{_pm(chosen['val'], chosen.get('val_sd'), chosen['n'])}, test {metric} "
            f"{_pm(chosen['test'], chosen.get('test_sd'), chosen['n'])} over seed(s) {chosen['seeds']}; "
            f"{fmt_count(chosen.get('params'))} parameters{share}"
            f"{trainable_note(chosen.get('params'), chosen.get('trainable_params'))}, "
            f"{fmt_count(chosen.get('macs'))} MACs.",
            "",
        ]
        if chosen.get("val_ci"):
            rule = ("the smallest model among the candidates statistically indistinguishable from the best"
                    if chosen["rule"] == "smallest_within_ci" else "the best mean validation metric")
            lines += [
                f"Selection rule `{chosen['rule']}` ({rule}). Validation {metric} "
                f"{chosen['confidence']:.0%} bootstrap interval (stratified, paired across candidates): "
                f"{fmt_interval(chosen['val_ci'])}. Indistinguishable from the best, "
                f"{chosen['reference']}: {', '.join(chosen['close'])}.",
                "",
            ]
            excluded = [e for e in chosen["excluded"] if not e["why"].startswith("over budget")]
            if excluded:
                lines += ["Not eligible (a guard metric significantly worse than the best's, or a model that "
                          "learned nothing):", ""] + [f"- {e['model']}: {e['why']}" for e in excluded] + [""]
        elif chosen.get("note"):
            lines += [chosen["note"], ""]
        if line := ensemble_line(chosen, metric):
            lines += [line, ""]
        lines += budget_section(chosen.get("budget"))
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
                                 _latency_cell(r)]))
        lines.append("")
        lines.append("Trainable: the parameters the method updates (a linear probe trains only its head). "
                     + _latency_note(latency))
    else:
        lines.append("No completed search trial or baseline yet.")
    extra = [m for m in CUT_TABLE_METRICS if m != metric]
    header = ["cut", "last unit", "stage", "seeds", f"val {metric}", "val interval", "vs best (paired)",
              f"test {metric}"] + [
        f"{split} {METRIC_HEADERS[m]}" for m in extra for split in ("val", "test")] + [
        "parameters", "trainable", "MACs", "latency b1 (ms)"]
    lines += ["", "## Every trained cut (TTL)", "", _row(header), "|" + "---|" * len(header)]
    for r in ttl.to_dict("records"):
        n = int(r["n"])
        mark = " **(chosen)**" if chosen and chosen["strategy"] == "ttl" and r["cut"] == chosen["cut"] else ""
        same = " (same)" if r.get("indistinguishable") is True and not mark else ""
        lines.append(_row([f"{r['cut']}{mark}", str(r["cut_name"]), str(r["stage"]), str(n),
                           _pm(r["val_mean"], r["val_sd"], n), fmt_interval([r.get("val_ci_low"), r.get("val_ci_high")]),
                           fmt_diff(r.get("diff"), [r.get("diff_ci_low"), r.get("diff_ci_high")]) + same,
                           _pm(r["test_mean"], r["test_sd"], n)]
                          + [_pm(r[f"{split}_{m}"], r[f"{split}_{m}_sd"], n)
                             for m in extra for split in ("val", "test")]
                          + [fmt_count(r["params"]), fmt_count(r["trainable_params"]), fmt_count(r["macs"]),
                             _latency_cell(r)]))
    lines += probe_section(study, cfg, ttl)
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
    ``<artifacts>/<study>/report``); the plots and summary are attached to the study. Latency
    comes from the study's quiet latency pass when it has one (``report --measure-latency``)."""
    from ..results import artifacts_dir, chosen_cut, open_study, stored_candidates, stored_latency
    from ..models.backbones import get_backbone
    from ..storage import storage_url

    url = storage_url(storage)
    study, cfg = open_study(name, url)
    trials = study_trials(study)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        states = ", ".join(f"{trial_ref(t)}: {t.state.name}" for t in trials) or "no trials at all"
        raise StudyError(f"study {name!r} has no completed trial ({states}); nothing to report")
    latency = stored_latency(study)
    metric = cfg.metric
    spec = get_backbone(cfg.trial.backbone)
    cuts = _cut_dicts(spec)
    cm_all = cut_metrics(search_trials(trials, cfg.search.repeats), metric, strategy=None, latency=latency)
    ttl = cm_all[cm_all["strategy"] == "ttl"].reset_index(drop=True)
    baselines = cm_all[cm_all["strategy"] != "ttl"].reset_index(drop=True)
    chosen = None
    best = chosen_cut(study, cfg, trials)
    if best is not None:
        chosen = {"strategy": best["strategy"], "model": best["model"], "cut": best["cut"],
                  "cut_name": best["cut_name"], "stage": best["stage"], "val": best["val"].get(metric),
                  "val_sd": best["val_sd"].get(metric), "test": best["test"].get(metric),
                  "test_sd": best["test_sd"].get(metric), "n": best["repeats"], "seeds": best["seeds"],
                  "trials": best["trials"], "params": best["params"], "macs": best["macs"],
                  "trainable_params": best["trainable_params"], "latency_batch1_ms": best["latency_batch1_ms"],
                  "full_params": best["full"]["params"], "val_ci": best["val_ci"], "rule": best["rule"],
                  "indistinguishable": best["indistinguishable"], "reference_cut": best["reference_cut"],
                  "reference": best["reference"], "close": best["close"], "excluded": best["excluded"],
                  "confidence": best["confidence"], "note": best["note"], "ensemble": best["ensemble"],
                  "answer_row": answer_row(best), "budget": best["budget"]}
        add_intervals(cm_all, best["ranking"])
        ttl = cm_all[cm_all["strategy"] == "ttl"].reset_index(drop=True)
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
    budget = (best or {}).get("budget")
    files["metric_vs_cost_png"] = plot_metric_vs_cost(cm_all, chosen, metric, cfg.resolved_direction,
                                                      f"{head}: validation {label} against model cost",
                                                      out / "metric_vs_cost.png", budget)
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
    files["summary_md"].write_text(_markdown(name, cfg, study, chosen, results, ttl, order, files, latency))
    ids = []
    if attach:
        ids = attach_files(study, cfg, url, [files["metric_vs_cut_png"], files["metric_vs_cost_png"],
                                             files["search_order_png"], files["summary_md"]])
    log.info("report of study %s written to %s", name, out)
    return Report(out, files, results, ids)
