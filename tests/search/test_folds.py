"""k-fold cross-validation in the search (``selection.folds``): the plan walks every
(cut, repeat, fold), rankings average folds, the config checks, and stored trials give back their
fold. An in-memory Optuna study on the debug study's candidates; no Ray, no training."""

from __future__ import annotations

import functools
from pathlib import Path

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from ttl_search.errors import ConfigError
from ttl_search.results import trial_config
from ttl_search.run.searcher import copy_twin
from ttl_search.search.samplers import (
    ExhaustiveSampler, Key, TwoStageSampler, job_distributions, rank_cuts, suggest_params, trial_key,
)
from ttl_search.search.study import load_study_config, make_sampler

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "studies" / "debug.yaml"

optuna.logging.set_verbosity(optuna.logging.WARNING)


@functools.lru_cache(maxsize=None)
def _candidates():
    """The debug study's cut candidates (cuts 1..7; stages {1,2,3}, {4,5}, {6,7})."""
    return tuple(make_sampler(load_study_config(DEBUG, ["search.method=exhaustive"])).candidates)


def config(*overrides: str):
    return load_study_config(DEBUG, list(overrides))


def sampler_of(cfg):
    return make_sampler(cfg, list(_candidates()))


def drive(sampler, cfg, value_of, strategies=("ttl",), max_trials=200):
    """plan -> ask -> suggest -> tell until the plan finishes; returns (study, every plan)."""
    study = optuna.create_study(direction=cfg.resolved_direction, sampler=sampler)
    dists = job_distributions(sampler.candidates, list(strategies), cfg.search.repeats, cfg.selection.folds)
    plans = []
    for _ in range(max_trials):
        plan = sampler.plan(study.get_trials(deepcopy=False))
        plans.append(plan)
        if plan.action == "finished":
            return study, plans
        assert plan.action == "run", plan
        if plan.reuse is not None:
            copy_twin(study, plan, dists)
            continue
        trial = study.ask()
        params = suggest_params(trial, sampler.candidates, list(strategies), cfg.search.repeats,
                                folds=cfg.selection.folds)
        assert (params["strategy"], params["cut"], params["repeat"], params.get("fold", 0)) == (
            plan.job.strategy, plan.job.cut, plan.job.repeat, plan.job.fold)
        trial.set_user_attr("phase", plan.job.phase)
        trial.set_user_attr("seed", cfg.search.seed + params["repeat"])
        study.tell(trial, value_of(params))
    raise AssertionError("the search did not finish")


def done(study) -> list[tuple[str, int, int, int]]:
    return [tuple(vars(trial_key(t)).values()) for t in study.trials if t.state == TrialState.COMPLETE]


# --------------------------------------------------------------------------- planning


@pytest.mark.parametrize("repeats", [1, 2])
def test_exhaustive_trains_every_cut_on_every_fold(repeats: int) -> None:
    cfg = config("selection.folds=2", "search.method=exhaustive", f"search.repeats={repeats}")
    assert cfg.trial.data.folds == 2
    sampler = sampler_of(cfg)
    assert isinstance(sampler, ExhaustiveSampler) and sampler.folds == 2
    study, plans = drive(sampler, cfg, lambda p: 0.5 + p["cut"] / 100 + p["fold"] / 1000)
    cuts = [c.index for c in _candidates()]
    expected = {("ttl", c, r, f) for c in cuts for r in range(repeats) for f in range(2)}
    trained = done(study)
    assert len(trained) == len(expected) == 2 * repeats * len(cuts)  # nothing twice
    assert set(trained) == expected
    assert {(c, f) for _, c, _, f in trained} == {(c, f) for c in cuts for f in (0, 1)}
    assert plans[0].expected_total == len(expected) and plans[0].phase == "exhaustive"
    assert plans[-1].action == "finished"
    assert {trial_key(t) for t in study.trials} == {Key(*k) for k in expected}


