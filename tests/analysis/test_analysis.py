"""SVCCA and linear CKA on constructed cases, conv-map handling, and `svcca` on a real debug study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ttl_search.analysis import (
    SVCCAOptions, cca, linear_cka, pool_to, position_index, random_baseline, run_svcca, svcca, svd_reduce, to_samples,
)
from ttl_search.errors import ConfigError, StudyError
from ttl_search.search.record import records
from ttl_search.storage import study_trials

REPO = Path(__file__).resolve().parents[2]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _features(n: int = 1500, p: int = 10, seed: int = 0) -> np.ndarray:
    """Correlated, anisotropic features (a realistic spectrum, not white noise)."""
    rng = _rng(seed)
    return rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) * np.linspace(3, 0.5, p)


# ---------------------------------------------------------------------------------------------
# Measures on constructed cases


def test_identical_representations_give_one():
    x = _features()
    res = svcca(x, x)
    assert res.mean == pytest.approx(1.0, abs=1e-9)
    assert np.allclose(res.coefficients, 1.0, atol=1e-9)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_transform_with_isotropic_scaling_gives_one_for_both():
    x = _features()
    q, _ = np.linalg.qr(_rng(1).standard_normal((10, 10)))
    y = 3.7 * x @ q + 5.0  # rotation/reflection, isotropic scaling, and a shift (features are centered)
    assert svcca(x, y).mean == pytest.approx(1.0, abs=1e-9)
    assert svcca(x, y).kept_x == svcca(x, y).kept_y
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-9)


def test_invertible_linear_transform_gives_one_for_svcca_keeping_every_direction():
    x = _features()
    u, _ = np.linalg.qr(_rng(2).standard_normal((10, 10)))
    v, _ = np.linalg.qr(_rng(3).standard_normal((10, 10)))
    a = u @ np.diag(np.geomspace(20, 0.05, 10)) @ v  # invertible, strongly anisotropic
    y = x @ a
    full = svcca(x, y, keep=1.0)
    assert full.kept_x == full.kept_y == 10
    assert full.mean == pytest.approx(1.0, abs=1e-8)
    # CKA is not invariant to such a transform; this shows the test can tell the two apart.
    assert linear_cka(x, y) < 0.9


def test_svd_step_keeps_the_directions_that_explain_the_variance():
    rng = _rng(4)
    base = np.linalg.qr(rng.standard_normal((4000, 3)))[0] * np.sqrt(4000)  # orthonormal columns, unit variance
    x = np.column_stack([10 * base[:, 0], 3 * base[:, 1], 0.01 * base[:, 2], np.full(4000, 7.0)])
    r99 = svd_reduce(x, 0.99)
    assert (r99.rank, r99.kept) == (3, 2)  # 100/109 < 0.99 <= 109/109.0001; the constant column has no variance
    assert svd_reduce(x, 0.9).kept == 1
    assert svd_reduce(x, 1.0).kept == 3
    assert np.allclose(r99.basis.T @ r99.basis, np.eye(2), atol=1e-10)


def test_cca_matches_the_textbook_formula():
    rng = _rng(5)
    x = rng.standard_normal((800, 4))
    y = np.column_stack([x[:, 0] + 0.5 * rng.standard_normal(800), x[:, 1] - x[:, 2] + 2 * rng.standard_normal(800),
                         rng.standard_normal(800)])
    xc, yc = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    m = np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)
    expected = np.sort(np.sqrt(np.clip(np.linalg.eigvals(m).real, 0, None)))[::-1][:3]
    assert np.allclose(cca(x, y), expected, atol=1e-8)


def test_partly_shared_features_score_between_baseline_and_one():
    rng = _rng(6)
    x = _features(2000, 6, seed=7)
    y = np.column_stack([x[:, :3] @ rng.standard_normal((3, 3)), 5 * rng.standard_normal((2000, 3))])
    res = svcca(x, y, keep=1.0)
    assert np.all(np.diff(res.coefficients) <= 1e-12)  # sorted, largest first
    assert np.allclose(res.coefficients[:3], 1.0, atol=1e-8)
    assert np.all(res.coefficients[3:] < 0.15)
    assert 0.5 < res.mean < 0.6


@pytest.mark.parametrize("kind", ["shuffled", "gaussian"])
def test_independent_random_features_land_near_the_baseline(kind):
    rng = _rng(8)
    x = _features(2000, 12, seed=9)
    y = rng.exponential(size=(2000, 8)) * np.linspace(1, 4, 8)  # independent of x, another distribution
    base = random_baseline(x, y, kind=kind, repeats=5, seed=1)
    sv = svcca(x, y).mean
    assert sv < 0.1 and base.svcca < 0.1
    assert abs(sv - base.svcca) < 0.03
    cka_value = linear_cka(x, y)
    assert cka_value < 0.02 and abs(cka_value - base.cka) < 0.01
    # ... and a related pair does not, while its baseline still says "unrelated".
    related = x[:, :8] + 0.3 * rng.standard_normal((2000, 8))
    related_base = random_baseline(x, related, kind=kind, repeats=5, seed=2)
    assert related_base.svcca < 0.1 and related_base.cka < 0.02
    assert svcca(x, related).mean > related_base.svcca + 0.5
    assert linear_cka(x, related) > related_base.cka + 0.5


def test_few_samples_inflate_svcca_and_the_baseline_shows_it():
    rng = _rng(10)
    x, y = rng.standard_normal((30, 20)), rng.standard_normal((30, 20))  # independent, but 30 samples for 20 dims
    base = random_baseline(x, y, repeats=5)
    assert svcca(x, y).mean > 0.5 and base.svcca > 0.5


def test_measures_reject_mismatched_samples():
    with pytest.raises(ConfigError, match="same samples"):
        svcca(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(ConfigError, match="same samples"):
        linear_cka(np.ones((5, 2)), np.ones((6, 2)))


# ---------------------------------------------------------------------------------------------
# Convolutional maps


def test_conv_maps_as_samples():
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    positions = to_samples(t, "positions")
    assert positions.shape == (2 * 4 * 5, 3)
    assert np.array_equal(positions[1 * 20 + 2 * 5 + 3], t[1, :, 2, 3].numpy())  # image-major, then row, column
    pooled = to_samples(t, "pool")
    assert pooled.shape == (2, 3) and np.allclose(pooled, t.mean((2, 3)).numpy())
    rows = position_index(2, 20, 4, seed=0)
    assert len(rows) == 8 and np.array_equal(rows, position_index(2, 20, 4, seed=0))
    assert set(rows[:4]) <= set(range(20)) and set(rows[4:]) <= set(range(20, 40))
    assert position_index(2, 20, 50, seed=0) is None  # asking for more than there are keeps every position
    assert np.array_equal(to_samples(t, "subsample", rows), positions[rows])
    assert pool_to(t, (2, 5)).shape == (2, 3, 2, 5)


def test_svcca_options_are_validated():
    with pytest.raises(ConfigError, match="positions, subsample, pool"):
        SVCCAOptions(spatial="flatten")
    with pytest.raises(ConfigError, match="test, val"):
        SVCCAOptions(split="train")
    with pytest.raises(ConfigError, match="keep"):
        SVCCAOptions(keep=1.5)


# ---------------------------------------------------------------------------------------------
# On a real study


def _png_ok(path: Path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 0.05  # not blank


def test_svcca_on_the_chosen_trial(study, tmp_path):
    from ttl_search.results import best_cut, open_study

    name, url = study
    best = best_cut(name, url)
    run = run_svcca(name, url, options=SVCCAOptions(samples=120), output=tmp_path, attach=False)
    units = run.units
    assert list(units["unit"]) == list(range(1, best["cut"] + 1))
    assert run.context["trial"] == best["trial"] and run.context["images"] == 120
    assert units[["svcca", "cka"]].apply(lambda c: c.between(0, 1)).all().all()
    # Fine-tuning changed the units, but they stay far more alike than unrelated features.
    assert (units["svcca"] > units["baseline_svcca"] + 0.3).all()
    assert (units["cka"] > units["baseline_cka"] + 0.3).all()
    diag = run.pairs[run.pairs["unit_a"] == run.pairs["unit_b"]]
    assert np.allclose(diag["svcca"], 1.0) and np.allclose(diag["cka"], 1.0)
    assert len(run.pairs) == best["cut"] * (best["cut"] + 1) // 2
    trials = {t.user_attrs["cut"]: t.user_attrs["val_auroc"] for t in open_study(name, url)[0].trials
              if t.user_attrs.get("strategy") == "ttl"}
    for r in units.itertuples():
        assert r.val_auroc == pytest.approx(trials[r.unit])
    for key in ("units_csv", "pairs_csv", "coefficients_csv", "json"):
        assert run.files[key].is_file()
    for key in ("units_png", "coefficients_png", "pairs_png"):
        _png_ok(run.files[key])


def test_frozen_backbone_is_identical_to_the_pretrained_one(study, tmp_path):
    """The linear probe never changes its units: a correct rebuild of the pretrained model gives
    exactly 1 at every unit; full fine-tuning does change them."""
    from ttl_search.results import open_study

    name, url = study
    trials = {r.strategy: r.ref for r in records(study_trials(open_study(name, url)[0]))}
    assert trials["linear_probe"].startswith("baselines:")  # --trial's form for the baselines study's trials
    opts = SVCCAOptions(samples=60, spatial="pool")
    probe = run_svcca(name, url, trials["linear_probe"], opts, tmp_path / "probe", attach=False).units
    assert len(probe) == 7
    assert np.allclose(probe["svcca"], 1.0, atol=1e-6) and np.allclose(probe["cka"], 1.0, atol=1e-6)
    full = run_svcca(name, url, trials["full"], opts, tmp_path / "full", attach=False).units
    assert full["cka"].min() < 0.99


def test_svcca_cli(study, tmp_path, capsys):
    from ttl_search.cli import main

    name, url = study
    assert main(["svcca", name, "--storage", url, "--spatial", "positions", "--samples", "40", "--output",
                 str(tmp_path), "--no-attach"]) == 0
    out = capsys.readouterr().out
    assert "every spatial position" in out and "svcca_units.png" in out
    assert main(["svcca", name, "--storage", url, "--trial", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no trial 99" in err and "completed trials: 0, 1" in err


def test_svcca_on_a_study_without_completed_trials(study):
    name, url = study
    import optuna

    cfg = dict(optuna.load_study(study_name=name, storage=url).user_attrs["config"], name="no-trials-analysis")
    empty = optuna.create_study(study_name="no-trials-analysis", storage=url, load_if_exists=True)
    empty.set_user_attr("config", cfg)
    with pytest.raises(StudyError, match="no completed trial"):
        run_svcca("no-trials-analysis", url)
