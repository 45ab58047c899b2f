"""Bootstrap intervals, paired differences and the selection rules, on synthetic predictions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from ttl_search.errors import ConfigError
from ttl_search.search.selection import (
    RULES, Evidence, Score, SelectionConfig, choose, metric_value, score_candidates, stratified_draws,
)
from ttl_search.train import metrics as M

B = 200  # resamples in the tests: the loop references stay fast


def _cfg(**kw) -> SelectionConfig:
    kw.setdefault("resamples", B)
    return SelectionConfig(**kw)


def _binary_probs(score: np.ndarray) -> np.ndarray:
    return np.c_[1.0 - score, score]


def _noisy_binary(y: np.ndarray, signal: float, rng: np.random.Generator, decimals: int = 1) -> np.ndarray:
    """Probabilities of class 1, rounded so that many scores tie."""
    logit = rng.normal(size=y.size) + signal * (2 * y - 1)
    return _binary_probs(np.round(1.0 / (1.0 + np.exp(-logit)), decimals))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _nll(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(-np.log(np.clip(p[np.arange(y.size), y], 1e-12, None))))


LOOP_METRICS = {
    "auroc": M.auroc,
    "accuracy": M.accuracy,
    "balanced_accuracy": M.balanced_accuracy,
    "auprc": M.average_precision,
    "f1_macro": M.f1_macro,
    "loss": _nll,
}


def _reference_samples(ev: Evidence, metric: str, seed: int, resamples: int = B) -> np.ndarray:
    """The bootstrap of the spec, written out as a plain loop over the metrics module."""
    fn = LOOP_METRICS[metric]
    per_fold = []
    for fold, (y, probs_list) in ev.folds.items():
        rng = np.random.default_rng([seed, fold])
        classes = np.unique(y)
        pos = [np.flatnonzero(y == c) for c in classes]
        idx = np.concatenate([p[rng.integers(0, p.size, size=(resamples, p.size))] for p in pos], axis=1)
        per_fold.append([np.mean([fn(y[i], p[i]) for p in probs_list]) for i in idx])
    return np.mean(per_fold, axis=0)


def _pct(x: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    lo, hi = np.percentile(x, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)


# ------------------------------------------------------------------ vectorized == loop


def test_vectorized_binary_auroc_equals_loop_with_ties():
    rng = np.random.default_rng(1)
    y = rng.permutation(np.r_[np.ones(30, int), np.zeros(48, int)])
    ev = {
        "a": Evidence({0: (y, [_noisy_binary(y, 0.8, rng) for _ in range(3)])}),
        "b": Evidence({0: (y, [_noisy_binary(y, 0.4, rng) for _ in range(3)])}),
    }
    # the rounding produces ties between positives and negatives
    s = ev["a"].folds[0][1][0][:, 1]
    assert np.intersect1d(s[y == 1], s[y == 0]).size > 0
    scores = score_candidates(ev, "auroc", "maximize", _cfg(seed=7), reference="a")
    ref_a = _reference_samples(ev["a"], "auroc", 7)
    ref_b = _reference_samples(ev["b"], "auroc", 7)
    np.testing.assert_allclose(scores["a"].ci, _pct(ref_a), rtol=0, atol=1e-12)
    np.testing.assert_allclose(scores["b"].ci, _pct(ref_b), rtol=0, atol=1e-12)
    np.testing.assert_allclose(scores["b"].diff_ci, _pct(ref_b - ref_a), rtol=0, atol=1e-12)
    assert scores["b"].indistinguishable == (_pct(ref_b - ref_a)[0] <= 0 <= _pct(ref_b - ref_a)[1])


def test_vectorized_multiclass_auroc_equals_loop():
    rng = np.random.default_rng(2)
    y = rng.permutation(np.repeat([0, 1, 2], [20, 35, 15]))
    probs = [_softmax(np.round(rng.normal(size=(y.size, 3)) + 1.2 * np.eye(3)[y], 1)) for _ in range(2)]
    ev = {0: Evidence({0: (y, probs)})}
    score = score_candidates(ev, "auroc", "maximize", _cfg(seed=3))[0]
    np.testing.assert_allclose(score.ci, _pct(_reference_samples(ev[0], "auroc", 3)), rtol=0, atol=1e-12)
    expected = np.mean([roc_auc_score(y, p, multi_class="ovr") for p in probs])
    assert score.value == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy", "loss", "auprc", "f1_macro"])
def test_other_metrics_equal_loop(metric):
    rng = np.random.default_rng(4)
    y = rng.permutation(np.repeat([0, 1, 2], [25, 10, 15]))
    ev = {
        k: Evidence({0: (y, [_softmax(rng.normal(size=(y.size, 3)) + s * np.eye(3)[y]) for _ in range(2)])})
        for k, s in (("x", 1.0), ("y", 0.3))
    }
    direction = M.METRICS[metric]
    scores = score_candidates(ev, metric, direction, _cfg(seed=11), reference="x")
    ref_x = _reference_samples(ev["x"], metric, 11)
    ref_y = _reference_samples(ev["y"], metric, 11)
    np.testing.assert_allclose(scores["x"].ci, _pct(ref_x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(scores["y"].diff_ci, _pct(ref_y - ref_x), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------ estimates


def test_point_estimate_equals_sklearn_roc_auc():
    rng = np.random.default_rng(5)
    y = rng.permutation(np.r_[np.ones(40, int), np.zeros(60, int)])
    probs = [_noisy_binary(y, 0.7, rng, decimals=2) for _ in range(4)]
    score = score_candidates({"c": Evidence({0: (y, probs)})}, "auroc", "maximize", _cfg())["c"]
    expected = np.mean([roc_auc_score(y, p[:, 1]) for p in probs])
    assert score.value == pytest.approx(expected, abs=1e-12)
    assert (score.n, score.seeds) == (100, 4)
    assert score.ci[0] <= score.value <= score.ci[1]
    assert score.ci[1] - score.ci[0] > 0.02  # a real interval, not a point


def test_metric_value_loss_and_unknown_metric():
    y = np.array([0, 1, 1, 0])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [1.0, 0.0], [0.6, 0.4]])
    expected = -(np.log(0.9) + np.log(0.8) + np.log(1e-12) + np.log(0.6)) / 4
    assert metric_value("loss", y, p) == pytest.approx(expected, rel=1e-12)
    assert metric_value("accuracy", y, p) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="valid metrics: .*auroc"):
        metric_value("nope", y, p)


def test_same_seed_same_intervals_different_seed_different():
    rng = np.random.default_rng(6)
    y = rng.permutation(np.r_[np.ones(25, int), np.zeros(53, int)])
    ev = {k: Evidence({0: (y, [_noisy_binary(y, s, rng)])}) for k, s in ((0, 0.9), (1, 0.5))}
    a = score_candidates(ev, "auroc", "maximize", _cfg(seed=1))
    b = score_candidates(ev, "auroc", "maximize", _cfg(seed=1))
    c = score_candidates(ev, "auroc", "maximize", _cfg(seed=2))
    assert a == b
    assert a[0].ci != c[0].ci
    assert a[1].diff_ci != c[1].diff_ci
    assert a[0].value == c[0].value


def test_stratified_draws_keep_class_counts():
    y = np.array([0] * 13 + [1] * 5 + [2] * 7)
    y = np.random.default_rng(0).permutation(y)
    draws = stratified_draws(y, 300, seed=4, fold=2)
    assert draws.idx.shape == (300, y.size)
    for row in draws.idx:
        np.testing.assert_array_equal(np.bincount(y[row], minlength=3), [13, 5, 7])
    # resamples differ (with replacement), and the counts matrix agrees with the indices
    assert len({tuple(r) for r in draws.idx}) == 300
    counts = np.concatenate([draws.counts(c) for c in draws.classes], axis=1)
    positions = np.concatenate([draws.positions[c] for c in draws.classes])
    for b in (0, 17, 299):
        np.testing.assert_array_equal(counts[b], np.bincount(draws.idx[b], minlength=y.size)[positions])
    again = stratified_draws(y, 300, seed=4, fold=2)
    np.testing.assert_array_equal(again.idx, draws.idx)
    assert not np.array_equal(stratified_draws(y, 300, seed=4, fold=3).idx, draws.idx)


# ------------------------------------------------------------------------ pairing


def test_perfect_beats_random_and_identical_is_indistinguishable():
    rng = np.random.default_rng(8)
    y = rng.permutation(np.r_[np.ones(100, int), np.zeros(100, int)])
    perfect = _binary_probs(np.where(y == 1, 0.9, 0.1))
    random = _binary_probs(rng.uniform(size=y.size))
    ev = {
        "perfect": Evidence({0: (y, [perfect])}),
        "random": Evidence({0: (y, [random])}),
        "twin": Evidence({0: (y, [perfect.copy()])}),
    }
    scores = score_candidates(ev, "auroc", "maximize", _cfg(resamples=500))
    p, r, t = scores["perfect"], scores["random"], scores["twin"]
    assert p.value == 1.0 and p.ci == (1.0, 1.0)
    assert (p.diff, p.diff_ci, p.indistinguishable) == (0.0, (0.0, 0.0), True)
    assert r.diff == pytest.approx(roc_auc_score(y, random[:, 1]) - 1.0)
    assert r.diff_ci[1] < -0.3 and not r.indistinguishable
    assert t.diff_ci == (0.0, 0.0) and t.indistinguishable


def test_reference_interval_contains_value_and_default_reference_is_best():
    rng = np.random.default_rng(9)
    y = rng.permutation(np.r_[np.ones(30, int), np.zeros(50, int)])
    ev = {k: Evidence({0: (y, [_noisy_binary(y, s, rng, 2) for _ in range(3)])}) for k, s in enumerate((0.2, 1.0, 0.6))}
    scores = score_candidates(ev, "auroc", "maximize", _cfg())
    best = max(scores, key=lambda k: scores[k].value)
    assert best == 1
    assert scores[best].diff_ci == (0.0, 0.0)
    for k, s in scores.items():
        assert s.ci[0] <= s.value <= s.ci[1]
        assert s.diff == pytest.approx(s.value - scores[best].value)
    # an explicit reference changes what the differences are taken against
    other = score_candidates(ev, "auroc", "maximize", _cfg(), reference=0)
    assert other[0].diff_ci == (0.0, 0.0) and other[1].diff > 0
    with pytest.raises(ValueError, match="reference"):
        score_candidates(ev, "auroc", "maximize", _cfg(), reference=99)


def test_unpaired_candidate_is_not_indistinguishable():
    rng = np.random.default_rng(10)
    y = rng.permutation(np.r_[np.ones(30, int), np.zeros(50, int)])
    y_other = rng.permutation(y)
    same_probs = [_noisy_binary(y, 0.7, rng)]
    ev = {
        "ref": Evidence({0: (y, same_probs)}),
        "other_labels": Evidence({0: (y_other, same_probs)}),
        "other_folds": Evidence({1: (y, same_probs)}),
    }
    scores = score_candidates(ev, "auroc", "maximize", _cfg(seed=3), reference="ref")
    for key in ("other_labels", "other_folds"):
        s = scores[key]
        assert all(math.isnan(v) for v in s.diff_ci) and not s.indistinguishable
        assert s.diff == pytest.approx(s.value - scores["ref"].value)
    # its own interval uses its own labels' draws: as if scored alone
    alone = score_candidates({"x": ev["other_labels"]}, "auroc", "maximize", _cfg(seed=3))["x"]
    assert scores["other_labels"].ci == alone.ci
    np.testing.assert_allclose(alone.ci, _pct(_reference_samples(ev["other_labels"], "auroc", 3)), atol=1e-12)


# -------------------------------------------------------------------------- folds


def test_k_fold_value_is_mean_of_per_fold_metrics():
    rng = np.random.default_rng(12)
    y0 = rng.permutation(np.r_[np.ones(20, int), np.zeros(30, int)])
    y1 = rng.permutation(np.r_[np.ones(35, int), np.zeros(15, int)])
    p0 = [_noisy_binary(y0, 1.0, rng, 2) for _ in range(2)]
    p1 = [_noisy_binary(y1, 0.2, rng, 2) for _ in range(2)]
    ev = {"c": Evidence({0: (y0, p0), 1: (y1, p1)}), "d": Evidence({0: (y0, p0[::-1]), 1: (y1, p1)})}
    scores = score_candidates(ev, "auroc", "maximize", _cfg(folds=2, seed=5))
    fold0 = np.mean([roc_auc_score(y0, p[:, 1]) for p in p0])
    fold1 = np.mean([roc_auc_score(y1, p[:, 1]) for p in p1])
    assert abs(fold0 - fold1) > 0.1  # the folds really differ
    assert scores["c"].value == pytest.approx((fold0 + fold1) / 2, abs=1e-12)
    assert (scores["c"].n, scores["c"].seeds) == (100, 2)
    np.testing.assert_allclose(scores["c"].ci, _pct(_reference_samples(ev["c"], "auroc", 5)), atol=1e-12)
    # same folds, same labels, same per-fold seed means: paired and identical
    assert scores["d"].indistinguishable and scores["d"].diff_ci == pytest.approx((0.0, 0.0), abs=1e-12)


def test_undefined_fold_metric_is_left_out_without_warnings():
    rng = np.random.default_rng(13)
    y0 = np.zeros(20, int)  # AUROC undefined on this fold
    y1 = rng.permutation(np.r_[np.ones(20, int), np.zeros(20, int)])
    p1 = [_noisy_binary(y1, 0.8, rng, 2)]
    ev = {"c": Evidence({0: (y0, [_binary_probs(rng.uniform(size=20))]), 1: (y1, p1)})}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score = score_candidates(ev, "auroc", "maximize", _cfg())["c"]
    assert score.value == pytest.approx(roc_auc_score(y1, p1[0][:, 1]))
    assert np.all(np.isfinite(score.ci)) and score.ci[0] < score.value < score.ci[1]


# ---------------------------------------------------------------- multi-class, loss


def test_multiclass_accuracy():
    rng = np.random.default_rng(14)
    y = rng.permutation(np.repeat([0, 1, 2], [30, 20, 10]))
    probs = [_softmax(rng.normal(size=(y.size, 3)) + 1.0 * np.eye(3)[y]) for _ in range(3)]
    score = score_candidates({0: Evidence({0: (y, probs)})}, "accuracy", "maximize", _cfg())[0]
    expected = np.mean([accuracy_score(y, p.argmax(1)) for p in probs])
    assert score.value == pytest.approx(expected, abs=1e-12)
    assert 0.0 < score.ci[0] <= score.value <= score.ci[1] < 1.0


def test_loss_is_minimized():
    rng = np.random.default_rng(15)
    y = rng.permutation(np.r_[np.ones(40, int), np.zeros(40, int)])
    good = _binary_probs(np.where(y == 1, 0.8, 0.2))
    bad = _binary_probs(np.full(y.size, 0.5))
    ev = {"bad": Evidence({0: (y, [bad])}), "good": Evidence({0: (y, [good])})}
    scores = score_candidates(ev, "loss", "minimize", _cfg())
    assert scores["good"].value == pytest.approx(log_loss(y, good))
    assert scores["good"].diff_ci == (0.0, 0.0)  # the reference: lowest loss
    assert scores["bad"].diff == pytest.approx(math.log(2) - log_loss(y, good))
    assert scores["bad"].diff_ci[0] > 0 and not scores["bad"].indistinguishable
    assert choose(scores, {"bad": 1, "good": 10}, "smallest_within_ci", "minimize") == "good"
    with pytest.raises(ConfigError, match="valid directions: maximize, minimize"):
        score_candidates(ev, "loss", "downhill", _cfg())


# ------------------------------------------------------------------------- choose


def _score(value: float, same: bool) -> Score:
    return Score(value=value, ci=(value, value), diff=0.0, diff_ci=(0.0, 0.0), indistinguishable=same, n=10, seeds=1)


def test_choose_best_with_ties():
    scores = {"a": _score(0.8, True), "b": _score(0.9, True), "c": _score(0.9, True), "d": _score(float("nan"), False)}
    assert choose(scores, {"a": 1, "b": 5, "c": 5, "d": 0}, "best", "maximize") == "b"  # tie: key order
    assert choose(scores, {"a": 1, "b": 5, "c": 3, "d": 0}, "best", "maximize") == "c"  # tie: fewer params
    assert choose(scores, {"a": 1, "b": 5, "c": 3, "d": 0}, "best", "minimize") == "a"  # nan is never best
    assert choose({}, {}, "best", "maximize") is None


def test_choose_smallest_within_ci_with_ties():
    scores = {"big": _score(0.90, True), "mid": _score(0.87, True), "mid2": _score(0.88, True), "tiny": _score(0.70, False)}
    params = {"big": 100, "mid": 40, "mid2": 40, "tiny": 5}
    assert choose(scores, params, "smallest_within_ci", "maximize") == "mid2"  # tie in params: better value
    assert choose(scores, params, "smallest_within_ci", "minimize") == "mid"
    assert choose(scores, {**params, "mid2": 39}, "smallest_within_ci", "maximize") == "mid2"
    assert choose(scores, params, "best", "maximize") == "big"
    none_same = {k: _score(v.value, False) for k, v in scores.items()}
    assert choose(none_same, params, "smallest_within_ci", "maximize") == "big"
    with pytest.raises(ConfigError, match="valid rules: best, smallest_within_ci"):
        choose(scores, params, "fastest", "maximize")
    with pytest.raises(ValueError, match="tiny"):
        choose(scores, {"big": 1, "mid": 1, "mid2": 1}, "best", "maximize")


def test_smallest_within_ci_picks_smaller_indistinguishable_model():
    rng = np.random.default_rng(16)
    y = rng.permutation(np.r_[np.ones(30, int), np.zeros(48, int)])
    base = rng.normal(size=y.size) + 1.0 * (2 * y - 1)
    big = _binary_probs(1 / (1 + np.exp(-base)))
    small = _binary_probs(1 / (1 + np.exp(-(base + 0.3 * rng.normal(size=y.size)))))  # close to big
    tiny = _binary_probs(rng.uniform(size=y.size))  # no signal
    ev = {("ttl", 10): Evidence({0: (y, [big])}), ("ttl", 4): Evidence({0: (y, [small])}), ("ttl", 1): Evidence({0: (y, [tiny])})}
    params = {("ttl", 10): 20_000_000, ("ttl", 4): 2_000_000, ("ttl", 1): 50_000}
    scores = score_candidates(ev, "auroc", "maximize", _cfg(resamples=1000))
    assert scores[("ttl", 10)].value > scores[("ttl", 4)].value
    assert scores[("ttl", 4)].indistinguishable and not scores[("ttl", 1)].indistinguishable
    assert choose(scores, params, "best", "maximize") == ("ttl", 10)
    assert choose(scores, params, "smallest_within_ci", "maximize") == ("ttl", 4)


# -------------------------------------------------------------------------- config


def test_selection_config_defaults():
    cfg = SelectionConfig()
    assert (cfg.rule, cfg.confidence, cfg.resamples, cfg.seed, cfg.folds) == ("smallest_within_ci", 0.95, 1000, 0, 1)
    assert RULES == ("best", "smallest_within_ci")
    assert SelectionConfig(folds=5, rule="best").folds == 5


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"rule": "x"}, "selection.rule 'x' is unknown; valid rules: best, smallest_within_ci"),
        ({"confidence": 1.0}, r"selection.confidence must be a number in \(0, 1\)"),
        ({"confidence": 0}, r"selection.confidence"),
        ({"confidence": "0.9"}, r"selection.confidence"),
        ({"resamples": 99}, r"selection.resamples must be an integer >= 100"),
        ({"resamples": 500.0}, r"selection.resamples"),
        ({"seed": -1}, r"selection.seed must be a non-negative integer"),
        ({"folds": 0}, r"selection.folds must be 1"),
        ({"folds": 2.5}, r"selection.folds"),
        ({"folds": True}, r"selection.folds"),
    ],
)
def test_selection_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        SelectionConfig(**kw)