def test_two_stage_runs_stage_one_on_every_fold_and_counts_folds() -> None:
    cfg = config("selection.folds=2")
    sampler = sampler_of(cfg)
    assert isinstance(sampler, TwoStageSampler) and sampler.folds == 2
    # Stage representatives are cuts 3, 5, 7. Cut 5 is best on fold 0 only; on the mean over
    # folds cut 7 (stage 3) wins, so stage 2 trains cut 6 on both folds.
    values = {(3, 0): 0.6, (3, 1): 0.6, (5, 0): 0.9, (5, 1): 0.5, (7, 0): 0.75, (7, 1): 0.75}
    study, plans = drive(sampler, cfg, lambda p: values.get((p["cut"], p["fold"]), 0.7))
    # stage 1: 3 representatives x 1 repeat x 2 folds; then (as far as known) the inner cuts of
    # the largest stage (stage 1: cuts 1, 2) x 1 repeat x 2 folds
    assert plans[0].phase == "stage1" and plans[0].expected_total == 3 * 2 + 2 * 2
    trained = done(study)
    phases = [t.user_attrs["phase"] for t in study.trials]
    stage1 = {(c, f) for (_, c, _, f), ph in zip(trained, phases) if ph == "stage1"}
    assert stage1 == {(c, f) for c in (3, 5, 7) for f in (0, 1)}
    assert phases == ["stage1"] * 6 + ["stage2"] * 2
    assert {(c, f) for (_, c, _, f), ph in zip(trained, phases) if ph == "stage2"} == {(6, 0), (6, 1)}
    after_stage1 = next(p for p in plans if p.phase == "stage2")
    assert after_stage1.expected_total == 6 + 2
    assert plans[-1].action == "finished"


def test_two_stage_barrier_waits_for_every_fold() -> None:
    cfg = config("selection.folds=2")
    sampler = sampler_of(cfg)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    asked = []
    for _ in range(6):
        assert sampler.plan(study.get_trials(deepcopy=False)).action == "run"
        trial = study.ask()
        asked.append(trial)
        suggest_params(trial, sampler.candidates, ["ttl"], 1, folds=2)
    assert {(t.params["cut"], t.params["fold"]) for t in study.trials} == {(c, f) for c in (3, 5, 7) for f in (0, 1)}
    for trial in asked[:5]:
        study.tell(trial, 0.8)
    assert sampler.plan(study.get_trials(deepcopy=False)).action == "wait"  # one fold still running
    study.tell(asked[5], 0.8)
    plan = sampler.plan(study.get_trials(deepcopy=False))
    assert plan.action == "run" and plan.phase == "stage2"


def test_full_baseline_reuses_the_ttl_twin_of_the_same_fold() -> None:
    cfg = config("selection.folds=2", "search.method=exhaustive", "baselines=[full]")
    sampler = sampler_of(cfg)
    study, plans = drive(sampler, cfg, lambda p: 0.5 + p["cut"] / 100 + p["fold"] / 1000,
                         strategies=("full", "ttl"))
    last = _candidates()[-1].index
    stored = {trial_key(t): t for t in study.trials}
    for fold in (0, 1):
        copy, source = stored[Key("full", last, 0, fold)], stored[Key("ttl", last, 0, fold)]
        assert copy.user_attrs["reused_from"] == source.number, fold
        assert copy.value == source.value
    assert stored[Key("full", last, 0, 0)].value != stored[Key("full", last, 0, 1)].value
    assert len(study.trials) == 2 * len(_candidates()) + 2


# --------------------------------------------------------------------------- ranking


def _trial(cut: int, fold: int, value: float, repeat: int = 0, folds: int = 2):
    params = {"cut": cut, "repeat": repeat}  # TTL alone: no strategy parameter
    if folds > 1:
        params["fold"] = fold
    return optuna.trial.create_trial(
        params=params, distributions=job_distributions(list(_candidates()), ["ttl"], 2, folds),
        value=value, user_attrs={"seed": repeat})


def test_ranking_averages_folds() -> None:
    trials = [_trial(3, 0, 0.95), _trial(3, 1, 0.45),  # mean 0.70, best single value
              _trial(5, 0, 0.74), _trial(5, 1, 0.76),  # mean 0.75
              _trial(7, 0, 0.60), _trial(7, 1, 0.60)]
    ranking = rank_cuts(trials, list(_candidates()), "maximize", 0.0)
    assert [c for c, _ in ranking] == [5, 3, 7]
    assert dict(ranking)[3] == pytest.approx(0.70) and dict(ranking)[5] == pytest.approx(0.75)
    sampler = sampler_of(config("selection.folds=2", "search.method=exhaustive"))
    assert sampler.ranking(trials)[0] == (5, pytest.approx(0.75))
    # every (repeat, fold) counts once in the mean
    more = trials + [_trial(3, 0, 0.95, repeat=1), _trial(3, 1, 0.85, repeat=1)]
    assert dict(rank_cuts(more, list(_candidates()), "maximize", 0.0))[3] == pytest.approx(0.80)


