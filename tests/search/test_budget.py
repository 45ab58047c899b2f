"""Deployment budgets (selection.budget): validation, which cuts fit, what each search method may
train, and the cap on an ensemble's summed cost."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ttl_search.errors import ConfigError
from ttl_search.search.answer import ensemble_cap, fit_members
from ttl_search.search.budget import (BudgetConfig, apply_budget, check_feasible, cost_excess, feasible, parse_budget,
                                      read_latency_table)
from ttl_search.search.samplers import Ledger
from ttl_search.search.study import cut_candidates, load_study_config, make_sampler

REPO = Path(__file__).resolve().parents[2]


def _cfg(method: str = "two_stage", **budget):
    overrides = [f"search.method={method}"] + [f"selection.budget.{k}={v}" for k, v in budget.items()]
    if method == "guided":
        overrides.append("search.budget=3")
    return load_study_config(REPO / "studies" / "debug.yaml", overrides)


def test_budget_keys_are_validated_and_name_the_valid_choices():
    assert _cfg(params="1e6").selection.budget.params == 1_000_000  # YAML's 1e6 is the integer it names
    with pytest.raises(ConfigError, match=r"selection\.budget\.params must be a positive integer.*got 1\.5"):
        _cfg(params=1.5)
    with pytest.raises(ConfigError, match=r"selection\.budget\.latency_ms must be a positive number"):
        _cfg(latency_ms=-2)
    with pytest.raises(ConfigError, match=r"latency_batch must be one of 1, 64, got 8"):
        _cfg(latency_batch=8)
    with pytest.raises(ConfigError, match=r"unknown config key 'selection\.budget\.parameters'.*params, macs"):
        _cfg(parameters=5)
    assert parse_budget(["latency_ms=2", "params=5e5"]) == BudgetConfig(params=500_000, latency_ms=2.0)
    with pytest.raises(ConfigError, match=r"--budget 'size=3': expected KEY=VALUE with KEY one of params"):
        parse_budget(["size=3"])
    with pytest.raises(ConfigError, match="'two' is not a number"):
        parse_budget(["latency_ms=two"])
    assert not BudgetConfig().active and BudgetConfig().describe() == "none"
    assert BudgetConfig(params=1_000_000, latency_ms=2).describe() == "params <= 1M, latency_ms <= 2 (batch 1)"


def test_cost_excess_names_every_limit_a_model_breaks():
    budget = BudgetConfig(params=1000, macs=10_000, model_mb=0.001, latency_ms=1.0)
    assert cost_excess(budget, 200, 5000, 0.5) == ""
    why = cost_excess(budget, 2000, 50_000, 3.0)
    assert why == "over budget: params 2k > 1k, macs 50k > 10k, model_mb 0.008 > 0.001, latency_ms 3 > 1"
    assert "latency_ms not measured" in cost_excess(budget, 200, 5000, None)  # cannot be shown to fit


def test_cuts_over_budget_are_marked_and_a_budget_no_cut_meets_is_refused():
    cfg = _cfg()
    every = cut_candidates(cfg)
    limit = every[3].params  # the first four cuts fit
    marked = apply_budget(every, BudgetConfig(params=limit))
    assert [c.index for c in feasible(marked)] == [c.index for c in every[:4]]
    assert marked[4].over_budget.startswith("over budget: params ") and marked[3].over_budget == ""
    smallest = every[0]
    with pytest.raises(ConfigError, match=rf"no cut of test_cnn meets selection.budget \(params <= 10\): the smallest, "
                                          rf"cut 1 \({smallest.name}\), has {smallest.params:,} parameters"):
        check_feasible(apply_budget(every, BudgetConfig(params=10)), BudgetConfig(params=10), "test_cnn")
    table = {"rows": [{"cut": c.index, "batch1_ms": float(c.index)} for c in every]}
    marked = apply_budget(every, BudgetConfig(latency_ms=2.5), table)
    assert [c.index for c in feasible(marked)] == [1, 2] and marked[0].latency_ms == 1.0


@pytest.mark.parametrize("method", ["two_stage", "exhaustive", "tpe", "guided"])
def test_no_search_method_plans_a_cut_over_budget(method):
    cfg = _cfg(method, macs=610_000)  # test_cnn at 28 px: cuts 1-4 fit (cut 4: 604k MACs)
    candidates = apply_budget(cut_candidates(cfg), cfg.selection.budget)
    fits = {c.index for c in feasible(candidates)}
    assert fits == {1, 2, 3, 4}
    probe = {"rows": [{"cut": c.index, "probe_val": 1.0 - c.index / 10, "params": c.params} for c in candidates]}
    probe["rows"][-1]["probe_val"] = 2.0  # the probe's best cut is over budget: never trained
    sampler = make_sampler(cfg, candidates, probe if method == "guided" else None)
    assert {c.index for c in sampler.candidates} == fits
    assert len(sampler.study_candidates) == len(candidates)  # baselines may still train at theirs
    if method == "two_stage":  # stage 1: the deepest cut of each stage that fits
        assert {s: c.index for s, c in sampler.representatives.items()} == {1: 3, 2: 4}
    if method == "guided":
        assert set(sampler.first_cuts()) <= fits and sampler.probe_order[0] in fits
    if method != "tpe":
        jobs, *_ = sampler.search_jobs(Ledger.from_trials([]))
        assert jobs and {j.cut for j in jobs} <= fits


def test_an_ensemble_keeps_its_members_within_the_cap_best_first():
    cfg = _cfg()
    candidates = cut_candidates(cfg)
    cap = ensemble_cap(candidates, BudgetConfig())
    full = candidates[-1]
    assert (cap.params, cap.macs) == (full.params, full.macs)  # no budget: the full model's size
    order = [7, 3, 2, 1]
    members, left_out = fit_members(order, candidates, cap, 1)
    by = {c.index: c for c in candidates}
    assert members[0] == 7 and sum(by[c].macs for c in members) <= full.macs
    assert set(members) | set(left_out) == set(order) and left_out
    members, left_out = fit_members(order, candidates, BudgetConfig(params=10**9), 1)
    assert members == order and left_out == []
    # two seeds per cut count twice
    members, _ = fit_members([3, 2], candidates, BudgetConfig(macs=by[3].macs * 2), 2)
    assert members == [3]


def test_a_latency_table_from_cutoffs_is_read_and_checked(tmp_path):
    from ttl_search.cli import main

    path = tmp_path / "latency.json"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["cutoffs", "test_cnn", "--input-size", "28", "--measure-latency", "--latency-repeats", "3",
                     "--format", "json"]) == 0
    path.write_text(out.getvalue())
    rows = json.loads(out.getvalue())
    assert all(r["latency_batch1_ms"] > 0 and r["latency_batch64_ms"] > 0 for r in rows)
    table = read_latency_table(path, "test_cnn", 28, 3)
    assert [r["cut"] for r in table["rows"]] == [r["index"] for r in rows] and table["device_name"].startswith("CPU")
    with pytest.raises(ConfigError, match=r"measured for test_cnn at 28 px with 3 channel\(s\); the study trains "
                                          r"test_cnn at 64 px"):
        read_latency_table(path, "test_cnn", 64, 3)
    with pytest.raises(ConfigError, match=r"latency_table: .*missing.json not found \(write it on the target machine "
                                          r"with `ttl-search cutoffs test_cnn --input-size 28 --measure-latency"):
        read_latency_table(tmp_path / "missing.json", "test_cnn", 28, 3)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds no latency rows"):
        read_latency_table(tmp_path / "bad.json", "test_cnn", 28, 3)
    cfg = _cfg(latency_ms=1000)
    cfg = replace(cfg, selection=replace(cfg.selection, budget=replace(cfg.selection.budget, latency_table=str(path))))
    from ttl_search.run.latency import budget_candidates, cut_latency_table

    marked = budget_candidates(cfg, cut_candidates(cfg), cut_latency_table(cfg, cut_candidates(cfg), remote=False))
    assert all(c.latency_ms == r["latency_batch1_ms"] and not c.over_budget for c, r in zip(marked, rows))


def test_the_answer_and_its_ensembles_keep_to_the_budget():
    """On stored trials: the pick and the reference fit the budget; a cut ensemble keeps the chosen
    cut first; an ensemble of seeds over the budget is not the answer, and a warning says why."""
    from studyutil import synthetic_study

    from ttl_search.search.answer import study_answer

    strength = {1: 0.2, 2: 0.4, 3: 0.8, 4: 2.9, 5: 3.0, 6: 3.05, 7: 2.95}
    cfg = _cfg("exhaustive")
    study, candidates = synthetic_study(cfg, strength, extra_seeds={4: (2, 2.9)})
    limit = {c.index: c for c in candidates}[5].params
    budgeted = replace(cfg, selection=replace(cfg.selection, budget=BudgetConfig(params=limit)))
    answer = study_answer(study.trials, budgeted, candidates)
    assert answer.pick in (4, 5) and answer.reference in (4, 5)
    assert set(answer.over_budget) == {("ttl", 6), ("ttl", 7)} and all(k in answer.excluded for k in answer.over_budget)
    seeds = replace(budgeted, selection=replace(budgeted.selection, ensemble=3))
    answer = study_answer(study.trials, seeds, candidates)
    assert answer.ensemble is None and any("the answer is one model" in w for w in answer.warnings("auroc"))
    roomy = replace(seeds, selection=replace(seeds.selection, budget=BudgetConfig(params=10 * limit)))
    assert study_answer(study.trials, roomy, candidates).ensemble.size == 3
    cuts = replace(cfg, selection=replace(cfg.selection, ensemble="indistinguishable"))
    answer = study_answer(study.trials, cuts, candidates)
    full = max(candidates, key=lambda c: c.index)
    by = {c.index: c for c in candidates}
    assert answer.pick in answer.ensemble.cuts and sum(by[c].macs for c in answer.ensemble.cuts) <= full.macs
    assert sorted(answer.ensemble.cuts + answer.ensemble.left_out) == answer.indistinguishable
