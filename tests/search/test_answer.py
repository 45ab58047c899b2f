"""The study's answer with its uncertainty, on synthetic stored trials (no training)."""

from __future__ import annotations

import pytest

from studyutil import DEBUG_STUDY, synthetic_study
from ttl_search.results import chosen_cut
from ttl_search.search.answer import study_answer
from ttl_search.search.study import load_study_config


def config(*overrides: str):
    return load_study_config(DEBUG_STUDY, ["search.method=exhaustive", *overrides])


# cut -> signal strength: 1-3 weak, 4-7 strong and alike (cut 4 the smallest of those)
ALIKE = {1: 0.2, 2: 0.4, 3: 0.8, 4: 2.9, 5: 3.0, 6: 3.05, 7: 2.95}


def test_smallest_within_ci_picks_the_smallest_indistinguishable_cut():
    cfg = config()
    study, candidates = synthetic_study(cfg, ALIKE, seeds=2)
    answer = study_answer(study.trials, cfg, candidates)
    assert answer.rule == "smallest_within_ci"
    values = {cut: s.value for (_, cut), s in answer.scores.items()}
    assert answer.reference == max(values, key=values.get)
    assert answer.reference != 4 and 4 in answer.indistinguishable
    assert not {1, 2} & set(answer.indistinguishable)  # clearly worse
    params = {c.index: c.params for c in candidates}
    assert answer.pick == min(answer.indistinguishable, key=params.get) == 4


def test_rule_best_keeps_the_best_mean():
    cfg = config("selection.rule=best")
    study, candidates = synthetic_study(cfg, ALIKE, seeds=2)
    answer = study_answer(study.trials, cfg, candidates)
    assert answer.pick == answer.reference and answer.rule == "best"
    assert answer.scores  # intervals are shown under either rule


def test_a_clear_winner_is_chosen_by_either_rule():
    strength = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 6.0, 6: 0.5, 7: 0.6}
    for rule in ("best", "smallest_within_ci"):
        cfg = config(f"selection.rule={rule}")
        study, candidates = synthetic_study(cfg, strength, n_pos=150, n_neg=150)
        answer = study_answer(study.trials, cfg, candidates)
        assert answer.pick == 5 and answer.indistinguishable == [5]


def test_chosen_cut_reports_interval_and_indistinguishable_cuts():
    cfg = config()
    study, _ = synthetic_study(cfg, ALIKE, seeds=2, baselines={"full": 3.0})
    best = chosen_cut(study, cfg)
    low, high = best["val_ci"]
    assert low < best["val"]["auroc"] < high
    assert best["cut"] == 4 and best["cut"] in best["indistinguishable"] and best["rule"] == "smallest_within_ci"
    rows = {(r["strategy"], r["cut"]): r for r in best["ranking"]}
    assert rows[("ttl", best["reference_cut"])]["diff"] == 0
    assert rows[("full", 7)]["indistinguishable"] is True  # a baseline is paired with the best cut too
    assert rows[("ttl", 1)]["indistinguishable"] is False and rows[("ttl", 1)]["diff_ci"][1] < 0
    assert [r["mean_val"] for r in best["ranking"]] == sorted((r["mean_val"] for r in best["ranking"]), reverse=True)


def test_trials_without_predictions_fall_back_to_the_best_mean():
    cfg = config()
    study, candidates = synthetic_study(cfg, ALIKE, predictions=False)
    answer = study_answer(study.trials, cfg, candidates)
    assert answer.rule == "best" and not answer.scores and "no validation predictions" in answer.note
    values = {t.params["cut"]: t.value for t in study.trials}
    assert answer.pick == max(values, key=values.get)


def test_no_completed_trial_no_answer():
    cfg = config()
    study, candidates = synthetic_study(cfg, {})
    assert study_answer(study.trials, cfg, candidates).pick is None
    assert chosen_cut(study, cfg) is None


@pytest.mark.parametrize("override,message", [
    ("selection.rule=smallest", "valid rules: best, smallest_within_ci"),
    ("selection.confidence=1.5", "selection.confidence"),
    ("selection.folds=0", "selection.folds"),
    ("selection.ensemble=0", r"selection.ensemble must be an integer >= 1"),
    ("selection.ensemble=2.5", r"selection.ensemble must be an integer >= 1 .*, got 2.5"),
    ("selection.ensemble=3 search.method=tpe", r"methods that train the chosen cut's other seeds: "),
    ("selection.ensemble=cuts", r"or 'indistinguishable' \(the average of the cuts indistinguishable from the best\), "
                                r"got 'cuts'"),
    ("selection.ensemble=indistinguishable search.method=none",
     r"search.method none searches none; set selection.ensemble: 1, or a search method: two_stage"),
])
def test_bad_selection_settings_are_named(override, message):
    from ttl_search.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config(*override.split())


