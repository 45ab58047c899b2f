"""Benchmark: every search method against exhaustive search, on real data.

For each task in ``benchmarks/tasks/`` (an exhaustive study file: every valid cut, three seeds,
plus full fine-tuning and a linear probe), the study is run, or resumed, or reused from the
database; the frozen probe's table (every cut's probe model) is computed once and stored with it.
Then each search method is *replayed* on its stored trials, once per seed, without training again
(see :mod:`ttl_search.analysis.replay`): two-stage (top_k 1 and 2), TPE with budgets 5 and 8,
probe-guided search (budgets 3 and 5), and exhaustive itself. Every method runs the probe as a
default study does (its models are candidates for the answer, its seconds count as compute) and is
replayed under the default selection and rule ``best``; the default method (two-stage, top_k 1)
and exhaustive also under the selection variants the default was chosen from (no guard, other
guards, and the fine-tuned cuts alone without guards: the selection before the probe's models and
guards were candidates).

Printed per task and as a summary: trainings, their share of exhaustive's compute seconds, the
pick on each seed, its validation metric with its interval, its test metric and accuracy, the
regret (test metric lost) against exhaustive's pick and against the test oracle, and how often the
pick is statistically indistinguishable from exhaustive's (paired bootstrap on validation). The
test split decides nothing; it only measures. Then per task the default answer (two-stage, the
default selection; mean over seeds, with its test interval) next to full fine-tuning, the linear
probe, the best frozen probe (chosen on validation), the majority class and MedMNIST v2's
ResNet-18, and the goal line: the answer not significantly below full fine-tuning, the best frozen
probe and ResNet-18 on test AUROC (each within or below the answer's interval), and above the
majority class on accuracy. Also the exhaustive study's own answer over all seeds. Writes CSV
files and a PNG to --out.

    python benchmarks/search_quality.py                    # real runs (hours on a 2-core CPU)
    python benchmarks/search_quality.py --quick            # 2 seeds, 2 epochs, small subsets: < 20 min
    python benchmarks/search_quality.py --replay-only      # only replay studies already stored
    python benchmarks/search_quality.py --replay-only --reprobe   # ... after probing them again

Data: ``--data`` (default ``$TTL_SEARCH_DATA`` or ``../shared/datasets``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from ttl_search.analysis.replay import Method, indistinguishable, oracle_cut, replay, seeds_of
from ttl_search.errors import TTLSearchError
from ttl_search.results import best_cut, open_study, stored_candidates, stored_probe, stored_probe_models, study_sampler
from ttl_search.search.answer import trial_evidence
from ttl_search.search.record import SEARCH_STRATEGY, completed_by_cut, mean_sd, model_name, records, summarize_cut
from ttl_search.search.selection import score_candidates
from ttl_search.search.study import load_study_config
from ttl_search.storage import open_storage, study_names, study_trials

HERE = Path(__file__).resolve().parent
TASKS = sorted(p.stem for p in (HERE / "tasks").glob("*.yaml"))
METHODS = (
    Method("exhaustive", {"method": "exhaustive"}),
    Method("two_stage k=1", {"method": "two_stage", "top_k": 1}),
    Method("two_stage k=2", {"method": "two_stage", "top_k": 2}),
    Method("tpe budget 5", {"method": "tpe", "budget": 5}),
    Method("tpe budget 8", {"method": "tpe", "budget": 8}),
    Method("guided budget 3", {"method": "guided", "budget": 3, "initial": 1}),
    Method("guided budget 5", {"method": "guided", "budget": 5, "initial": 2}),
    Method("guided budget 5 logme", {"method": "guided", "budget": 5, "initial": 2, "guide": "logme"}),
)
"""The methods replayed; each reads the frozen probe table stored with the exhaustive study
(computed once by :func:`ensure_probe`, its seconds counted as their compute)."""
DEFAULT_METHOD = "two_stage k=1"
"""The default study's search (``search.method: two_stage``, ``top_k: 1``)."""
SELECTIONS = {
    "default": ({}, None),
    "best": ({"rule": "best"}, None),
    "no guard": ({"guards": []}, None),
    "guards bacc+loss": ({"guards": ["balanced_accuracy", "loss"]}, None),
    "guard loss": ({"guards": ["loss"]}, None),
    "ttl only (before)": ({"candidates": "ttl", "guards": []}, False),
}
"""Selection variants: (``selection`` overrides, ``probe.run``: None as a default study, False for
the selection before the probe's models were candidates). ``default`` and ``best`` are replayed
with every method, the others with the default method and exhaustive."""
QUICK = ["trial.max_epochs=2", "trial.early_stopping=0", "trial.latency_repeats=0", "search.repeats=2"]
QUICK_FRACTION = 0.2
"""--quick: two seeds, two epochs on at most a fifth of the training images (the replay is unchanged)."""
REFERENCE = {"breastmnist": (0.901, 0.863), "pneumoniamnist": (0.944, 0.854), "retinamnist": (0.717, 0.524)}
"""MedMNIST v2's ResNet-18 (28 px) test AUROC and accuracy: the external yardstick."""

