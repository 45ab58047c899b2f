"""Studies with a deployment budget (selection.budget) on a local Ray cluster: cuts over it are never
trained, the latency of every cut is measured (or read) before training and stored, the answer fits,
a budget no cut meets is refused before the study exists, and `best --budget` asks a finished study
about another budget in every format."""

from __future__ import annotations

import csv
import io
import json
import statistics

import optuna
import pytest

from studyutil import DEBUG_STUDY, cli, run_cli, trials

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = DEBUG_STUDY.parents[1]
BASE = ["--set", "trial.max_epochs=1", "--quiet"]


@pytest.fixture(scope="module")
def data_root():
    from conftest import SHARED_DATASETS

    if not (SHARED_DATASETS / "breastmnist.npz").is_file():
        pytest.skip(f"real data file {SHARED_DATASETS / 'breastmnist.npz'} is absent")
    return SHARED_DATASETS


def _run(study, name: str, url: str, data, tmp_path, *sets: str) -> int:
    args = ["run", str(study), "--storage", url, "--set", f"name={name}", "--set", f"trial.data.root={data}",
            *BASE, *[a for s in sets for a in ("--set", s)]]
    return run_cli(args, tmp_path / f"{name}.log")


def _trained_cuts(name: str, url: str) -> set[int]:
    return {t.params.get("cut", t.user_attrs.get("cut")) for t in trials(name, url)
            if t.user_attrs.get("strategy", t.params.get("strategy")) == "ttl"}


def test_a_budgeted_study_trains_only_cuts_within_it_and_best_answers_other_budgets(tmp_path, data_root):
    """params, macs and model_mb in one study file: test_cnn at 28 px has 7 cuts, 1-4 fit."""
    from ttl_search.search.study import cut_candidates, load_study_config

    every = cut_candidates(load_study_config(DEBUG_STUDY))
    fits = [c for c in every if c.params <= every[3].params and c.macs <= every[3].macs]
    assert [c.index for c in fits] == [1, 2, 3, 4]
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    rc = _run(REPO / "studies" / "budget.yaml", "b", url, data_root, tmp_path,
              "trial.backbone=test_cnn", "trial.weights=none", "trial.input_size=28", "trial.data.size=28",
              "baselines=[full]", f"selection.budget.params={every[3].params}",
              f"selection.budget.macs={every[3].macs}", f"selection.budget.model_mb={every[3].params * 4 / 1e6}",
              "selection.budget.latency_ms=null", "probe.run=false", "trial.latency_repeats=3")
    assert rc == 0, (tmp_path / "b.log").read_text()[-3000:]
    assert _trained_cuts("b", url) <= {1, 2, 3, 4}  # two-stage: stage ends 3 and 4, then inside the winner
    full = [t for t in trials("b", url) if t.user_attrs.get("strategy") == "full"]
    assert full and full[0].state.name == "COMPLETE"  # the full fine-tuning baseline still compares

    best = json.loads(cli("best", "b", "--storage", url, "--format", "json").stdout)
    assert best["cut"] in (1, 2, 3, 4)
    over = {o["cut"] for o in best["budget"]["over_budget"] if o["strategy"] == "ttl"}
    assert over == {5, 6, 7} and ("full", 7) in {(o["strategy"], o["cut"]) for o in best["budget"]["over_budget"]}
    assert all("over budget: params" in c["over_budget"] for c in best["budget"]["cuts"] if c["cut"] >= 5)
    shown = cli("best", "b", "--storage", url)
    assert "budget params <= " in shown.stdout and "over budget: params" in shown.stdout
    status = cli("status", "b", "--storage", url)
    assert status.returncode == 0 and "over budget: params" in status.stdout
    report = cli("report", "b", "--storage", url, "--output", tmp_path / "report", "--no-attach")
    assert report.returncode == 0, report.stderr
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "## Budget: params <= " in summary and "| 5 | " in summary and "over budget: params" in summary
    assert (tmp_path / "report" / "metric_vs_cost.png").stat().st_size > 10_000

    # another budget, asked of the finished study: the latency its quiet pass measured after the search
    lat = {r["cut"]: r["batch1_ms"] for r in optuna.load_study(study_name="b", storage=url).user_attrs["latency"]["rows"]
           if r["strategy"] == "ttl"}
    limit = sorted(lat.values())[0] * 1.0001
    fastest = min(lat, key=lat.get)
    for fmt in ("table", "json", "csv", "markdown"):
        proc = cli("best", "b", "--storage", url, "--budget", f"latency_ms={limit}", "--format", fmt)
        assert proc.returncode == 0, proc.stderr
        if fmt == "json":
            asked = json.loads(proc.stdout)
            assert asked["cut"] == fastest and asked["budget"]["unconstrained"]["model"] == best["model"]
            assert asked["budget"]["unconstrained"]["diff_ci"] is not None
        elif fmt == "csv":
            row = next(csv.DictReader(io.StringIO(proc.stdout)))
            assert int(row["cut"]) == fastest and row["unconstrained"] == best["model"]
        elif fmt == "markdown":
            assert "diff_to_unconstrained" in proc.stdout
        else:
            assert f"without it the study's answer is {best['model']}" in proc.stdout
    refused = cli("best", "b", "--storage", url, "--budget", "params=10")
    assert refused.returncode != 0 and "no model of the study meets selection.budget (params <= 10)" in refused.stderr


