"""Replaying search methods on an exhaustive study's stored trials (no training)."""

from __future__ import annotations

import pytest

from studyutil import DEBUG_STUDY, synthetic_study
from ttl_search.analysis.replay import Method, indistinguishable, oracle_cut, replay, seeds_of
from ttl_search.search.answer import study_answer
from ttl_search.search.samplers import TwoStageSampler
from ttl_search.search.study import load_study_config, make_sampler

STRENGTH = {1: 0.2, 2: 0.4, 3: 0.8, 4: 1.6, 5: 3.0, 6: 1.2, 7: 1.0}


def exhaustive(seeds: int = 2):
    cfg = load_study_config(DEBUG_STUDY, ["search.method=exhaustive", f"search.repeats={seeds}"])
    study, candidates = synthetic_study(cfg, STRENGTH, seeds=seeds, n_pos=150, n_neg=150)
    return study.trials, cfg, candidates


def test_exhaustive_replay_is_the_study_itself_on_one_seed():
    trials, cfg, candidates = exhaustive()
    assert seeds_of(trials) == [0, 1]
    r = replay(trials, cfg, candidates, Method("exhaustive", {"method": "exhaustive"}), repeat=1)
    assert sorted(r.trained) == [c.index for c in candidates]
    assert r.compute_s == sum(10.0 * c.index for c in candidates)
    seed1 = [t for t in trials if t.params.get("repeat", 0) == 1]
    assert r.pick == study_answer(seed1, cfg, candidates).pick == 5
    assert r.val == next(t.value for t in seed1 if t.params["cut"] == 5)
    low, high = r.val_ci
    assert low < r.val < high and r.test is not None


def test_two_stage_replay_trains_the_stage_ends_then_the_winning_stage():
    trials, cfg, candidates = exhaustive()
    r = replay(trials, cfg, candidates, Method("two_stage", {"method": "two_stage", "top_k": 1}), repeat=0)
    sampler = make_sampler(load_study_config(DEBUG_STUDY), candidates)
    assert isinstance(sampler, TwoStageSampler)
    ends = sorted((c.index for c in sampler.representatives.values()), reverse=True)  # deepest first
    stage = next(c.stage for c in candidates if c.index == 5)
    inner = sorted((c.index for c in sampler.stages[stage] if c.index not in ends), reverse=True)
    assert r.trained == ends + inner
    assert r.pick == 5 and r.compute_s == sum(10.0 * c for c in r.trained)


def test_tpe_replay_spends_its_budget_and_rules_differ_only_in_the_answer():
    trials, cfg, candidates = exhaustive()
    r = replay(trials, cfg, candidates, Method("tpe", {"method": "tpe", "budget": 3}), repeat=0)
    assert r.trainings == 3 and r.pick in r.trained
    best = replay(trials, cfg, candidates, Method("tpe", {"method": "tpe", "budget": 3}, {"rule": "best"}), repeat=0)
    assert best.trained == r.trained and best.rule == "best"


def test_oracle_and_indistinguishable():
    trials, cfg, _ = exhaustive()
    cut, value = oracle_cut(trials, cfg, 0)
    tests = {t.params["cut"]: t.user_attrs["test_auroc"] for t in trials if t.params.get("repeat", 0) == 0}
    assert value == max(tests.values()) and tests[cut] == value
    assert indistinguishable(trials, cfg, 0, ("ttl", 5), ("ttl", 5))
    assert not indistinguishable(trials, cfg, 0, ("ttl", 1), ("ttl", 5))