log = logging.getLogger("search_quality")


def ensure_study(task: str, storage: str, quick: bool, replay_only: bool) -> str:
    """The task's exhaustive study in ``storage``: reused when finished, resumed when not, run when absent."""
    overrides = list(QUICK) if quick else []
    cfg = load_study_config(HERE / "tasks" / f"{task}.yaml", overrides)
    if quick:
        cfg.name += "-quick"
        cfg.trial.data.train_fraction = min(cfg.trial.data.train_fraction, QUICK_FRACTION)
    cfg.storage = storage
    if cfg.name in study_names(open_storage(storage)):
        study, stored = open_study(cfg.name, storage)
        trials = study_trials(study)
        if study_sampler(study, stored).plan(trials).action == "finished" or replay_only:
            print(f"{task}: reusing study {cfg.name} ({len(trials)} trials)", flush=True)
            return cfg.name
        from ttl_search.run.driver import resume_study

        print(f"{task}: resuming study {cfg.name}", flush=True)
        resume_study(cfg.name, storage)
        return cfg.name
    if replay_only:
        raise TTLSearchError(f"--replay-only: study {cfg.name} is not in {storage}")
    from ttl_search.run.driver import run_study

    print(f"{task}: running study {cfg.name} (exhaustive, {cfg.search.repeats} seeds per cut)", flush=True)
    start = time.time()
    run_study(cfg)
    print(f"{task}: study {cfg.name} took {time.time() - start:.0f} s", flush=True)
    return cfg.name


def ensure_probe(task: str, name: str, storage: str, again: bool = False) -> dict[str, Any]:
    """The exhaustive study's frozen-probe table: stored once (computed here when missing, or
    ``again``: replacing the stored one after the probe changed), so that replays are exact."""
    from ttl_search.results import PROBE_ATTR
    from ttl_search.run.driver import probe_study

    study, cfg = open_study(name, storage)
    if again and stored_probe(study) is not None:
        study.set_user_attr(PROBE_ATTR, None)  # probe_study stores a new table (and predictions, heads)
    table = stored_probe(study)
    if table is None:
        print(f"{task}: probing every cut of {cfg.trial.backbone} for study {name}", flush=True)
        cfg.storage = storage
        _, table, _ = probe_study(cfg)
        print(f"{task}: probe took {table['seconds']:.1f} s (features {table['feature_seconds']:.1f} s, "
              f"{table['peak_feature_mb']:.1f} MB of pooled features)", flush=True)
    return table