# --------------------------------------------------------------------------- configuration


def test_tpe_cannot_cross_validate() -> None:
    with pytest.raises(ConfigError) as err:
        config("selection.folds=2", "search.method=tpe")
    msg = str(err.value)
    assert "selection.folds" in msg and "tpe" in msg
    assert "two_stage" in msg and "exhaustive" in msg
    assert config("selection.folds=1", "search.method=tpe").trial.data.folds == 1  # no folds: fine


@pytest.mark.parametrize("overrides", [
    ["trial.data.folds=3"],
    ["trial.data.folds=3", "selection.folds=1"],
    ["trial.data.folds=3", "selection.folds=2"],
])
def test_data_folds_other_than_selection_folds_is_an_error(overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"trial\.data\.folds.*selection\.folds"):
        config(*overrides)


def test_selection_folds_sets_the_data_folds() -> None:
    assert config().trial.data.folds == 1
    assert config("selection.folds=3").trial.data.folds == 3
    assert config("selection.folds=3", "trial.data.folds=3").trial.data.folds == 3
    assert make_sampler(config("selection.folds=3")).folds == 3
    assert make_sampler(config()).folds == 1
    with pytest.raises(ConfigError, match="selection.folds"):
        config("selection.folds=0")


# --------------------------------------------------------------------------- old studies unchanged


def test_without_folds_distributions_and_params_have_no_fold() -> None:
    cands = list(_candidates())
    cfg = config("selection.folds=1", "search.method=exhaustive")
    # a parameter that never varies is left out: TTL alone has no strategy, one seed no repeat
    assert set(job_distributions(cands, ["ttl"], 1)) == {"cut"}
    assert set(job_distributions(cands, ["ttl"], 1, cfg.selection.folds)) == {"cut"}
    assert set(job_distributions(cands, ["ttl", "full"], 2)) == {"strategy", "cut", "repeat"}
    # one strategy, one cut: nothing varies; the launch attributes say which (trial_key reads them)
    assert set(job_distributions(cands, ["full"], 1, cuts=[cands[-1].index])) == set()
    assert set(job_distributions(cands, ["full", "linear_probe"], 1, cuts=[cands[-1].index])) == {"strategy"}
    dists = job_distributions(cands, ["ttl"], 1, 3)
    assert dists["fold"] == IntDistribution(0, 2)
    study, plans = drive(sampler_of(cfg), cfg, lambda p: 0.5)
    assert all(set(t.params) == {"cut"} for t in study.trials)
    assert {trial_key(t) for t in study.trials} == {Key("ttl", c.index, 0, 0) for c in cands}
    assert len(study.trials) == len(cands) and plans[0].expected_total == len(cands)


def test_a_finished_study_without_fold_params_stays_finished() -> None:
    cfg = config("search.method=exhaustive")
    trials = [_trial(c.index, 0, 0.5, folds=1) for c in _candidates()]
    assert all("fold" not in t.params for t in trials)
    assert {trial_key(t).fold for t in trials} == {0}
    assert sampler_of(cfg).plan(trials).action == "finished"
    # the same trials are only half of a 2-fold study
    folded = sampler_of(config("selection.folds=2", "search.method=exhaustive")).plan(trials)
    assert folded.action == "run" and folded.job.fold == 1 and folded.expected_total == 2 * len(trials)


# --------------------------------------------------------------------------- stored trials


@pytest.mark.parametrize("fold", [0, 1])
def test_trial_config_gives_the_stored_fold(fold: int) -> None:
    cfg = config("selection.folds=2", "search.method=exhaustive")
    trial = optuna.trial.create_trial(
        params={"cut": 5, "repeat": 1, "fold": fold},
        distributions=job_distributions(list(_candidates()), ["ttl"], 2, 2),
        value=0.8, user_attrs={"seed": 11, "cut_name": "layer2.1", "stage": 2})
    tc = trial_config(cfg, trial)
    assert tc.data.fold == fold and tc.data.folds == 2
    assert (tc.cut, tc.strategy, tc.seed) == (5, "ttl", 11)


def test_trial_config_of_an_unfolded_trial_is_fold_zero() -> None:
    cfg = config("search.method=exhaustive")
    tc = trial_config(cfg, _trial(4, 0, 0.7, folds=1))
    assert (tc.data.fold, tc.data.folds, tc.cut) == (0, 1, 4)
