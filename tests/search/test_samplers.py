"""The samplers on synthetic trial values: no Ray, an in-memory Optuna study."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from ttl_search.errors import ConfigError
from ttl_search.search.samplers import (
    ExhaustiveSampler, Key, Ledger, TPESearch, TwoStageSampler, choose_best, job_distributions, rank_cuts, suggest_params,
)
from ttl_search.run.searcher import copy_twin
from ttl_search.search.study import StudyConfig, cut_candidates, make_sampler
from ttl_search.train.trial import TrialConfig
from ttl_search.data import DataConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study_cfg(backbone="resnet50", input_size=224, **search) -> StudyConfig:
    trial = TrialConfig(backbone=backbone, input_size=input_size, data=DataConfig("breastmnist"))
    cfg = StudyConfig(name="synthetic", trial=trial)
    for key, value in search.items():
        setattr(cfg.search, key, value)
    return cfg


def drive(sampler, value_of, strategies=("ttl",), repeats=1, fail=lambda job, n: False, max_trials=200):
    """Run the plan -> ask -> tell loop sequentially; returns the study."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    candidates = sampler.candidates
    for _ in range(max_trials):
        plan = sampler.plan(study.get_trials(deepcopy=False))
        if plan.action == "finished":
            return study
        assert plan.action == "run", plan
        trial = study.ask()
        params = suggest_params(trial, candidates, strategies, repeats)
        trial.set_user_attr("phase", plan.job.phase)
        if fail(params, trial.number):
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value_of(params))
    raise AssertionError("the search did not finish")


def stage3_wins(params):
    # Stage 3 (cuts 9..14) is best; inside it cut 11 is best.
    cut = params["cut"]
    return {4: 0.70, 8: 0.80, 14: 0.90, 17: 0.85}.get(cut, 0.9 + (0.05 if cut == 11 else 0.0) - abs(cut - 11) * 0.001)


def test_two_stage_on_resnet50_trains_stage_ends_then_the_winning_stage():
    sampler = make_sampler(_study_cfg())
    assert isinstance(sampler, TwoStageSampler)
    study = drive(sampler, stage3_wins)
    cuts = [t.params["cut"] for t in study.trials]
    # each phase starts its longest trainings (the deepest cuts) first, so short ones fill its end
    assert cuts == [17, 14, 8, 4] + [13, 12, 11, 10, 9]
    assert [t.user_attrs["phase"] for t in study.trials] == ["stage1"] * 4 + ["stage2"] * 5
    assert sampler.ranking(study.trials)[0][0] == 11


@pytest.mark.parametrize("winner,inner", [(4, [1, 2, 3]), (8, [5, 6, 7]), (17, [15, 16])])
def test_stage_two_is_the_winning_stage(winner, inner):
    study = drive(make_sampler(_study_cfg()), lambda p: 1.0 if p["cut"] == winner else 0.5)
    assert sorted(t.params["cut"] for t in study.trials[4:]) == inner


def test_top_k_two_stages():
    study = drive(make_sampler(_study_cfg(top_k=2)), lambda p: {14: 0.9, 17: 0.85}.get(p["cut"], 0.5))
    assert sorted(t.params["cut"] for t in study.trials[4:]) == [9, 10, 11, 12, 13, 15, 16]


def test_barrier_waits_for_stage_one():
    sampler = make_sampler(_study_cfg())
    study = optuna.create_study(direction="maximize", sampler=sampler)
    running = []
    for _ in range(4):
        plan = sampler.plan(study.get_trials(deepcopy=False))
        assert plan.action == "run" and plan.phase == "stage1"
        trial = study.ask()
        suggest_params(trial, sampler.candidates, ["ttl"], 1)
        running.append(trial)
    assert sampler.plan(study.get_trials(deepcopy=False)).action == "wait"
    for trial in running[:3]:
        study.tell(trial, stage3_wins(trial.params))
    assert sampler.plan(study.get_trials(deepcopy=False)).action == "wait"
    study.tell(running[3], stage3_wins(running[3].params))
    plan = sampler.plan(study.get_trials(deepcopy=False))
    assert plan.action == "run" and plan.phase == "stage2" and 9 <= plan.job.cut <= 13