def replay_task(task: str, name: str, storage: str) -> list[dict[str, Any]]:
    """One row per (method, selection, seed)."""
    study, cfg = open_study(name, storage)
    trials = study_trials(study)
    candidates = stored_candidates(study, cfg)
    probe = stored_probe(study)
    models = stored_probe_models(study)
    sign = 1.0 if cfg.resolved_direction == "maximize" else -1.0
    rows = []
    for label, (selection, runs_probe) in SELECTIONS.items():
        methods = [m for m in METHODS if label in ("default", "best") or m.label in ("exhaustive", DEFAULT_METHOD)]
        for seed in seeds_of(trials):
            oracle, oracle_test = oracle_cut(trials, cfg, seed)
            results = {m.label: replay(trials, cfg, candidates, Method(m.label, m.search, selection, runs_probe),
                                       seed, probe, models) for m in methods}
            exh = results["exhaustive"]
            for method, r in results.items():
                rows.append({
                    "task": task, "study": name, "method": method, "rule": label, "seed": seed,
                    "trainings": r.trainings, "of": len(candidates), "compute_s": r.compute_s,
                    "compute_share": r.compute_s / exh.compute_s if exh.compute_s else None,
                    "pick": _pick_label(r.strategy, r.pick), "params": r.params, "val": r.val,
                    "val_ci_low": r.val_ci[0] if r.val_ci else None, "val_ci_high": r.val_ci[1] if r.val_ci else None,
                    "test": r.test, "test_ci_low": r.test_ci[0] if r.test_ci else None,
                    "test_ci_high": r.test_ci[1] if r.test_ci else None, "test_accuracy": r.test_accuracy,
                    "exhaustive_pick": _pick_label(exh.strategy, exh.pick), "oracle_cut": oracle,
                    "regret_vs_exhaustive": sign * (exh.test - r.test) if None not in (exh.test, r.test) else None,
                    "regret_vs_oracle": sign * (oracle_test - r.test) if r.test is not None else None,
                    "indistinguishable_from_exhaustive": (indistinguishable(trials, cfg, seed, r.key, exh.key, models)
                                                          if None not in (r.pick, exh.pick) else False),
                    "trained": " ".join(map(str, r.trained)),
                })
    return rows


BUDGETS = {
    "params 10%": lambda full: {"params": round(0.10 * full.params)},
    "params 30%": lambda full: {"params": round(0.30 * full.params)},
    "latency 50%": lambda full: {"latency_ms": round(0.50 * full.latency_ms, 4)},
}
"""Deployment budgets replayed, as shares of the full model's parameters or batch-1 latency."""
BUDGET_METHODS = ("exhaustive", DEFAULT_METHOD, "tpe budget 5", "guided budget 5")
"""The methods replayed under each budget (against exhaustive under the same budget)."""


def ensure_cut_latency(task: str, study, cfg) -> dict[str, Any]:
    """The batch-1 latency of every cut of the task's study, timed once here as a latency budget's
    pre-training pass times them (one cut at a time, a trial's threads) and stored with the study."""
    from ttl_search.run.latency import measure_study_cuts
    from ttl_search.search.budget import LATENCY_TABLE_ATTR

    table = study.user_attrs.get(LATENCY_TABLE_ATTR)
    if not table:
        cuts = [c.index for c in stored_candidates(study, cfg)]
        print(f"{task}: timing {len(cuts)} cuts of {cfg.trial.backbone} for the latency budget", flush=True)
        table = measure_study_cuts(cfg, cuts)
        study.set_user_attr(LATENCY_TABLE_ATTR, table)
    return table


def budget_rows(task: str, name: str, storage: str) -> list[dict[str, Any]]:
    """One row per (budget, method, seed): what the method trained (and how many of those cuts were
    over budget: the goal is none), its compute against exhaustive under the same budget, its pick,
    the regret against exhaustive-under-budget's pick on test, and whether the two picks are
    indistinguishable on validation (paired)."""
    from ttl_search.results import budget_view
    from ttl_search.search.budget import BudgetConfig, feasible

    study, cfg = open_study(name, storage)
    table = ensure_cut_latency(task, study, cfg)
    trials = study_trials(study)
    probe, models = stored_probe(study), stored_probe_models(study)
    every = stored_candidates(study, cfg)
    full = max(every, key=lambda c: c.index)
    full_ms = next(r["batch1_ms"] for r in table["rows"] if r["cut"] == full.index)
    sign = 1.0 if cfg.resolved_direction == "maximize" else -1.0
    methods = [m for m in METHODS if m.label in BUDGET_METHODS]
    rows = []
    for label, limits in BUDGETS.items():
        budget = BudgetConfig(**limits(replace(full, latency_ms=full_ms)))
        bcfg, candidates = budget_view(study, cfg, budget)
        fits = {c.index for c in feasible(candidates)}
        for seed in seeds_of(trials):
            results = {m.label: replay(trials, bcfg, candidates, m, seed, probe, models) for m in methods}
            exh = results["exhaustive"]
            for method, r in results.items():
                rows.append({
                    "task": task, "budget": label, "limits": budget.describe(), "feasible_cuts": len(fits),
                    "of": len(every), "method": method, "seed": seed, "trainings": r.trainings,
                    "over_budget_trained": sum(1 for c in r.trained if c not in fits),
                    "compute_share": r.compute_s / exh.compute_s if exh.compute_s else None,
                    "pick": _pick_label(r.strategy, r.pick), "params": r.params, "val": r.val, "test": r.test,
                    "test_accuracy": r.test_accuracy, "exhaustive_pick": _pick_label(exh.strategy, exh.pick),
                    "regret_vs_exhaustive": sign * (exh.test - r.test) if None not in (exh.test, r.test) else None,
                    "indistinguishable_from_exhaustive": (indistinguishable(trials, bcfg, seed, r.key, exh.key, models)
                                                          if None not in (r.pick, exh.pick) else False),
                })
    return rows