def test_models_that_learned_nothing_are_flagged():
    cfg = config()
    nothing = {c: 0.0 for c in range(1, 8)}  # scores are noise: every cut at chance
    study, candidates = synthetic_study(cfg, nothing, seeds=1)
    answer = study_answer(study.trials, cfg, candidates)
    assert answer.chance == 0.5 and len(answer.at_chance) == 7
    assert "no trained cut is better than chance" in " ".join(answer.warnings("auroc"))
    best = chosen_cut(study, cfg)
    assert best["at_chance"] and best["warnings"] and best["chance"] == 0.5

    study, candidates = synthetic_study(cfg, {**ALIKE, 1: 0.0}, seeds=2)
    answer = study_answer(study.trials, cfg, candidates)
    assert ("ttl", 1) in answer.at_chance and ("ttl", 5) not in answer.at_chance
    assert answer.warnings("auroc") == []


def test_accuracy_chance_is_the_majority_share():
    cfg = config("metric=accuracy")
    study, candidates = synthetic_study(cfg, ALIKE, n_pos=70, n_neg=30)
    assert study_answer(study.trials, cfg, candidates).chance == 0.7


def test_the_ensemble_averages_the_chosen_cuts_seeds_and_never_moves_the_pick():
    """selection.ensemble=3: the decision reads the search's seed alone, even when the chosen cut's
    other seeds are weak enough to move it if they counted; the ensemble's metrics are those of the
    averaged probabilities."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from ttl_search.search.record import trial_predictions

    cfg = config("selection.ensemble=3")
    alone, candidates = synthetic_study(cfg, ALIKE)
    study, _ = synthetic_study(cfg, ALIKE, extra_seeds={4: (2, 0.3)})
    before, answer = study_answer(alone.trials, cfg, candidates), study_answer(study.trials, cfg, candidates)
    assert answer.pick == before.pick == 4 and answer.scores == before.scores
    assert study_answer(study.trials, config("search.repeats=3"), candidates).pick != 4  # had they counted
    members = [t for t in study.trials if t.params["cut"] == 4]
    assert [t.params["repeat"] for t in members] == [0, 1, 2]
    ens = answer.ensemble
    assert ens.size == 3 and ens.repeats == ens.seeds == [0, 1, 2] and ens.complete
    assert ens.trials == [t.number for t in members]
    assert study_answer(study.trials, config("selection.ensemble=3", "search.seed=7"), candidates).ensemble.seeds == [
        7, 8, 9]
    for split, score in (("val", ens.val), ("test", ens.test)):
        labels = trial_predictions(members[0], split)[0]
        mean = np.mean([trial_predictions(t, split)[1] for t in members], axis=0)
        assert score.value == pytest.approx(roc_auc_score(labels, mean[:, 1]), abs=1e-9)
        assert score.ci[0] <= score.value <= score.ci[1]
    assert ens.val.diff == pytest.approx(ens.val.value - answer.scores[("ttl", answer.reference)].value)
    assert before.ensemble.repeats == [0] and not before.ensemble.complete  # the search's seed only, so far
    # weak added seeds make an ensemble significantly worse than the best cut: said, not hidden
    assert ens.worse and any("do not confirm the pick" in w for w in answer.warnings("auroc"))
    good, _ = synthetic_study(cfg, ALIKE, extra_seeds={4: (2, 2.9)})
    confirmed = study_answer(good.trials, cfg, candidates)
    assert confirmed.ensemble.complete and not confirmed.ensemble.worse and not confirmed.warnings("auroc")

    best = chosen_cut(study, cfg)
    assert best["repeats"] == 1 and best["ensemble"]["complete"] and best["ensemble"]["val"] == ens.val.value
    assert {(r["cut"], r["repeats"]) for r in best["ranking"]} == {(c, 1) for c in ALIKE}
    from ttl_search.results.dashboard import study_note
    from ttl_search.search.record import fmt_count

    note = study_note(best, study.trials, cfg)
    size = fmt_count(3 * next(c.params for c in candidates if c.index == 4))
    assert ens.params == 3 * next(c.params for c in candidates if c.index == 4)
    assert f"Answer: the ensemble of 3 seeds of cut 4 (class probabilities averaged; seeds 0, 1, 2, {size} " \
           f"parameters in all): validation auroc {ens.val.value:.4f}" in note
    partial = chosen_cut(alone, cfg)["ensemble"]
    assert not partial["complete"] and partial["seeds"] == [0]
    assert f"seeds 0, {size} parameters in all; 1 of 3 seeds trained so far)" in \
        study_note(chosen_cut(alone, cfg), alone.trials, cfg)


def test_the_cut_ensemble_averages_every_indistinguishable_cut_without_moving_the_pick():
    """selection.ensemble=indistinguishable: the pick is the rule's (the smallest indistinguishable
    cut), and the answer averages the probabilities of every model of the indistinguishable cuts:
    no extra training, reported with its intervals, its members' summed size and a test score."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from ttl_search.search.record import trial_predictions
    from ttl_search.search.samplers import search_trials

    # a budget far above every cut: no member is left out (the default cap is tested in test_budget.py)
    plain, cfg = config(), config("selection.ensemble=indistinguishable", "selection.budget.params=1e9")
    assert cfg.seed_count == cfg.search.repeats and cfg.selection.seed_ensemble == 1 and cfg.selection.cut_ensemble
    study, candidates = synthetic_study(cfg, ALIKE)
    single, answer = study_answer(study.trials, plain, candidates), study_answer(study.trials, cfg, candidates)
    assert single.ensemble is None and answer.pick == single.pick == 4 and answer.scores == single.scores
    ens, close = answer.ensemble, answer.indistinguishable
    assert ens.of_cuts and ens.cuts == close and len(close) > 1 and not {1, 2} & set(close)
    members = [t for t in study.trials if t.params["cut"] in close]
    assert ens.trials == [t.number for t in members] and ens.complete and ens.size == 1 and ens.repeats == [0]
    assert ens.params == sum(c.params for c in candidates if c.index in close)
    for split, score in (("val", ens.val), ("test", ens.test)):
        labels = trial_predictions(members[0], split)[0]
        mean = np.mean([trial_predictions(t, split)[1] for t in members], axis=0)
        assert score.value == pytest.approx(roc_auc_score(labels, mean[:, 1]), abs=1e-9)
    assert ens.val.diff == pytest.approx(ens.val.value - answer.scores[("ttl", answer.reference)].value)
    # two seeds per cut: both are members; an ensemble phase's extra seeds never are
    two = config("selection.ensemble=indistinguishable", "search.repeats=2", "selection.budget.params=1e9")
    study2, _ = synthetic_study(two, ALIKE, seeds=2, extra_seeds={4: (1, 0.1)})
    ens2 = study_answer(study2.trials, two, candidates).ensemble
    assert ens2.repeats == [0, 1] and ens2.size == 2 and ens2.complete
    assert ens2.trials == [t.number for t in search_trials(study2.trials, 2) if t.params["cut"] in ens2.cuts]

    best = chosen_cut(study, cfg)
    assert best["ensemble"]["cuts"] == close and best["ensemble"]["params"] == ens.params
    from ttl_search.results.dashboard import study_note

    assert (f"Answer: the ensemble of the {len(close)} cuts indistinguishable from the best "
            f"({', '.join(map(str, close))}; {len(members)} models, class probabilities averaged, ") in \
        study_note(best, study.trials, cfg)