def test_the_ensemble_phase_trains_the_chosen_cuts_other_seeds_after_the_search():
    """selection.ensemble=3: once every search training has settled, the chosen cut's seeds 1 and 2;
    they never reach a decision, so a resumed plan (a new sampler over the stored trials) is done."""
    cfg = _study_cfg()
    cfg.selection.ensemble = 3

    def weak_later_seeds(p):  # had seeds 1 and 2 counted, cut 11 would lose its stage's lead
        return 0.1 if p["repeat"] else stage3_wins(p)

    sampler = make_sampler(cfg)
    study = drive(sampler, weak_later_seeds, repeats=3)
    keys = [(t.params["cut"], t.params["repeat"], t.user_attrs["phase"]) for t in study.trials]
    assert keys[:9] == [(c, 0, "stage1") for c in (17, 14, 8, 4)] + [(c, 0, "stage2") for c in (13, 12, 11, 10, 9)]
    assert keys[9:] == [(11, 1, "ensemble"), (11, 2, "ensemble")]
    resumed = make_sampler(cfg)
    assert resumed.plan(study.trials).action == "finished" and resumed.plan(study.trials).expected_total == 11
    assert resumed.ranking(study.trials)[0] == (11, stage3_wins({"cut": 11}))


def test_the_ensemble_phase_waits_for_the_last_search_training():
    cfg = _study_cfg(backbone="test_cnn", input_size=28, method="exhaustive")
    cfg.selection.ensemble = 3
    sampler = make_sampler(cfg)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    last = None
    while (plan := sampler.plan(study.get_trials(deepcopy=False))).action == "run" and plan.phase == "exhaustive":
        if last is not None:
            study.tell(last, 0.5 + 0.01 * last.params["cut"])
        last = study.ask()
        suggest_params(last, sampler.candidates, ["ttl"], 3)
    assert plan.action == "wait" and "barrier" in plan.note  # the pick needs the last search result
    study.tell(last, 0.5 + 0.01 * last.params["cut"])
    best = max(c.index for c in sampler.candidates)
    for repeat in (1, 2):  # both seeds start at once: the pick is final, nothing holds them back
        plan = sampler.plan(study.get_trials(deepcopy=False))
        assert (plan.action, plan.phase, plan.job.cut, plan.job.repeat) == ("run", "ensemble", best, repeat)
        suggest_params(study.ask(), sampler.candidates, ["ttl"], 3)
    plan = sampler.plan(study.get_trials(deepcopy=False))
    assert (plan.action, plan.phase, plan.note) == ("wait", "ensemble", "waiting for running trials")


def test_tolerance_prefers_the_smaller_model():
    scores = {4: 0.90, 8: 0.905, 14: 0.91}
    params = {4: 1, 8: 2, 14: 3}
    assert choose_best(scores, params, "maximize", 0.0)[0] == 14
    assert choose_best(scores, params, "maximize", 0.006)[0] == 8
    assert choose_best(scores, params, "maximize", 0.02)[0] == 4
    assert choose_best({1: 0.3, 2: 0.2}, {1: 5, 2: 9}, "minimize", 0.0)[0] == 2
    study = drive(make_sampler(_study_cfg(tolerance=0.06)), stage3_wins)
    # 8 (0.80) is not within 0.06 of 14 (0.90), but 17 (0.85) is, and 14 is smaller than 17: stage 3 still wins.
    assert sorted(t.params["cut"] for t in study.trials[4:]) == [9, 10, 11, 12, 13]


def test_repeats_use_the_mean():
    def noisy(p):
        # cut 8 has the best single seed but the worse mean
        return {(8, 0): 0.99, (8, 1): 0.50, (14, 0): 0.80, (14, 1): 0.80}.get((p["cut"], p["repeat"]), 0.3)

    sampler = make_sampler(_study_cfg(repeats=2))
    study = drive(sampler, noisy, repeats=2)
    keys = [(t.params["cut"], t.params["repeat"]) for t in study.trials]
    assert len(keys) == len(set(keys))
    assert sorted(keys[:8]) == [(c, r) for c in (4, 8, 14, 17) for r in (0, 1)]
    assert {c for c, _ in keys[8:]} == {9, 10, 11, 12, 13}