def budget_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per (task, budget, method): means over seeds, infeasible trainings, picks, and the share of
    picks indistinguishable from exhaustive-under-budget's."""
    frame = pd.DataFrame(rows)
    out = []
    for (task, budget, method), g in frame.groupby(["task", "budget", "method"], sort=False):
        out.append({
            "task": task, "budget": g["limits"].iloc[0], "fits": f"{g['feasible_cuts'].iloc[0]}/{g['of'].iloc[0]}",
            "method": method, "trainings": _mean(g["trainings"]), "over_budget": int(g["over_budget_trained"].sum()),
            "compute": _mean(g["compute_share"]), "picks": ",".join(str(p) for p in g["pick"]),
            "test": _mean(g["test"]), "test_acc": _mean(g["test_accuracy"]),
            "regret_exh": _mean(g["regret_vs_exhaustive"]),
            "same_as_exh": f"{int(g['indistinguishable_from_exhaustive'].sum())}/{len(g)}",
        })
    return pd.DataFrame(out)


def _pick_label(strategy: str, cut: int | None) -> str:
    """A pick in the tables: ``6`` (a fine-tuned cut), ``p4`` (the frozen probe at cut 4), ``full18``."""
    if cut is None:
        return "-"
    return str(cut) if strategy == SEARCH_STRATEGY else {"probe": "p", "linear_probe": "lp"}.get(strategy, strategy) + str(cut)


def _mean(values) -> float | None:
    return mean_sd(values)[0]


def task_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per (method, selection): means over seeds, the picks, and the indistinguishable share."""
    frame = pd.DataFrame(rows)
    out = []
    for (method, rule), g in frame.groupby(["method", "rule"], sort=False):
        out.append({
            "method": method, "selection": rule, "trainings": _mean(g["trainings"]),
            "compute": _mean(g["compute_share"]), "picks": ",".join(str(p) for p in g["pick"]),
            "val": _mean(g["val"]), "val_ci": _ci(g, "val"),
            "test": _mean(g["test"]), "test_acc": _mean(g["test_accuracy"]),
            "regret_exh": _mean(g["regret_vs_exhaustive"]),
            "regret_oracle": _mean(g["regret_vs_oracle"]),
            "same_as_exh": f"{int(g['indistinguishable_from_exhaustive'].sum())}/{len(g)}",
        })
    return pd.DataFrame(out)


def summary_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per (method, rule) over every task and seed."""
    frame = pd.DataFrame(rows)
    out = []
    for (method, rule), g in frame.groupby(["method", "rule"], sort=False):
        out.append({
            "method": method, "selection": rule, "tasks": g["task"].nunique(), "replays": len(g),
            "trainings": _mean(g["trainings"]), "of": _mean(g["of"]), "compute": _mean(g["compute_share"]),
            "regret_exh": _mean(g["regret_vs_exhaustive"]), "max_regret_exh": g["regret_vs_exhaustive"].max(),
            "regret_oracle": _mean(g["regret_vs_oracle"]),
            "same_as_exh": f"{int(g['indistinguishable_from_exhaustive'].sum())}/{len(g)}",
            "pick_stable": f"{_stable(g)}/{g['task'].nunique()}",
        })
    return pd.DataFrame(out)


def _ci(g: pd.DataFrame, split: str) -> str:
    """The mean interval of ``split`` over the rows of ``g``."""
    low, high = _mean(g[f"{split}_ci_low"]), _mean(g[f"{split}_ci_high"])
    return "-" if low is None or high is None else f"[{low:.3f}, {high:.3f}]"


