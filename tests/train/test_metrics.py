"""ttl_search.train.metrics against scikit-learn (the reference) and hand-computed values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from ttl_search.train import metrics as m
from ttl_search.errors import ConfigError, TTLSearchError

TOL = 1e-12


# ----------------------------------------------------------------------------- helpers


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _binary_probs(score: np.ndarray) -> np.ndarray:
    score = np.asarray(score, dtype=np.float64)
    return np.column_stack([1.0 - score, score])


def _random_case(seed: int, k: int, n: int, *, ties: bool, imbalance: float | None):
    """Labels and probabilities; ``ties`` rounds probs to 1 decimal, ``imbalance`` is p(class 0)."""
    rng = np.random.default_rng(seed)
    if imbalance is None:
        y = rng.integers(0, k, size=n)
    else:
        rest = (1.0 - imbalance) / (k - 1)
        y = rng.choice(k, size=n, p=[imbalance] + [rest] * (k - 1))
    for c in range(k):  # every class present, so sklearn's multi-class scorers accept it
        y[c] = c
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = _softmax(logits)
    if ties:
        if k == 2:
            probs = _binary_probs(np.round(probs[:, 1], 1))
        else:
            probs = np.round(probs, 1) + 1e-3  # strictly positive, many ties
            probs = probs / probs.sum(axis=1, keepdims=True)
    return y, probs


def _sk_auroc(y, probs):
    if probs.shape[1] == 2:
        return skm.roc_auc_score(y, probs[:, 1])
    return skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")


def _sk_ap(y, probs):
    if probs.shape[1] == 2:
        return skm.average_precision_score(y, probs[:, 1])
    return skm.average_precision_score(y, probs, average="macro")


def _sk_pr_trapz_binary(positive, score):
    precision, recall, _ = skm.precision_recall_curve(positive, score)
    return skm.auc(recall, precision)


def _sk_pr_trapz(y, probs):
    if probs.shape[1] == 2:
        return _sk_pr_trapz_binary(y == 1, probs[:, 1])
    return float(np.mean([_sk_pr_trapz_binary(y == k, probs[:, k]) for k in range(probs.shape[1])]))


def _sk_all(y, probs):
    pred = probs.argmax(axis=1)
    return {
        "auroc": _sk_auroc(y, probs),
        "auprc": _sk_ap(y, probs),
        "pr_auc_trapz": _sk_pr_trapz(y, probs),
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "f1_macro": skm.f1_score(y, pred, average="macro", zero_division=0),
    }


CASES = [
    pytest.param(seed, k, n, ties, imbalance, id=f"s{seed}-k{k}-n{n}-ties{ties}-imb{imbalance}")
    for seed, k, n, ties, imbalance in [
        (0, 2, 50, False, None),
        (1, 2, 200, True, None),
        (2, 2, 300, False, 0.9),
        (3, 2, 300, True, 0.95),
        (4, 3, 60, False, None),
        (5, 3, 250, True, None),
        (6, 3, 400, False, 0.8),
        (7, 3, 400, True, 0.9),
        (8, 2, 7, True, None),
        (9, 3, 9, True, None),
    ]
]


# --------------------------------------------------------------- comparison to sklearn


@pytest.mark.parametrize("seed,k,n,ties,imbalance", CASES)
def test_every_metric_matches_sklearn_on_random_inputs(seed, k, n, ties, imbalance):
    y, probs = _random_case(seed, k, n, ties=ties, imbalance=imbalance)
    ours = m.compute_metrics(y, probs)
    reference = _sk_all(y, probs)
    assert set(ours) == set(reference)
    for name, expected in reference.items():
        assert ours[name] == pytest.approx(expected, abs=TOL, rel=0), name


@pytest.mark.parametrize("seed,k,n,ties,imbalance", CASES)
def test_pr_auc_trapezoid_equals_sklearn_auc_of_pr_curve(seed, k, n, ties, imbalance):
    y, probs = _random_case(seed, k, n, ties=ties, imbalance=imbalance)
    assert abs(m.pr_auc_trapezoid(y, probs) - _sk_pr_trapz(y, probs)) <= TOL


def test_random_cases_really_have_ties_and_imbalance():
    """Guard the fixture: the 'ties' and 'imbalance' cases must be what they claim."""
    y, probs = _random_case(3, 2, 300, ties=True, imbalance=0.95)
    assert np.unique(probs[:, 1]).size < 20
    assert np.mean(y == 0) > 0.85
    y3, probs3 = _random_case(7, 3, 400, ties=True, imbalance=0.9)
    assert np.unique(probs3[:, 2]).size < 60


FIXED = [
    # binary, all-distinct scores
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]),
    # binary, ties across classes and within a class
    ([0, 1, 0, 1, 1, 0, 0, 1], [0.5, 0.5, 0.2, 0.9, 0.5, 0.2, 0.9, 0.1]),
    # binary, all scores equal
    ([0, 1, 1, 0, 1], [0.3, 0.3, 0.3, 0.3, 0.3]),
    # binary, perfect and inverted rankings
    ([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.9]),
    ([1, 0, 0, 0], [0.1, 0.2, 0.3, 0.9]),
]


@pytest.mark.parametrize("y,score", FIXED)
def test_fixed_binary_cases_match_sklearn(y, score):
    y = np.asarray(y)
    probs = _binary_probs(score)
    ours = m.compute_metrics(y, probs)
    for name, expected in _sk_all(y, probs).items():
        assert ours[name] == pytest.approx(expected, abs=TOL, rel=0), name


def test_fixed_three_class_case_matches_sklearn():
    y = np.array([0, 1, 2, 2, 1, 0, 2, 1])
    probs = np.array(
        [
            [0.6, 0.2, 0.2],
            [0.2, 0.6, 0.2],
            [0.2, 0.2, 0.6],
            [0.5, 0.3, 0.2],
            [0.2, 0.2, 0.6],
            [0.4, 0.4, 0.2],
            [0.1, 0.3, 0.6],
            [0.3, 0.5, 0.2],
        ]
    )
    ours = m.compute_metrics(y, probs)
    for name, expected in _sk_all(y, probs).items():
        assert ours[name] == pytest.approx(expected, abs=TOL, rel=0), name


def test_f1_macro_includes_labels_only_predicted():
    # class 2 is predicted but never true: sklearn counts it (F1 = 0) in the macro mean
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    expected = skm.f1_score(y, probs.argmax(axis=1), average="macro", zero_division=0)
    assert m.f1_macro(y, probs) == pytest.approx(expected, abs=TOL)
    assert m.f1_macro(y, probs) == pytest.approx((2 / 3 + 1.0 + 0.0) / 3, abs=TOL)


def test_balanced_accuracy_ignores_labels_absent_from_y_true():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = skm.balanced_accuracy_score(y, probs.argmax(axis=1))
    assert m.balanced_accuracy(y, probs) == pytest.approx(expected, abs=TOL)
    assert m.balanced_accuracy(y, probs) == pytest.approx(0.75, abs=TOL)


def test_multiclass_with_absent_class_averages_present_classes():
    rng = np.random.default_rng(11)
    y = rng.choice([0, 2], size=40)
    probs = _softmax(rng.normal(size=(40, 3)))
    for ours, binary in [
        (m.auroc, skm.roc_auc_score),
        (m.average_precision, skm.average_precision_score),
        (m.pr_auc_trapezoid, _sk_pr_trapz_binary),
    ]:
        expected = np.mean([binary(y == k, probs[:, k]) for k in (0, 2)])
        assert ours(y, probs) == pytest.approx(expected, abs=TOL), ours.__name__


# ------------------------------------------------------------------- hand-computed values


def test_auroc_hand_computed():
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert m.auroc(np.array([0, 0, 1, 1]), _binary_probs([0.1, 0.4, 0.35, 0.8])) == 0.75


def test_auroc_ties_count_half():
    # pos scores 0.5, 0.9; neg scores 0.5, 0.1 -> pairs: tie(0.5) + 1 + 1 + 1 = 3.5 / 4
    y = np.array([1, 0, 1, 0])
    assert m.auroc(y, _binary_probs([0.5, 0.5, 0.9, 0.1])) == pytest.approx(0.875, abs=TOL)


def test_average_precision_and_trapezoid_hand_computed():
    # sorted desc: 0.8(+) 0.4(-) 0.35(+) 0.1(-)
    # curve (R, P): (0.5, 1), (0.5, 0.5), (1, 2/3), (1, 0.5), then (0, 1)
    y = np.array([0, 0, 1, 1])
    probs = _binary_probs([0.1, 0.4, 0.35, 0.8])
    assert m.average_precision(y, probs) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=TOL)
    # trapezoids: 0->0.5 between P=1 and P=1; 0.5->1 between P=0.5 and P=2/3
    expected = 0.5 * 1.0 + 0.5 * (0.5 + 2 / 3) / 2
    assert m.pr_auc_trapezoid(y, probs) == pytest.approx(expected, abs=TOL)


def test_accuracy_hand_computed():
    y = np.array([0, 1, 1, 0, 1])
    probs = _binary_probs([0.2, 0.7, 0.4, 0.6, 0.9])
    assert m.accuracy(y, probs) == pytest.approx(0.6, abs=TOL)


# ----------------------------------------------------------------------- undefined cases


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_auroc_is_nan(label):
    y = np.full(5, label)
    probs = _binary_probs([0.1, 0.2, 0.3, 0.4, 0.5])
    assert math.isnan(m.auroc(y, probs))
    assert math.isnan(m.compute_metrics(y, probs)["auroc"])


def test_single_class_multiclass_auroc_is_nan():
    y = np.full(4, 2)
    probs = _softmax(np.random.default_rng(0).normal(size=(4, 3)))
    assert math.isnan(m.auroc(y, probs))


def test_no_positive_ap_and_pr_auc_are_nan():
    y = np.zeros(4, dtype=int)
    probs = _binary_probs([0.1, 0.2, 0.3, 0.4])
    assert math.isnan(m.average_precision(y, probs))
    assert math.isnan(m.pr_auc_trapezoid(y, probs))


def test_all_positive_ap_is_one():
    y = np.ones(4, dtype=int)
    probs = _binary_probs([0.1, 0.2, 0.3, 0.4])
    assert m.average_precision(y, probs) == pytest.approx(1.0, abs=TOL)
    assert m.pr_auc_trapezoid(y, probs) == pytest.approx(1.0, abs=TOL)


# ------------------------------------------------------------------ compute_metrics & co


def test_compute_metrics_keys_and_types():
    y, probs = _random_case(0, 3, 30, ties=False, imbalance=None)
    without = m.compute_metrics(y, probs)
    assert list(without) == [
        "auroc", "auprc", "pr_auc_trapz", "accuracy", "balanced_accuracy", "f1_macro"
    ]
    with_loss = m.compute_metrics(y, probs, loss=np.float32(0.25))
    assert list(with_loss) == list(without) + ["loss"]
    assert with_loss["loss"] == 0.25
    assert all(type(v) is float for v in with_loss.values())
    assert with_loss["auprc"] == m.average_precision(y, probs)
    assert set(with_loss) == set(m.METRICS)


def test_metric_directions():
    assert m.METRICS["loss"] == "minimize"
    assert m.metric_direction("loss") == "minimize"
    for name in ["auroc", "auprc", "pr_auc_trapz", "accuracy", "balanced_accuracy", "f1_macro"]:
        assert m.metric_direction(name) == "maximize"


def test_unknown_metric_lists_choices():
    with pytest.raises(ConfigError) as info:
        m.metric_direction("aucroc")
    message = str(info.value)
    assert "aucroc" in message
    for name in m.METRICS:
        assert name in message
    assert isinstance(info.value, TTLSearchError)


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "y,probs",
    [
        (np.array([0, 1, 1]), np.array([[0.5, 0.5], [0.2, 0.8]])),  # length mismatch
        (np.array([0, 1]), np.array([0.5, 0.8])),  # 1-D probs
        (np.array([0, 1]), np.array([[1.0], [1.0]])),  # K == 1
        (np.array([0, 2]), np.array([[0.5, 0.5], [0.2, 0.8]])),  # label out of range
        (np.array([0.5, 1.0]), np.array([[0.5, 0.5], [0.2, 0.8]])),  # non-integer labels
        (np.array([0, 1]), np.array([[np.nan, 0.5], [0.2, 0.8]])),  # NaN probs
        (np.array([], dtype=int), np.zeros((0, 2))),  # empty
    ],
)
def test_invalid_inputs_raise_value_error(y, probs):
    with pytest.raises(ValueError):
        m.compute_metrics(y, probs)