def test_a_cut_ensemble_of_one_cut_says_it_is_that_cut_alone():
    from ttl_search.search.record import ensemble_line

    cfg = config("selection.ensemble=indistinguishable")
    strength = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 6.0, 6: 0.5, 7: 0.6}
    study, candidates = synthetic_study(cfg, strength, n_pos=150, n_neg=150)
    best = chosen_cut(study, cfg)
    ens = best["ensemble"]
    assert best["cut"] == 5 and ens["cuts"] == [5] and len(ens["trials"]) == 1 and ens["diff"] == 0
    assert ensemble_line(best, "auroc").startswith(
        "Answer: cut 5 alone, the only cut indistinguishable from the best (1 model(s), ")


# ------------------------------------------------------------------ every candidate, guards


def test_a_model_that_answers_one_class_is_never_chosen():
    """Cut 4 ranks the images as well as the best cut (same AUROC) but its threshold makes it answer
    'positive' for nearly every image: the default guard (balanced accuracy) excludes it, and
    without guards its accuracy, no better than the majority class's share, still does."""
    study, candidates = synthetic_study(config(), ALIKE, seeds=2, bias={4: 5.0})
    answer = study_answer(study.trials, config(), candidates)
    assert answer.scores[("ttl", 4)].indistinguishable  # AUROC alone cannot tell
    assert answer.key != ("ttl", 4) and ("ttl", 4) not in answer.close and 4 not in answer.indistinguishable
    assert "balanced_accuracy" in answer.excluded[("ttl", 4)] and "significantly worse" in answer.excluded[("ttl", 4)]
    assert ("ttl", 4) in answer.below_majority and answer.majority == 0.7
    unguarded = study_answer(study.trials, config("selection.guards=[]"), candidates)
    assert unguarded.key != ("ttl", 4) and "does not beat the majority class (0.7000)" in unguarded.excluded[("ttl", 4)]
    best = chosen_cut(study, config())
    row = next(r for r in best["ranking"] if (r["strategy"], r["cut"]) == ("ttl", 4))
    assert "balanced_accuracy" in row["excluded"] and "cut 4" in [e["model"] for e in best["excluded"]]
    assert best["guards"] == ["balanced_accuracy"] and not best["below_majority"]


