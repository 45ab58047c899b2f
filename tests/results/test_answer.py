"""The study's answer with its uncertainty, on synthetic stored trials (no training)."""

from __future__ import annotations

import pytest

from studyutil import DEBUG_STUDY, synthetic_study
from ttl_search.results import chosen_cut
from ttl_search.results.answer import study_answer
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
])
def test_bad_selection_settings_are_named(override, message):
    from ttl_search.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config(override)


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