def _stable(g: pd.DataFrame) -> int:
    """Tasks on which every seed picked the same cut."""
    return int(sum(1 for _, t in g.groupby("task") if t["pick"].nunique() == 1))


def study_answer_rows(task: str, name: str, storage: str) -> list[dict[str, Any]]:
    """The exhaustive study's own answer over all seeds and the baselines: validation and test
    means, test accuracy, and the bootstrap interval of the test metric (the same resampling as
    validation's)."""
    study, cfg = open_study(name, storage)
    trials = study_trials(study)
    best = best_cut(name, storage)
    evidence, _ = trial_evidence(trials, "test")
    test_scores = score_candidates(evidence, cfg.metric, cfg.resolved_direction, cfg.selection) if evidence else {}
    rows = [{"task": task, "model": f"answer: {best['model']}", "rule": best["rule"], "seeds": best["repeats"],
             "params": best["params"], "val": best["val"].get(cfg.metric), "val_ci": _fmt_ci(best["val_ci"]),
             "test": best["test"].get(cfg.metric), "test_sd": best["test_sd"].get(cfg.metric),
             "test_ci": _fmt_ci(test_scores[key].ci) if (key := (best["strategy"], best["cut"])) in test_scores else "",
             "test_acc": best["test"].get("accuracy")}]
    for (strategy, cut), group in completed_by_cut(records(trials)).items():
        if strategy == SEARCH_STRATEGY:
            continue
        summary = summarize_cut(group)
        ts = test_scores.get((strategy, cut))
        rows.append({"task": task, "model": model_name(strategy, cut), "rule": "", "seeds": summary.repeats,
                     "params": summary.params, "val": summary.val.get(cfg.metric), "val_ci": "",
                     "test": summary.test.get(cfg.metric), "test_sd": summary.test_sd.get(cfg.metric),
                     "test_ci": _fmt_ci(ts.ci) if ts else "", "test_acc": summary.test.get("accuracy")})
    return rows