def test_a_latency_budget_times_every_cut_before_training(tmp_path, data_root):
    """latency_ms without a table: the driver times every cut at study start and stores the table;
    with a table measured by `cutoffs --measure-latency` the study reads it instead."""
    url = f"sqlite:///{tmp_path / 'latency.db'}"
    rc = _run(DEBUG_STUDY, "measured", url, data_root, tmp_path, "selection.budget.latency_ms=1000",
              "selection.budget.latency_batch=64")
    assert rc == 0, (tmp_path / "measured.log").read_text()[-3000:]
    study = optuna.load_study(study_name="measured", storage=url)
    table = study.user_attrs["cut_latency"]
    assert table["source"] == "measured at study start" and len(table["rows"]) == 7 and table["batches"] == [64]
    assert all(r["batch64_ms"] > 0 for r in table["rows"])
    stored = study.user_attrs["cut_candidates"]
    assert [c["latency_ms"] for c in stored] == [r["batch64_ms"] for r in table["rows"]]
    shown = cli("best", "measured", "--storage", url)
    assert "latency b64 (ms)" in shown.stdout

    path = tmp_path / "latency.json"
    proc = cli("cutoffs", "test_cnn", "--input-size", "28", "--measure-latency", "--latency-repeats", "5",
               "--format", "json")
    path.write_text(proc.stdout)
    times = {r["index"]: r["latency_batch1_ms"] for r in json.loads(proc.stdout)}
    limit = statistics.median(times.values())
    fit = {c for c, ms in times.items() if ms <= limit}
    rc = _run(DEBUG_STUDY, "table", url, data_root, tmp_path, f"selection.budget.latency_ms={limit}",
              f"selection.budget.latency_table={path}")
    assert rc == 0, (tmp_path / "table.log").read_text()[-3000:]
    assert _trained_cuts("table", url) <= fit
    table = optuna.load_study(study_name="table", storage=url).user_attrs["cut_latency"]
    assert table["source"] == str(path)


def test_a_budget_no_cut_meets_is_refused_before_the_study_exists(tmp_path, data_root):
    url = f"sqlite:///{tmp_path / 'refused.db'}"
    proc = cli("run", DEBUG_STUDY, "--storage", url, "--set", "name=small", "--set", f"trial.data.root={data_root}",
               "--set", "selection.budget.params=100", "--quiet")
    assert proc.returncode != 0
    assert "no cut of test_cnn meets selection.budget (params <= 100): the smallest, cut 1 (stem), has 250 " \
           "parameters" in proc.stderr
    from ttl_search.storage import open_storage, study_names

    assert study_names(open_storage(url)) == []