def test_failed_trials_are_retried_up_to_the_limit():
    failures = []

    def fail(params, number):
        if params["cut"] == 8:
            failures.append(number)
            return True
        return False

    study = drive(make_sampler(_study_cfg(max_retries=2)), stage3_wins, fail=fail)
    assert len(failures) == 3  # the first try and two retries
    states = [t.state for t in study.trials if t.params["cut"] == 8]
    assert states == [TrialState.FAIL] * 3
    assert sorted(t.params["cut"] for t in study.trials if t.state == TrialState.COMPLETE)[:4] == [4, 9, 10, 11]


def test_a_failed_then_successful_cut_is_not_retrained():
    tries = {"n": 0}

    def fail_once(params, number):
        if params["cut"] == 14 and tries["n"] == 0:
            tries["n"] += 1
            return True
        return False

    study = drive(make_sampler(_study_cfg()), stage3_wins, fail=fail_once)
    complete = [t.params["cut"] for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete.count(14) == 1 and len(complete) == 9


def test_invalid_cuts_are_never_proposed():
    cfg = _study_cfg(backbone="densenet121", input_size=28)
    assert [c.index for c in cut_candidates(cfg)] == [1, 2, 3, 4, 5, 6]
    study = drive(make_sampler(cfg), lambda p: p["cut"] / 10)
    cuts = [t.params["cut"] for t in study.trials]
    assert 7 not in cuts and 8 not in cuts
    assert sorted(cuts[:3]) == [3, 5, 6]  # stage 3 is represented by its last valid cut


def test_exhaustive_and_baselines():
    cfg = _study_cfg(backbone="test_cnn", input_size=28, method="exhaustive")
    cfg.baselines = ["full", "linear_probe", "transfusion"]
    sampler = make_sampler(cfg)
    assert isinstance(sampler, ExhaustiveSampler)
    study = drive(sampler, lambda p: 0.5, strategies=["ttl", "full", "linear_probe", "transfusion"])
    keys = [(t.params["strategy"], t.params["cut"]) for t in study.trials]
    assert keys == [("ttl", c) for c in range(7, 0, -1)] + [("full", 7), ("linear_probe", 7), ("transfusion", 5)]


def test_baselines_fill_the_stage_barrier():
    cfg = _study_cfg(backbone="test_cnn", input_size=28)
    cfg.baselines = ["full", "linear_probe"]
    sampler = make_sampler(cfg)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    kinds = []
    for _ in range(4):
        plan = sampler.plan(study.get_trials(deepcopy=False))
        kinds.append((plan.job.strategy, plan.phase))
        trial = study.ask()
        suggest_params(trial, sampler.candidates, ["ttl", "full", "linear_probe"], 1)
    # full fine-tuning waits for TTL at the last cut, which is running and is the same model
    assert kinds == [("ttl", "stage1")] * 3 + [("linear_probe", "stage1")]
    assert sampler.plan(study.get_trials(deepcopy=False)).action == "wait"


@pytest.mark.parametrize("first", ["ttl", "full"])
def test_full_fine_tuning_and_ttl_at_the_last_cut_are_trained_once(first):
    """Full fine-tuning is TTL at the last cut with the same seed: whichever completes first
    answers for the other (the plan names it to copy), and neither starts while the other runs."""
    cfg = _study_cfg(backbone="test_cnn", input_size=28, method="exhaustive", repeats=2)
    cfg.baselines = ["full"]
    sampler = make_sampler(cfg)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    strategies = ["ttl", "full"]
    dists = job_distributions(sampler.candidates, strategies, 2)
    study.add_trial(optuna.trial.create_trial(params={"strategy": first, "cut": 7, "repeat": 1},
                                              distributions=dists, state=TrialState.RUNNING))
    other = "full" if first == "ttl" else "ttl"
    trained, copied = [], []
    while (plan := sampler.plan(study.get_trials(deepcopy=False))).action == "run":
        key = (plan.job.strategy, plan.job.cut, plan.job.repeat)
        if plan.reuse is not None:
            copy_twin(study, plan, dists)
            copied.append(key)
            continue
        trained.append(key)
        trial = study.ask()
        suggest_params(trial, sampler.candidates, strategies, 2)
        trial.set_user_attr("seed", plan.job.repeat)
        study.tell(trial, 0.5 + plan.job.cut / 100 + plan.job.repeat / 1000)
    # seed 0: one training at cut 7, the twin copied; seed 1: the running twin blocks its job
    assert ("ttl", 7, 0) in trained and ("full", 7, 0) not in trained and ("full", 7, 1) not in trained
    assert copied == [("full", 7, 0)]
    stored = {(t.params["strategy"], t.params["cut"], t.params["repeat"]): t for t in study.get_trials()}
    copy, source = stored[("full", 7, 0)], stored[("ttl", 7, 0)]
    assert copy.params["strategy"] == "full" and copy.value == source.value
    assert copy.user_attrs["reused_from"] == source.number and copy.user_attrs["seed"] == 0
    assert copy.user_attrs["phase"] == "baseline"

    running = study.get_trials(states=(TrialState.RUNNING,))[0]
    study.tell(running.number, 0.75)
    plan = sampler.plan(study.get_trials(deepcopy=False))
    assert plan.action == "run" and (plan.job.strategy, plan.job.cut, plan.job.repeat) == (other, 7, 1)
    assert plan.reuse.number == running.number
    copy_twin(study, plan, dists)
    assert sampler.plan(study.get_trials(deepcopy=False)).action == "finished"
    assert Ledger.from_trials(study.get_trials()).complete[Key(other, 7, 1)] == [0.75]


def test_resume_needs_nothing_but_the_stored_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = _study_cfg()
    first = make_sampler(cfg)
    study = optuna.create_study(study_name="r", storage=url, direction="maximize", sampler=first)
    for _ in range(6):  # stage 1 and two stage-2 trials
        assert first.plan(study.get_trials()).action == "run"
        trial = study.ask()
        suggest_params(trial, first.candidates, ["ttl"], 1)
        study.tell(trial, stage3_wins(trial.params))
    fresh = make_sampler(cfg)  # a restarted driver: new sampler, same database
    again = optuna.load_study(study_name="r", storage=url, sampler=fresh)
    done = {t.params["cut"] for t in again.trials}
    finished = drive_existing(again, fresh)
    cuts = [t.params["cut"] for t in finished.trials]
    assert len(cuts) == 9 and len(set(cuts)) == 9
    assert done < set(cuts)


def drive_existing(study, sampler):
    while sampler.plan(study.get_trials()).action == "run":
        trial = study.ask()
        suggest_params(trial, sampler.candidates, ["ttl"], 1)
        study.tell(trial, stage3_wins(trial.params))
    return study


def test_tpe_spends_its_budget():
    cfg = _study_cfg(backbone="test_cnn", input_size=28, method="tpe", budget=6)
    sampler = make_sampler(cfg)
    assert isinstance(sampler, TPESearch)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    while sampler.plan(study.get_trials()).action == "run":
        trial = study.ask()
        params = suggest_params(trial, sampler.candidates, ["ttl"], 1, tune_lr=True)
        assert 1e-5 <= params["lr"] <= 1e-2
        study.tell(trial, params["cut"] / 10)
    assert len(study.trials) == 6
    assert rank_cuts(study.trials, sampler.candidates, "maximize", 0.0)[0][0] == max(t.params["cut"] for t in study.trials)


def test_bad_search_settings():
    with pytest.raises(ConfigError, match="valid methods: two_stage, exhaustive, tpe, guided, none"):
        _study_cfg(method="grid").__post_init__()
    cfg = _study_cfg(backbone="test_cnn", input_size=28, method="tpe")
    cfg.baselines = ["full"]
    with pytest.raises(ConfigError, match="sibling study"):
        make_sampler(cfg)


def test_ledger_ignores_trials_without_params():
    study = optuna.create_study()
    study.ask()
    assert Ledger.from_trials(study.trials).running == set()


# -- the probe-guided search ------------------------------------------------------------------

def _probe_table(scores: dict[int, float]) -> dict:
    """A stored probe table (only what the ranking reads): ``probe_val`` per cut."""
    return {"rows": [{"cut": c, "probe_val": v, "knn_val": v, "logme": -v, "params": c * 100}
                     for c, v in scores.items()]}


def test_probe_ranking_orders_by_the_guide_and_breaks_ties_by_size():
    from ttl_search.search.samplers import probe_ranking

    rows = _probe_table({3: 0.8, 5: 0.9, 7: 0.9, 9: float("nan")})["rows"]
    assert probe_ranking(rows, "probe_val", "maximize") == [5, 7, 3, 9]  # 5 and 7 tie: the smaller model first
    assert probe_ranking(rows, "probe_val", "minimize") == [3, 5, 7, 9]
    assert probe_ranking(rows, "logme", "maximize") == [3, 5, 7, 9]  # LogME: higher is better
    with pytest.raises(ConfigError, match="valid guides: probe_val, knn_val, logme"):
        probe_ranking(rows, "accuracy", "maximize")


def test_guided_trains_the_probes_best_then_climbs_to_the_best_trained_neighbours():
    # The probe likes cuts 14 and 15, then 9: the first cuts are 14 and 9 (15 is next to 14).
    # Fine-tuning peaks at cut 11: 9 beats 14, so its neighbours 10 and 8 are next (10 first: the
    # probe prefers it); then 10 is the best and its untried neighbour 11 spends the budget of 5.
    probe = {c: 0.5 + 0.01 * c for c in range(1, 18)}
    probe.update({14: 0.99, 15: 0.98, 9: 0.97})
    cfg = _study_cfg(method="guided", budget=5)
    sampler = make_sampler(cfg, probe=_probe_table(probe))
    assert sampler.first_cuts() == [14, 9]
    study = drive(sampler, lambda p: 1.0 - abs(p["cut"] - 11) * 0.02)
    assert [t.params["cut"] for t in study.trials] == [14, 9, 10, 8, 11]
    assert [t.user_attrs["phase"] for t in study.trials] == ["guided1"] * 2 + ["guided2"] * 3
    assert sampler.ranking(study.trials)[0][0] == 11


def test_guided_rounds_do_not_depend_on_concurrency():
    # With 14 and 9 done, the round is {10, 8}: both are asked for before either has a result.
    probe = {c: 0.5 + 0.01 * c for c in range(1, 18)}
    probe.update({14: 0.99, 15: 0.98, 9: 0.97})
    sampler = make_sampler(_study_cfg(method="guided", budget=5), probe=_probe_table(probe))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for cut in (14, 9):
        trial = study.ask()
        suggest_params(trial, sampler.candidates, ("ttl",), 1)
        study.tell(trial, 1.0 - abs(cut - 11) * 0.02)
    asked = []
    for _ in range(2):
        plan = sampler.plan(study.get_trials(deepcopy=False))
        assert plan.action == "run"
        trial = study.ask()
        asked.append(suggest_params(trial, sampler.candidates, ("ttl",), 1)["cut"])
    assert asked == [10, 8]
    assert sampler.plan(study.get_trials(deepcopy=False)).action == "wait"


def test_guided_stops_at_a_local_optimum_before_the_budget():
    probe = {c: 0.5 for c in range(1, 18)}
    probe.update({6: 0.9, 12: 0.8})
    sampler = make_sampler(_study_cfg(method="guided", budget=8), probe=_probe_table(probe))
    study = drive(sampler, lambda p: 1.0 - abs(p["cut"] - 6) * 0.02)
    assert sorted(t.params["cut"] for t in study.trials) == [5, 6, 7, 12]


def test_guided_resumes_from_the_stored_trials_alone():
    probe = _probe_table({c: 0.5 + 0.01 * c for c in range(1, 18)})
    cfg = _study_cfg(method="guided", budget=4)
    full = drive(make_sampler(cfg, probe=probe), lambda p: p["cut"] / 20)
    # a fresh sampler on the first two trials asks for exactly what the first one did next
    partial = optuna.create_study(direction="maximize")
    for t in full.trials[:2]:
        partial.add_trial(t)
    plan = make_sampler(cfg, probe=probe).plan(partial.get_trials(deepcopy=False))
    assert plan.job.cut == full.trials[2].params["cut"]


def test_guided_without_a_probe_table_says_what_to_do():
    sampler = make_sampler(_study_cfg(method="guided"))
    with pytest.raises(ConfigError, match="probe table"):
        sampler.plan([])
    with pytest.raises(ConfigError, match="search.guide 'x' is unknown; valid guides"):
        _study_cfg(method="guided", guide="x").__post_init__()