def test_a_chosen_model_below_the_majority_class_is_flagged():
    """When every candidate answers one class, the answer is still the best of them, flagged."""
    cfg = config()
    study, candidates = synthetic_study(cfg, ALIKE, seeds=1, bias={c: 5.0 for c in ALIKE})
    answer = study_answer(study.trials, cfg, candidates)
    assert answer.key in answer.below_majority
    assert any("does not beat always answering the majority class" in w for w in answer.warnings("auroc"))


def test_the_answer_is_chosen_among_frozen_probes_and_baselines_too():
    """A frozen probe and a baseline are candidates like the fine-tuned cuts: the smallest model
    indistinguishable from the best wins, whatever its kind; ``selection.candidates: ttl`` goes
    back to the fine-tuned cuts alone."""
    from ttl_search.results import stored_probe_models

    weak = {c: 0.6 for c in ALIKE}
    cfg = config()
    study, candidates = synthetic_study(cfg, weak, seeds=1, baselines={"full": 0.6}, probe={2: 4.0, 3: 4.0, 6: 0.5})
    models = stored_probe_models(study)
    assert sorted(models.predictions) == [2, 3, 6] and models.params[2] < models.params[3]
    answer = study_answer(study.trials, cfg, candidates, models)
    assert answer.key == ("probe", 2) and answer.strategy == "probe" and ("probe", 3) in answer.close
    assert ("probe", 6) in answer.scores and ("full", 7) in answer.pool
    ttl_only = study_answer(study.trials, config("selection.candidates=ttl"), candidates, models)
    assert ttl_only.strategy == "ttl" and ("probe", 2) not in ttl_only.pool
    assert study_answer(study.trials, cfg, candidates).strategy == "ttl"  # without the probe's models

    best = chosen_cut(study, cfg)
    assert best["strategy"] == "probe" and best["cut"] == 2 and best["model"] == "frozen probe at cut 2"
    assert best["trial"] == "probe:2" and best["params"] == models.params[2] and best["repeats"] == 1
    assert best["val"]["auroc"] == pytest.approx(answer.scores[("probe", 2)].value, abs=1e-6)
    ranked = {(r["strategy"], r["cut"]) for r in best["ranking"]}
    assert {("probe", 2), ("probe", 3), ("probe", 6), ("full", 7)} <= ranked
    assert next(r for r in best["ranking"] if r["chosen"])["trials"] == ["probe:2"]

    strong = {"linear_probe": 5.0, "full": 0.6}
    study, candidates = synthetic_study(cfg, weak, seeds=1, baselines=strong)
    answer = study_answer(study.trials, cfg, candidates)
    assert answer.key == ("linear_probe", 7) and answer.reference_key == ("linear_probe", 7)


def test_selection_candidates_and_guards_are_checked():
    from ttl_search.errors import ConfigError

    with pytest.raises(ConfigError, match=r"selection.candidates 'probes' is unknown; valid values: all, ttl"):
        config("selection.candidates=probes")
    with pytest.raises(ConfigError, match=r"'kappa' is not a guard metric; valid metrics: auroc, .*loss"):
        config("selection.guards=[kappa]")
    with pytest.raises(ConfigError, match=r"selection.guards must be a list of metrics"):
        config("selection.guards=loss")
    assert config("selection.guards=[loss, loss]").selection.guards == ["loss"]


def test_guards_apply_in_turn_so_that_a_candidate_always_survives():
    """Two guards whose best candidates differ: the second is applied to the first's survivors, so
    the best on the second guard among them survives (the guards' bests could exclude each other)."""
    from ttl_search.search.answer import guard_exclusions, trial_evidence

    cfg = config("selection.guards=[balanced_accuracy, loss]")
    study, candidates = synthetic_study(cfg, ALIKE, seeds=1, bias={5: 1.5, 6: -1.5})
    answer = study_answer(study.trials, cfg, candidates)
    assert answer.key not in answer.excluded and set(answer.pool) - set(answer.excluded)
    evidence, _ = trial_evidence(study.trials)
    keys = list(evidence)
    first = guard_exclusions(evidence, keys, ["balanced_accuracy"], cfg.selection)
    both = guard_exclusions(evidence, keys, ["balanced_accuracy", "loss"], cfg.selection)
    assert set(first) <= set(both) and set(keys) - set(both)