def _labels(trials, split: str) -> np.ndarray:
    """The ``split`` labels, as the study's first trial with stored predictions has them."""
    evidence, _ = trial_evidence(trials, split)
    return next(iter(evidence.values())).folds[0][0]


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def goal_row(task: str, name: str, storage: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The default answer (the default method under the default selection, mean over seeds) next to
    full fine-tuning, the linear probe, the best frozen probe, the majority class and MedMNIST v2's
    ResNet-18, with the goals: not significantly below full fine-tuning, the best frozen probe and
    ResNet-18 on the test metric (each at most the upper end of the answer's mean test interval), and
    a test accuracy above the majority class's share."""
    study, cfg = open_study(name, storage)
    trials = study_trials(study)
    answer = pd.DataFrame([r for r in rows if r["method"] == DEFAULT_METHOD and r["rule"] == "default"])
    test, high = _mean(answer["test"]), _mean(answer["test_ci_high"])
    groups = completed_by_cut(records(trials))
    base = {s: summarize_cut(g) for (s, _), g in groups.items() if s in ("full", "linear_probe")}
    models = stored_probe_models(study)
    probe = next((r for r in (stored_probe(study) or {}).get("rows", []) if r.get("best")), None)
    probe_acc = None
    if probe is not None and models is not None:
        labels, probs = models.evidence("test")[("probe", int(probe["cut"]))].folds[0]
        probe_acc = float((probs[0].argmax(axis=1) == labels).mean())
    val_labels, test_labels = (_labels(trials, split) for split in ("val", "test"))
    majority = float((test_labels == np.bincount(val_labels).argmax()).mean())  # the validation's majority class
    ref_auc, ref_acc = REFERENCE.get(cfg.trial.data.dataset, (None, None))
    full = base.get("full")
    linear = base.get("linear_probe")

    def at_least(other: float | None) -> str:
        if other is None or test is None:
            return "-"
        return "yes" if test >= other else ("within" if other <= high else "NO")

    return {
        "task": task, "picks": ",".join(answer["pick"].astype(str)), "answer": test,
        "answer_ci": _ci(answer, "test"), "answer_acc": _mean(answer["test_accuracy"]),
        "full_ft": full.test.get(cfg.metric) if full else None, "full_acc": full.test.get("accuracy") if full else None,
        "linear_probe": linear.test.get(cfg.metric) if linear else None,
        "best_probe": probe["probe_test"] if probe else None, "probe_cut": probe["cut"] if probe else None,
        "probe_acc": probe_acc, "majority_acc": majority, "resnet18": ref_auc, "resnet18_acc": ref_acc,
        ">=full": at_least(full.test.get(cfg.metric) if full else None),
        ">=probe": at_least(probe["probe_test"] if probe else None),
        ">majority": "yes" if _mean(answer["test_accuracy"]) > majority else "NO",
        ">=resnet18": at_least(ref_auc),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Compute share against regret to the test oracle, one panel per task, one marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(rows)
    frame = frame[frame["rule"] == "default"]
    tasks = list(dict.fromkeys(frame["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(7.0, 5.0 * len(tasks)), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, g in frame[frame["task"] == task].groupby("method", sort=False):
            ax.scatter(g["compute_share"], g["regret_vs_oracle"], label=method, alpha=0.7)
        ax.set_title(task)
        ax.set_xlabel("share of exhaustive compute")
        ax.set_ylabel("test regret vs oracle cut")
        ax.axhline(0, color="gray", lw=0.5)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("search methods replayed on exhaustive studies\n(default selection; one point per seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(frame: pd.DataFrame) -> str:
    return tabulate(frame, headers="keys", tablefmt="github", showindex=False, floatfmt=".3f")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS, help="tasks (default: all)")
    parser.add_argument("--storage", default=None,
                        help="study database (default: sqlite:///<out>/search_quality.db)")
    parser.add_argument("--out", default=str(HERE / "out"), help="folder for the database, CSV and PNG")
    parser.add_argument("--data", default=os.environ.get("TTL_SEARCH_DATA", str(HERE.parents[1] / "shared" / "datasets")),
                        help="MedMNIST folder")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs, at most a fifth of the training data")
    parser.add_argument("--replay-only", action="store_true", help="replay stored studies, train nothing")
    parser.add_argument("--reprobe", action="store_true",
                        help="compute each study's frozen probe again, replacing the stored table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ["TTL_SEARCH_DATA"] = str(Path(args.data).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{(out / 'search_quality.db').resolve()}"
    suffix = "_quick" if args.quick else ""
    rows: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    goals: list[dict[str, Any]] = []
    budgets: list[dict[str, Any]] = []
    try:
        for task in args.tasks:
            name = ensure_study(task, storage, args.quick, args.replay_only)
            ensure_probe(task, name, storage, args.reprobe)
            task_rows = replay_task(task, name, storage)
            budgets += budget_rows(task, name, storage)
            rows += task_rows
            answers += study_answer_rows(task, name, storage)
            goals.append(goal_row(task, name, storage, task_rows))
            print(f"\n## {task} ({name}): replays per seed, means over seeds\n\n{_fmt(task_table(task_rows))}\n",
                  flush=True)
    except TTLSearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summary_table(rows)
    print(f"\n## summary over {len(args.tasks)} task(s)\n\n{_fmt(summary)}\n")
    print(f"## each exhaustive study's own answer (all seeds) and its baselines\n\n{_fmt(pd.DataFrame(answers))}\n")
    print(f"## the default answer ({DEFAULT_METHOD}, default selection; mean over seeds) against the goals\n\n"
          f"{_fmt(pd.DataFrame(goals))}\n")
    print(f"## deployment budgets (selection.budget): each method against exhaustive under the same budget\n\n"
          f"{_fmt(budget_table(budgets))}\n")
    pd.DataFrame(budgets).to_csv(out / f"search_quality_budgets{suffix}.csv", index=False)
    pd.DataFrame(rows).to_csv(out / f"search_quality{suffix}.csv", index=False)
    summary.to_csv(out / f"search_quality_summary{suffix}.csv", index=False)
    pd.DataFrame(answers).to_csv(out / f"search_quality_answers{suffix}.csv", index=False)
    pd.DataFrame(goals).to_csv(out / f"search_quality_goals{suffix}.csv", index=False)
    plot(rows, out / f"search_quality{suffix}.png")
    print(f"wrote {out}/search_quality{suffix}.csv, search_quality_summary{suffix}.csv, "
          f"search_quality_answers{suffix}.csv, search_quality_goals{suffix}.csv, "
          f"search_quality_budgets{suffix}.csv and search_quality{suffix}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