def test_search_quality_benchmark_replays_a_stored_study(tmp_path, capsys):
    """benchmarks/search_quality.py --replay-only on a stored (synthetic) exhaustive study: the
    tables, CSV files and PNG it promises."""
    import importlib.util

    import optuna
    import pandas as pd

    from studyutil import REPO

    cfg = load_study_config(DEBUG_STUDY, ["search.method=exhaustive", "search.repeats=3", "name=sq-breast-lite0-64",
                                          "probe.run=false"])  # as the benchmark's studies: probed afterwards
    study, _ = synthetic_study(cfg, STRENGTH, seeds=3, baselines={"full": 3.0, "linear_probe": 1.0})
    url = f"sqlite:///{tmp_path / 'sq.db'}"
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=url)
    spec = importlib.util.spec_from_file_location("search_quality", REPO / "benchmarks" / "search_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--replay-only", "--storage", url, "--tasks", "breast_lite0_64", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "## summary over 1 task(s)" in out and "two_stage k=1" in out and "tpe budget 5" in out
    rows = pd.read_csv(tmp_path / "search_quality.csv")
    others = len(bench.SELECTIONS) - 2  # replayed with the default method and exhaustive only
    assert len(rows) == (len(bench.METHODS) * 2 + 2 * others) * 3  # (methods x selections) x seeds
    assert set(rows.rule) == set(bench.SELECTIONS)
    guided = rows[rows.method == "guided budget 3"]
    assert (guided.trainings == 3).all()  # the probe was run once and stored with the study, then replayed
    from ttl_search.results import open_study, stored_probe

    probe = stored_probe(open_study("sq-breast-lite0-64", url)[0])
    trained = sum(float(t.user_attrs["train_time_s"]) for t in study.trials if t.params.get("repeat", 0) == 0
                  and t.params.get("strategy", "ttl") == "ttl" and str(t.params["cut"]) in guided.trained.iloc[0].split())
    assert guided.compute_s.iloc[0] == pytest.approx(trained + probe["seconds"], abs=0.05)  # the probe's cost counts
    exh = rows[rows.method == "exhaustive"]
    assert (exh.trainings == 7).all() and (exh.compute_share == 1).all() and (exh.regret_vs_exhaustive == 0).all()
    assert (rows[rows.method == "tpe budget 5"].trainings == 5).all()
    assert rows.indistinguishable_from_exhaustive.dtype == bool
    # deployment budgets: no method trains a cut over budget; each is compared with exhaustive under it
    budgets = pd.read_csv(tmp_path / "search_quality_budgets.csv")
    assert set(budgets.budget) == set(bench.BUDGETS) and set(budgets.method) == set(bench.BUDGET_METHODS)
    assert (budgets.over_budget_trained == 0).all() and (budgets.feasible_cuts < budgets["of"]).all()
    exh = budgets[budgets.method == "exhaustive"]
    assert (exh.trainings == exh.feasible_cuts).all() and (exh.regret_vs_exhaustive == 0).all()
    assert "## deployment budgets" in out
    # every method of a default study runs the probe, but TPE (which cannot): its seconds count, its
    # models are candidates; the selection from before counts neither
    default = rows[(rows.rule == "default") & (rows.method == "two_stage k=1")]
    before = rows[(rows.rule == "ttl only (before)") & (rows.method == "two_stage k=1")]
    assert (default.compute_s.values == pytest.approx(before.compute_s.values + probe["seconds"], abs=0.05))
    assert before.pick.astype(str).str.isdigit().all()
    answers = pd.read_csv(tmp_path / "search_quality_answers.csv")
    assert {"full fine-tuning (cut 7)", "linear probe (cut 7)"} <= set(answers.model)
    assert answers.model.str.startswith("answer: ").sum() == 1 and answers.test_ci.notna().all()
    goals = pd.read_csv(tmp_path / "search_quality_goals.csv")
    assert len(goals) == 1 and goals.probe_cut.iloc[0] == probe["best_cut"]
    assert {">=full", ">=probe", ">majority", ">=resnet18"} <= set(goals.columns)
    assert goals.majority_acc.iloc[0] == pytest.approx(0.7)  # the study's own labels
    assert 0 < goals.answer_acc.iloc[0] <= 1
    assert "against the goals" in out
    assert (tmp_path / "search_quality.png").stat().st_size > 10_000
    assert bench.main(["--replay-only", "--storage", url, "--tasks", "pneumonia_lite0_64", "--out", str(tmp_path)]) == 2


def test_demo_stability_benchmark_reads_stored_seed_studies(tmp_path, capsys):
    """benchmarks/demo_stability.py --replay-only over two stored (synthetic) two-stage studies: a
    row per seed with the pick under both rules, and the summary lines."""
    import importlib.util

    import optuna

    from studyutil import REPO

    url = f"sqlite:///{tmp_path / 'demo.db'}"
    for seed in (0, 1):
        cfg = load_study_config(DEBUG_STUDY, ["search.method=exhaustive", f"name=demo-s{seed}",
                                              f"search.seed={seed}"])
        study, _ = synthetic_study(cfg, STRENGTH, seeds=1, baselines={})
        optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=url)
    spec = importlib.util.spec_from_file_location("demo_stability", REPO / "benchmarks" / "demo_stability.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--replay-only", "--storage", url, "--seeds", "0", "1", "--prefix", "demo"]) == 0
    out = capsys.readouterr().out
    assert "demo-s0" in out and "demo-s1" in out and "pick if rule best" in out
    assert "picks over 2 seeds:" in out and "pick if rule best: {" in out
    # the same stored trials under another selection setting, without training
    assert bench.main(["--replay-only", "--storage", url, "--seeds", "0", "1", "--prefix", "demo",
                       "--reselect", "ensemble=indistinguishable"]) == 0
    out = capsys.readouterr().out
    assert "the answer as an ensemble (the cuts indistinguishable from the best): mean validation" in out
    assert "| cuts 5 " in out  # the clear winner alone
    from ttl_search.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown config key 'selection.rules'"):
        bench.main(["--replay-only", "--storage", url, "--seeds", "0", "--prefix", "demo", "--reselect", "rules=best"])
