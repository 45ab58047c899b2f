"""Backbones by name, cut from their graph: timm:<model>, torchvision:<model> (2D and 3D) and a
user's module:<package.module>:<factory>. Every new family at a small input size with random
weights: its cut list, a truncated forward pass against the full model's own intermediate output,
a 1-epoch trial on real data, and ONNX export."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ttl_search.errors import BackboneError, CutError, WeightsError
from ttl_search.models import backbones as bb
from ttl_search.models.cost import count_params
from ttl_search.models.truncation import analyze_cuts, input_shape, truncate

FAMILIES = {
    # name: (cuts, stage ends at the default input size), the families no hand-written list covers
    "timm:convnext_atto": (16, [3, 6, 13, 16]),
    "torchvision:regnet_y_400mf": (17, [1, 2, 5, 11, 17]),
    "timm:regnetx_002": (14, [1, 2, 3, 7, 14]),
    "torchvision:mobilenet_v2": (19, [2, 4, 7, 14, 19]),
    "torchvision:mobilenet_v3_small": (13, [1, 2, 4, 9, 13]),
    "torchvision:resnext50_32x4d": (17, [4, 8, 14, 17]),
    "torchvision:wide_resnet50_2": (17, [4, 8, 14, 17]),
    "timm:tf_efficientnetv2_b0": (23, [2, 4, 6, 14, 23]),
    "torchvision:mnasnet0_5": (20, [3, 6, 9, 14, 20]),
    "torchvision:vgg11_bn": (8, [1, 3, 5, 7, 8]),
    "torchvision:googlenet": (12, [2, 4, 9, 12]),
    "timm:resnet26d": (11, [2, 5, 7, 9, 11]),
    "timm:mixnet_s": (18, [2, 4, 8, 14, 18]),
    "torchvision:r2plus1d_18": (10, [4, 6, 8, 10]),
}
TRANSFORMERS = {
    # Stretch: token sequences, cut after each encoder block; a ViT's input size is fixed when it is
    # built, so the name says it (?size=32). One stage: the token count never drops.
    "timm:vit_tiny_patch16_224?size=32": (13, [13]),
    "torchvision:vit_b_16?size=32": (13, [13]),
}
SMALL = {2: 32, 3: 16}
"""Test input side by spatial dimensions."""


def _test_cut(name: str) -> int:
    """The second stage end valid at the small input size (the whole network for short lists)."""
    spec = bb.get_backbone(name)
    valid = [r.index for r in analyze_cuts(name, SMALL[spec.dims], 2) if r.valid]
    ends = [e for e in bb.stage_ends(spec) if e in valid]
    return ends[1] if len(ends) > 1 else valid[-1]


@pytest.mark.parametrize("name", sorted(FAMILIES) + sorted(TRANSFORMERS))
def test_cut_list_and_truncated_forward(name):
    """The cut list; truncation keeps exactly the units before the cut, and its output is the
    full model's own intermediate output (a forward hook on the cut's module; tokens leave a unit
    channels-first, N x C x L)."""
    spec = bb.get_backbone(name)
    n, ends = {**FAMILIES, **TRANSFORMERS}[name]
    assert (len(spec.cuts), bb.stage_ends(spec)) == (n, ends)
    assert spec.family == name.partition(":")[0] and spec.analysis.traced and spec.analysis.seconds < 60
    loaded = bb.load_backbone(name, None)
    cut = _test_cut(name)
    size = SMALL[spec.dims]
    model = truncate(loaded, cut, num_classes=2, input_size=size).eval()
    row = analyze_cuts(name, size, 2)[cut - 1]
    assert count_params(model) == row.params
    kept = sum(count_params(unit) for _, _, unit in loaded.units[:cut])
    assert count_params(model.features) == kept < count_params(loaded.model)
    kept_keys = {k.split(".", 1)[1] for k in model.features.state_dict()}  # <unit>.<the model's own key>
    later = {k for _, _, unit in loaded.units[cut:] for k in unit.state_dict()}
    assert kept_keys <= spec.analysis.feature_keys and not kept_keys & later

    full = loaded.model.eval()
    cut_module = full.get_submodule(spec.cuts[cut - 1].name)
    seen = []
    cut_module.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, *input_shape(spec, size, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full(x)
        features = model.features(x)
        logits = model(x)
    own = seen[0].transpose(1, 2) if name in TRANSFORMERS else seen[0]
    assert len(seen) == 1 and torch.allclose(features, own, atol=1e-5)
    assert logits.shape == (2, 2) and (features.shape[1], tuple(features.shape[2:])) == (row.channels, row.spatial)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES) + ["timm:vit_tiny_patch16_224?size=32"])
def test_one_epoch_trial(name, shared_datasets_dir):
    from ttl_search.data import DataConfig
    from ttl_search.train.trial import TrialConfig, run_trial

    spec = bb.get_backbone(name)
    file = "breastmnist.npz" if spec.dims == 2 else "adrenalmnist3d.npz"
    if not (shared_datasets_dir / file).is_file():
        pytest.skip(f"real data file {shared_datasets_dir / file} is absent")
    cut = _test_cut(name) if spec.dims == 2 else bb.stage_ends(spec)[0]
    fraction = 0.25 if spec.dims == 2 else 0.1
    cfg = TrialConfig(backbone=name, weights="none", cut=cut, max_epochs=1, batch_size=32, latency_repeats=0,
                      input_size=SMALL[spec.dims], device="cpu",
                      data=DataConfig(file.removesuffix(".npz"), path=str(shared_datasets_dir / file),
                                      train_fraction=fraction))
    result = run_trial(cfg)
    assert result.status == "complete", result.reason
    assert (result.cut, result.cut_name, result.backbone) == (cut, spec.cuts[cut - 1].name, name)
    assert 0 <= result.val["auroc"] <= 1
    assert result.params < result.full["params"] or cut == len(spec.cuts)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES) + ["timm:vit_tiny_patch16_224?size=32"])
def test_onnx_export(name, tmp_path):
    import onnxruntime as ort

    from ttl_search.export import ONNX_OPSET, _export_onnx

    spec = bb.get_backbone(name)
    cut = _test_cut(name)
    size = SMALL[spec.dims]
    model = truncate(bb.load_backbone(name, None, in_channels=1), cut, num_classes=2, input_size=size).eval()
    x = torch.randn(3, *input_shape(spec, size, 1))
    _export_onnx(model, x[:1], tmp_path / "model.onnx", ONNX_OPSET)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]  # a batch of 3 through the dynamic batch axis
    assert got.shape == (3, 2) and abs(got - expected).max() < 1e-4


# ---------------------------------------------------------------------------------------------
# Weights, names and errors


def test_weights_from_local_files(tmp_path):
    from safetensors.torch import save_file

    name = "timm:regnetx_002"
    source = bb.load_backbone(name, None)
    state = source.model.state_dict()
    torch.save(state, tmp_path / "w.pth")
    head = {k: v for k, v in state.items() if not k.startswith("head.")}
    head["head.fc.weight"] = torch.zeros(5, state["head.fc.weight"].shape[1])  # fine-tuned on 5 classes
    save_file({k: v.contiguous() for k, v in head.items()}, str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "w.pth", tmp_path / "w.safetensors"):
        loaded = bb.load_backbone(name, str(path), in_channels=1)
        assert loaded.weights == str(path)
        assert torch.equal(loaded.model.s2.b1.conv1.conv.weight, source.model.s2.b1.conv1.conv.weight)
        assert loaded.model.stem.conv.weight.shape[1] == 1  # the first convolution, found in the graph
    broken = {k: v for k, v in state.items() if not k.startswith("s3.")}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="missing keys"):
        bb.load_backbone(name, str(tmp_path / "broken.pth"))


def test_named_weights_are_the_libraries_own():
    timm_spec = bb.get_backbone("timm:resnet26d")
    assert timm_spec.weight_names[:1] == ["bt_in1k"] and timm_spec.default_input_size == 224
    tagged = bb.get_backbone("timm:resnet26d.bt_in1k")
    assert tagged.weight_names[0] == "bt_in1k"
    tv = bb.get_backbone("torchvision:mobilenet_v3_small")
    assert tv.weight_names == ["IMAGENET1K_V1"]
    googlenet = bb.get_backbone("torchvision:googlenet")
    assert googlenet.weights[0].mean == (0.5, 0.5, 0.5)  # its transform_input, which the build leaves off
    assert any(k.startswith("aux1.") for k in googlenet.head_prefixes)  # no auxiliary head needed


def test_timm_weights_offline_give_a_clear_error():
    code = ("from ttl_search.models.backbones import load_backbone\n"
            "try:\n    load_backbone('timm:regnetx_002', 'pycls_in1k')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300).stdout
    assert out.startswith("WeightsError cannot fetch weights pycls_in1k for timm:regnetx_002")
    assert "offline, use a local file or 'none'" in out


@pytest.mark.parametrize("name,message", [
    ("keras:resnet50", "valid sources: torchvision, timm, module"),
    ("timm:convnext_atoo", "timm has no model 'convnext_atoo'; close names: convnext_atto"),
    ("torchvision:mobilenet_v9", "torchvision has no classification or video model 'mobilenet_v9'; close names: mobilenet_v2"),
    ("torchvision:fasterrcnn_resnet50_fpn", "no classification or video model"),
    ("timm:resnet26d.nope", "valid tags: bt_in1k"),
    ("timm:resnet26d?layers=3", "valid options: cuts=..., size=..."),
    ("timm:resnet26d?size=big", "size= must be a positive integer"),
    ("module:no_such_package.nets:build", "cannot import 'no_such_package.nets'"),
    ("module:os.path", "module:<package.module>:<factory>"),
    ("timm:swin_tiny_patch4_window7_224", "channels-last (N x S x S x C) between blocks at patch_embed.permute"),
])
def test_bad_names_say_what_is_valid(name, message):
    with pytest.raises(BackboneError) as info:
        bb.get_backbone(name)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cuts_and_size_by_hand_in_the_name():
    spec = bb.get_backbone("torchvision:resnet18?cuts=layer1,layer2,layer3,layer4&size=64")
    assert [c.name for c in spec.cuts] == ["layer1", "layer2", "layer3", "layer4"]
    assert bb.stage_ends(spec) == [1, 2, 3, 4] and spec.default_input_size == 64
    with pytest.raises(CutError, match="skip connection crosses the cut"):
        bb.get_backbone("torchvision:resnet18?cuts=layer1.0.bn1")


USER_PACKAGE = '''
import torch
from torch import nn


class Gated(nn.Module):
    """Control flow on tensor values: cannot be traced."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        y = self.conv(x)
        return y if y.max() > -1e9 else -y


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def gated():
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Gated(8), nn.ReLU(), Gated(8), nn.AdaptiveAvgPool2d(1))
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    package = tmp_path / "user_nets"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(USER_PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_nets"
    sys.modules.pop("user_nets", None)


def test_a_users_module_is_cut_by_the_same_analysis(user_package, tmp_path):
    name = f"module:{user_package}:small_cnn"
    spec = bb.get_backbone(name)
    assert [c.name for c in spec.cuts] == ["2", "6", "9"] and bb.stage_ends(spec) == [1, 3]
    assert spec.first_conv == "0" and spec.head_prefixes == ("12.weight", "12.bias") and spec.family == "module"
    loaded = bb.load_backbone(name, None, in_channels=1)  # its own first convolution takes one channel
    torch.save(loaded.model.state_dict(), tmp_path / "mine.pth")
    again = bb.load_backbone(name, str(tmp_path / "mine.pth"), in_channels=1)
    model = truncate(again, 2, num_classes=2, input_size=28).eval()
    assert [n for n, _ in model.features.named_children()] == ["2", "6"]
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 2)
    assert torch.equal(model.features[1].get_submodule("3").weight, loaded.model[3].weight)


def test_a_users_untraceable_module_takes_cuts_by_hand(user_package):
    with pytest.raises(BackboneError, match=r"cannot be traced by torch.fx in module '1'.*\?cuts="):
        bb.get_backbone(f"module:{user_package}:gated")
    spec = bb.get_backbone(f"module:{user_package}:gated?cuts=0,1+2,3&size=32")
    assert [c.name for c in spec.cuts] == ["0", "1+2", "3"] and not spec.analysis.traced
    model = truncate(bb.load_backbone(spec.name, None), 3, num_classes=2, input_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)
