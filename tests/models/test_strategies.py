"""The paper's strategies on a tiny backbone: what is trained, at which rate, and from what."""

from __future__ import annotations

import pytest
import torch

from ttl_search.models.backbones import load_backbone
from ttl_search.data import DataConfig
from ttl_search.errors import ConfigError
from ttl_search.models.strategies import STRATEGIES, build_strategy_model, fresh_parameters
from ttl_search.train.trial import TrialConfig, make_optimizer, run_trial


@pytest.fixture
def pretrained_file(tmp_path):
    """Stand-in 'pretrained' weights for test_cnn: a fixed random init saved to a file."""
    torch.manual_seed(123)
    path = tmp_path / "tiny_pretrained.pth"
    torch.save(load_backbone("test_cnn", None).model.state_dict(), path)
    return str(path)


def _trial(breastmnist, weights, **kw) -> TrialConfig:
    base = dict(backbone="test_cnn", weights=weights, cut=5, max_epochs=2, input_size=28, batch_size=64,
                latency_repeats=1, data=DataConfig("breastmnist", path=str(breastmnist), train_fraction=0.5))
    base.update(kw)
    return TrialConfig(**base)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_end_to_end(strategy, breastmnist, pretrained_file):
    cut = None if strategy == "full" else 5
    result = run_trial(_trial(breastmnist, pretrained_file, strategy=strategy, cut=cut), keep_state=True)
    assert result.status == "complete", result.reason
    assert result.strategy == strategy
    assert result.cut == (7 if strategy == "full" else 5)
    assert 0.0 <= result.test["auroc"] <= 1.0 and result.epochs == 2
    assert result.params > 0 and result.macs > 0 and result.state_dict


def test_lwft_frozen_units_get_no_gradients_and_two_learning_rates(pretrained_file):
    loaded = load_backbone("test_cnn", pretrained_file)
    built = build_strategy_model(loaded, "lwft", 7, 2, input_size=28, frozen_units=3)
    model = built.model
    loss = model(torch.randn(4, 3, 28, 28)).sum()
    loss.backward()
    units = list(model.features.children())
    for unit in units[:3]:
        assert all(p.grad is None and not p.requires_grad for p in unit.parameters())
    for unit in units[3:]:
        assert all(p.grad is not None for p in unit.parameters())
    optimizer = make_optimizer(TrialConfig(lr=1e-3), built.param_groups)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([1e-4, 1e-3])
    head_group = next(g for g in optimizer.param_groups if g["lr"] == pytest.approx(1e-3))
    assert {id(p) for p in head_group["params"]} == {id(p) for p in model.head.parameters()}
    with pytest.raises(ConfigError, match="frozen_units"):
        build_strategy_model(loaded, "lwft", 7, 2, input_size=28, frozen_units=7)


def test_lwft_frozen_units_do_not_change_in_training(breastmnist, pretrained_file):
    result = run_trial(_trial(breastmnist, pretrained_file, strategy="lwft", cut=7, frozen_units=3), keep_state=True)
    pretrained = torch.load(pretrained_file, weights_only=True)
    state = result.state_dict
    assert torch.equal(state["features.stem.0.weight"], pretrained["stem.0.weight"])
    assert torch.equal(state["features.layer1_1.bn2.running_mean"], pretrained["layer1.1.bn2.running_mean"])
    assert not torch.equal(state["features.layer2_0.conv1.weight"], pretrained["layer2.0.conv1.weight"])


def test_transfusion_top_is_half_width_and_fresh(pretrained_file):
    loaded = load_backbone("test_cnn", pretrained_file)
    model = build_strategy_model(loaded, "transfusion", 3, 2, input_size=32).model
    names = [n for n, _ in model.features.named_children()]
    assert names == ["stem", "layer1_0", "layer1_1", "layer2_0_half", "layer2_1_half", "layer3_0_half", "layer3_1_half"]
    pretrained = torch.load(pretrained_file, weights_only=True)
    # kept units carry the pretrained weights
    assert torch.equal(model.features.layer1_1.conv2.weight, pretrained["layer1.1.conv2.weight"])
    # re-created units: half the width (12 -> 6, 16 -> 8) and weights not from the file
    assert model.features.layer2_0_half.conv1.out_channels == 6
    assert model.features.layer3_1_half.conv2.out_channels == 8
    assert model.head.fc.in_features == 8
    assert fresh_parameters(model)
    assert model.features.layer2_0_half.conv1.weight.shape != pretrained["layer2.0.conv1.weight"].shape
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_transfusion_on_resnet50_halves_bottlenecks():
    loaded = load_backbone("resnet50", None)
    model = build_strategy_model(loaded, "transfusion", 8, 2, input_size=64).model
    assert model.features.layer3_0_half.conv3.out_channels == 512  # 1024 at full width
    assert model.head.fc.in_features == 1024  # 2048 at full width


def test_transfusion_rejects_unsupported_backbones():
    with pytest.raises(ConfigError, match="resnet50"):
        build_strategy_model(load_backbone("efficientnet_lite0", None), "transfusion", 5, 2, input_size=64)


def test_linear_probe_and_scratch(pretrained_file):
    loaded = load_backbone("test_cnn", pretrained_file)
    probe = build_strategy_model(loaded, "linear_probe", 5, 2, input_size=28)
    assert [g["name"] for g in probe.param_groups] == ["head"]
    assert not any(p.requires_grad for p in probe.model.features.parameters())
    scratch = build_strategy_model(loaded, "scratch", 5, 2, input_size=28).model
    ttl = build_strategy_model(loaded, "ttl", 5, 2, input_size=28).model
    assert not torch.equal(scratch.features.stem[0].weight, ttl.features.stem[0].weight)
    assert sum(p.numel() for p in scratch.parameters()) == sum(p.numel() for p in ttl.parameters())


def test_linear_probe_keeps_features_fixed(breastmnist, pretrained_file):
    result = run_trial(_trial(breastmnist, pretrained_file, strategy="linear_probe"), keep_state=True)
    pretrained = torch.load(pretrained_file, weights_only=True)
    assert torch.equal(result.state_dict["features.layer2_1.bn2.running_var"], pretrained["layer2.1.bn2.running_var"])
    assert result.trainable_params == 16 * 0 + 12 * 2 + 2
