"""Study reports: Pareto front and per-cut tables on constructed trials, and `report` on a real
debug study with baselines (plots, Markdown table, artifacts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState, create_trial

from ttl_search.errors import StudyError
from ttl_search.report import make_report
from ttl_search.report.plots import baseline_points, line_segments, plot_metric_vs_cut
from ttl_search.report.tables import cut_metrics, pareto_front, spreads_overlap
from ttl_search.results import stored_latency
from ttl_search.search.record import fmt_count, latency_row
from ttl_search.storage import study_trials, trial_ref

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Building blocks


def test_pareto_front():
    costs = [1, 2, 3, 4, 2, float("nan")]
    values = [0.5, 0.7, 0.6, 0.9, 0.7, 1.0]
    # 3 is beaten by 2 (cheaper and better); the two cost-2 points tie (neither dominates); NaN is out.
    assert pareto_front(costs, values).tolist() == [True, True, False, True, True, False]
    # Minimising (a loss): lower is better.
    assert pareto_front([1, 2, 3], [0.3, 0.2, 0.25], maximize=False).tolist() == [True, True, False]
    assert pareto_front([1, 1], [0.5, 0.4]).tolist() == [True, False]


def test_latency_spreads_decide_whether_a_front_is_drawn():
    assert not spreads_overlap([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])  # apart: a front means something
    assert spreads_overlap([1.0, 2.0], [2.1, 2.5])  # touching quartiles: the order is noise
    assert spreads_overlap([1.0, float("nan")], [1.5, float("nan")])  # a spread unknown: nothing to rule out
    assert not spreads_overlap([1.0], [9.0])


def test_report_measures_latency_on_demand(study, tmp_path, capsys):
    """`report --measure-latency` times every trained model here, one at a time, stores the table
    with the study, and the report shows the medians with their interquartile ranges."""
    from ttl_search.cli import main

    name, url = study
    assert main(["report", name, "--storage", url, "--output", str(tmp_path), "--no-attach", "--measure-latency"]) == 0
    table = stored_latency(optuna.load_study(study_name=name, storage=url))
    models = {(r["strategy"], r["cut"]) for r in table["rows"]}
    assert {("full", 7), ("linear_probe", 7)} <= models and len(models) >= 4
    md = (tmp_path / "summary.md").read_text()
    assert f"one model at a time after the search on {table['device_name']}" in md
    row = latency_row(table, "linear_probe", 7)
    assert f"{row['batch1_ms']:.3f} [{row['batch1_iqr'][0]:.3f}, {row['batch1_iqr'][1]:.3f}]" in md


def _trial(strategy: str, cut: int, seed: int, val: float, test: float, state=TrialState.COMPLETE):
    attrs = {"strategy": strategy, "cut": cut, "cut_name": f"u{cut}", "stage": 1 + (cut > 2), "seed": seed,
             "val_auroc": val, "test_auroc": test, "test_auprc": test / 2, "test_accuracy": 0.5, "params": 100 * cut,
             "val_balanced_accuracy": val / 2, "test_balanced_accuracy": test / 2, "val_f1_macro": val / 4,
             "test_f1_macro": test / 4, "trainable_params": 10 if strategy == "linear_probe" else 100 * cut,
             "macs": 1000 * cut, "latency_batch1_ms": 0.1 * cut + seed}
    return create_trial(state=state, value=val if state == TrialState.COMPLETE else None, user_attrs=attrs,
                        params={}, distributions={})


def test_cut_metrics_mean_and_sd_over_seeds():
    trials = [_trial("ttl", 2, 0, 0.70, 0.60), _trial("ttl", 2, 1, 0.80, 0.64), _trial("ttl", 3, 0, 0.5, 0.4),
              _trial("full", 3, 0, 0.9, 0.8), _trial("ttl", 1, 0, 0.99, 0.99, state=TrialState.FAIL)]
    ttl = cut_metrics(trials, "auroc")
    assert list(ttl["cut"]) == [2, 3]  # the failed trial does not count, the baseline is another strategy
    two = ttl.iloc[0]
    assert two["n"] == 2 and two["seeds"] == [0, 1]
    assert two["val_mean"] == pytest.approx(0.75) and two["val_sd"] == pytest.approx(np.std([0.7, 0.8], ddof=1))
    assert two["test_auprc"] == pytest.approx(0.31) and two["latency_batch1_ms"] == pytest.approx(0.7)
    assert two["val_balanced_accuracy"] == pytest.approx(0.375) and two["test_f1_macro"] == pytest.approx(0.155)
    assert two["val_f1_macro_sd"] == pytest.approx(np.std([0.7 / 4, 0.8 / 4], ddof=1))
    assert two["trainable_params"] == 200
    every = cut_metrics(trials, "auroc", strategy=None)
    assert set(zip(every["strategy"], every["cut"])) == {("ttl", 2), ("ttl", 3), ("full", 3)}


def test_line_segments_break_at_untrained_cuts():
    every = range(1, 8)
    # Two-stage search that trained 3, 5, 6, 7 of 7: 4 was never trained, so 3 stands alone.
    assert line_segments([3, 5, 6, 7], every) == [[3], [5, 6, 7]]
    assert line_segments([7, 1, 3, 5, 2], every) == [[1, 2, 3], [5], [7]]  # order of training does not matter
    assert line_segments([1, 2, 3, 4, 5, 6, 7], every) == [list(every)]
    # Cut 4 is not valid at this input size: 3 and 5 are neighbouring candidates.
    assert line_segments([3, 5], [1, 2, 3, 5, 6]) == [[3, 5]]
    # A trained cut that is not a candidate joins nothing.
    assert line_segments([2, 3, 4], [1, 2, 4]) == [[2], [3], [4]]
    assert line_segments([], every) == []


def test_baseline_points_have_validation_and_test():
    trials = [_trial("full", 7, 0, 0.9, 0.8), _trial("full", 7, 1, 0.7, 0.6), _trial("linear_probe", 7, 0, 0.5, 0.4)]
    points = baseline_points(cut_metrics(trials, "auroc", strategy=None))
    assert list(zip(points["strategy"], points["split"])) == [("full", "val"), ("full", "test"),
                                                             ("linear_probe", "val"), ("linear_probe", "test")]
    test = points.set_index(["strategy", "split"])
    assert test.loc[("full", "test"), "mean"] == pytest.approx(0.7)
    assert test.loc[("full", "test"), "sd"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert test.loc[("linear_probe", "test"), "mean"] == pytest.approx(0.4)
    assert (points["x"] < 7).all() and points["x"].nunique() == 2  # left of the cut, validation and test apart


def test_metric_vs_cut_plot_breaks_lines_and_draws_baseline_tests(tmp_path, monkeypatch):
    import ttl_search.report.plots as plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    trials = [_trial("ttl", c, 0, 0.5 + c / 100, 0.4 + c / 100) for c in (3, 5, 6, 7)]
    trials += [_trial("full", 7, 0, 0.9, 0.8), _trial("linear_probe", 7, 0, 0.6, 0.55)]
    frame = cut_metrics(trials, "auroc", strategy=None)
    cuts = [{"index": i, "name": f"u{i}", "stage": 1 + (i > 2), "stage_end": i in (2, 7)} for i in range(1, 8)]
    plot_metric_vs_cut(frame[frame["strategy"] == "ttl"], frame[frame["strategy"] != "ttl"], cuts, list(range(1, 8)),
                       None, "auroc", "t", tmp_path / "p.png")
    (ax,) = figures[0].axes
    drawn = [(c.get_label(), c.lines[0]) for c in ax.containers]
    ttl = {marker: [list(line.get_xdata()) for _, line in drawn
                    if line.get_color() == "#1f77b4" and line.get_marker() == marker] for marker in "os"}
    assert ttl["o"] == [[3], [5, 6, 7]]  # validation: no line from 3 to 5, cut 4 was never trained
    assert [[round(x) for x in xs] for xs in ttl["s"]] == [[3], [5, 6, 7]]  # test, drawn a little to the right
    baselines = {label: (line.get_ydata()[0], line.get_markerfacecolor()) for label, line in drawn
                 if "baseline" in label}
    assert baselines["full fine-tuning (baseline), test"][0] == pytest.approx(0.8)
    assert baselines["full fine-tuning (baseline), validation"][0] == pytest.approx(0.9)
    assert baselines["linear probe (baseline), test"] == (pytest.approx(0.55), "white")  # hollow: test


# ---------------------------------------------------------------------------------------------
# On a real study


def _png_ok(path: Path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 0.05  # not blank


def _cell(mean: float) -> str:
    return f"{mean:.4f}"


def test_report_files_table_and_artifacts(study, tmp_path):
    from optuna.artifacts import get_all_artifact_meta

    from ttl_search.results import best_cut

    name, url = study
    report = make_report(name, url, tmp_path)
    for key in ("metric_vs_cut_png", "metric_vs_cost_png", "search_order_png"):
        _png_ok(report.files[key])
    best = best_cut(name, url)
    trials = study_trials(optuna.load_study(study_name=name, storage=url))
    by_strategy = {t.user_attrs["strategy"]: t for t in trials if t.user_attrs["strategy"] != "ttl"}
    assert set(by_strategy) == {"full", "linear_probe"}

    results = pd.read_csv(report.files["results_csv"])
    assert list(results["strategy"]) == ["ttl", "full", "linear_probe"]
    assert results.loc[0, "cut"] == best["cut"]
    assert results.loc[0, "test_auroc"] == pytest.approx(best["test"]["auroc"])
    assert results.loc[0, "params"] == best["params"]
    for row in results.iloc[1:].itertuples():
        t = by_strategy[row.strategy]
        assert row.test_auroc == pytest.approx(t.user_attrs["test_auroc"])
        assert row.test_auprc == pytest.approx(t.user_attrs["test_auprc"])
        timed = latency_row(stored_latency(optuna.load_study(study_name=name, storage=url)), row.strategy, row.cut)
        assert row.latency_batch1_ms == pytest.approx(timed["batch1_ms"])  # the quiet pass's, not the trial's
        assert (row.latency_batch1_q1, row.latency_batch1_q3) == pytest.approx(timed["batch1_iqr"])

    md = report.files["summary_md"].read_text()
    assert ("| method | cut | seeds | AUROC | AUPRC | accuracy | balanced accuracy | macro F1 | parameters | "
            "trainable | MACs | latency b1 (ms) |") in md
    assert (f"| TruncatedTL (chosen cut) | {best['cut']} ({best['cut_name']}) | 1 | {_cell(best['test']['auroc'])} | "
            f"{_cell(best['test']['auprc'])} | {_cell(best['test']['accuracy'])} |") in md
    assert f"| linear probe | 7 (layer3.1) | 1 | {_cell(by_strategy['linear_probe'].user_attrs['test_auroc'])} |" in md
    probe = by_strategy["linear_probe"].user_attrs
    assert probe["trainable_params"] < probe["params"]  # only the head trains
    assert (f"| {_cell(probe['test_balanced_accuracy'])} | {_cell(probe['test_f1_macro'])} | "
            f"{fmt_count(probe['params'])} | {fmt_count(probe['trainable_params'])} |") in md
    assert results.loc[2, "trainable_params"] == probe["trainable_params"]
    assert ("| cut | last unit | stage | seeds | val auroc | val interval | vs best (paired) | test auroc | "
            "val accuracy | test accuracy | "
            "val balanced accuracy | test balanced accuracy | val macro F1 | test macro F1 | parameters | trainable | "
            "MACs | latency b1 (ms) |") in md
    chosen = next(t.user_attrs for t in trials
                  if t.user_attrs["strategy"] == "ttl" and t.user_attrs["cut"] == best["cut"])
    from ttl_search.search.record import fmt_diff, fmt_interval

    ranked = next(r for r in best["ranking"] if r["strategy"] == "ttl" and r["cut"] == best["cut"])
    assert (f"| {best['cut']} **(chosen)** | {best['cut_name']} | {best['stage']} | 1 | {_cell(chosen['val_auroc'])} | "
            f"{fmt_interval(best['val_ci'])} | {fmt_diff(ranked['diff'], ranked['diff_ci'])} | "
            f"{_cell(chosen['test_auroc'])} | "
            + " | ".join(_cell(chosen[f"{split}_{m}"]) for m in ("accuracy", "balanced_accuracy", "f1_macro")
                         for split in ("val", "test"))
            + f" | {fmt_count(chosen['params'])} | {fmt_count(chosen['trainable_params'])} |") in md
    assert f"Cut **{best['cut']}** (`{best['cut_name']}`" in md
    assert f"bootstrap interval (stratified, paired across candidates): {fmt_interval(best['val_ci'])}" in md
    for png in ("metric_vs_cut.png", "metric_vs_cost.png", "search_order.png"):
        assert f"]({png})" in md

    order = pd.read_csv(report.files["search_order_csv"])
    started = sorted(trials, key=lambda t: t.datetime_start)
    assert list(order["trial"]) == [str(trial_ref(t)) for t in started]  # the study's and its baselines', in time
    assert list(order["cut"]) == [t.user_attrs["cut"] for t in started]
    assert list(order["phase"])[:3] == ["stage1"] * 3

    attached = lambda: [m.filename for m in get_all_artifact_meta(optuna.load_study(study_name=name, storage=url))]  # noqa: E731
    names = attached()
    for filename in ("metric_vs_cut.png", "metric_vs_cost.png", "search_order.png", "summary.md"):
        assert names.count(filename) == 1, names
    make_report(name, url, tmp_path)  # the same files again: not attached twice
    assert sorted(attached()) == sorted(names)


def test_report_cli_and_errors(study, tmp_path, capsys):
    from ttl_search.cli import main

    name, url = study
    assert main(["report", name, "--storage", url, "--output", str(tmp_path), "--no-attach"]) == 0
    assert "summary.md" in capsys.readouterr().out
    assert main(["report", "nope", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no study named 'nope'" in err and "debug" in err

    cfg = dict(optuna.load_study(study_name=name, storage=url).user_attrs["config"], name="no-trials-report")
    empty = optuna.create_study(study_name="no-trials-report", storage=url, load_if_exists=True)
    empty.set_user_attr("config", cfg)
    if not empty.trials:
        empty.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"cut": 3}, params={}, distributions={}))
    with pytest.raises(StudyError, match=r"no completed trial \(0: FAIL\)"):
        make_report("no-trials-report", url, tmp_path / "empty")
