"""Truncated models: cut table figures, per-cut shapes, really dropped layers, invalid cuts."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from ttl_search.models import backbones as bb
from ttl_search.models.cost import count_macs, count_params
from ttl_search.errors import ConfigError, CutError
from ttl_search.models.truncation import FlattenHead, PoolHead, analyze_cuts, input_shape, truncate, valid_cuts


def test_resnet50_matches_the_papers_table():
    rows = analyze_cuts("resnet50", 224, 2)
    assert len(rows) == 17
    params = {r.index: r.params for r in rows}
    assert abs(params[12] / 1e6 - 6.31) <= 0.01
    assert abs(params[14] / 1e6 - 8.55) <= 0.01
    assert abs(params[17] / 1e6 - 23.5) <= 0.02
    macs = {r.index: r.macs for r in rows}
    assert 2.8e9 <= macs[12] <= 2.9e9
    assert abs(macs[17] / 1e9 - 4.1) < 0.05
    assert all(r.valid for r in rows)


@lru_cache(maxsize=None)
def _loaded(name: str):
    return bb.load_backbone(name, None)


ALL_CUTS = [pytest.param(name, cut.index, id=f"{name}-{cut.index}",
                         # ~150 per-layer cuts of the DenseNet *_fine variants: the slow part
                         marks=[pytest.mark.slow] if name.endswith("_fine") else [])
            for name in bb.backbone_names() for cut in bb.get_backbone(name).cuts]


@pytest.mark.parametrize("name,cut", ALL_CUTS)
def test_every_cut_builds_and_matches_the_table(name, cut):
    spec = bb.get_backbone(name)
    row = analyze_cuts(name, spec.default_input_size, 2)[cut - 1]
    assert row.valid, row.reason
    model = truncate(_loaded(name), cut, num_classes=2).eval()
    x = torch.zeros(2, *input_shape(spec, spec.default_input_size, 3))
    with torch.no_grad():
        feats = model.features(x)
        out = model.head(feats)
    assert feats.shape[1] == row.channels
    assert tuple(feats.shape[2:]) == row.spatial
    assert out.shape == (2, 2)
    assert count_params(model) == row.params
    assert len(model.features) == cut


def test_dropped_layers_are_really_gone():
    loaded = bb.load_backbone("resnet50", None)
    model = truncate(loaded, 8, num_classes=2)
    assert count_params(model) == pytest.approx(1.446e6, abs=1e3)
    names = {n for n, _ in model.named_modules()}
    assert not any("layer3" in n or "layer4" in n for n in names)
    # The forward pass does not reach the dropped stages: MACs equal the table's, far below full.
    macs = count_macs(model.eval(), torch.zeros(1, 3, 224, 224))
    assert macs == analyze_cuts("resnet50", 224, 2)[7].macs
    assert macs < 0.5 * analyze_cuts("resnet50", 224, 2)[16].macs


def test_heads_classes_and_channels():
    loaded = bb.load_backbone("test_cnn", None, in_channels=1)
    model = truncate(loaded, 5, num_classes=7, head="flatten", input_size=32)
    assert isinstance(model.head, FlattenHead)
    row = analyze_cuts("test_cnn", 32, 7, 1, "flatten")[4]
    assert model.head.fc.in_features == row.channels * row.spatial[0] * row.spatial[1]
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 7)
    assert count_params(model) == row.params
    pooled = truncate(loaded, 5, num_classes=3, input_size=32)
    assert isinstance(pooled.head, PoolHead) and pooled.head.fc.out_features == 3
    assert torch.count_nonzero(pooled.head.fc.bias) == 0


def test_3d_truncation_one_channel():
    loaded = bb.load_backbone("r3d_18", None, in_channels=1)
    model = truncate(loaded, 5, num_classes=2, input_size=28)
    assert model(torch.randn(2, 1, 28, 28, 28)).shape == (2, 2)


def test_densenet121_full_depth_is_invalid_at_28px():
    rows = analyze_cuts("densenet121", 28, 2)
    invalid = [r for r in rows if not r.valid]
    assert invalid and invalid[-1].index == 8
    assert "28 px" in invalid[0].reason
    assert valid_cuts("densenet121", 28) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(CutError, match="invalid at 28 px"):
        truncate(bb.load_backbone("densenet121", None), 8, 2, input_size=28)


class _Unpadded(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3)
        self.b = torch.nn.Conv2d(4, 4, 3)
        self.c = torch.nn.Conv2d(4, 4, 1)


def test_a_unit_that_fails_makes_it_and_later_cuts_invalid():
    spec = bb.BackboneSpec(
        name="test_unpadded", description="x", dims=2, default_input_size=8, build=_Unpadded,
        units=lambda m: [("a", 1, m.a), ("b", 1, m.b), ("c", 2, m.c)], first_conv="a", head_prefixes=(),
        test_only=True,
    )
    bb.register(spec)
    try:
        assert all(r.valid for r in analyze_cuts("test_unpadded", 8, 2))
        rows = analyze_cuts("test_unpadded", 4, 2)  # 4 px -> 2 px after a; b's 3x3 kernel no longer fits
        assert [r.valid for r in rows] == [True, False, False]
        assert "4 px" in rows[1].reason and "cut 2" in rows[2].reason
        assert valid_cuts("test_unpadded", 4) == [1]
    finally:
        bb.unregister("test_unpadded")
        analyze_cuts.cache_clear()


@pytest.mark.parametrize("cut", [0, 18, -1, "3"])
def test_out_of_range_cut_lists_valid_cuts(cut):
    with pytest.raises(CutError) as info:
        truncate(bb.load_backbone("test_cnn", None), cut, 2)
    assert "valid cuts: 1..7" in str(info.value)


def test_bad_head_and_classes():
    loaded = bb.load_backbone("test_cnn", None)
    with pytest.raises(ConfigError, match="pool, flatten"):
        truncate(loaded, 3, 2, head="attention")
    with pytest.raises(ConfigError, match="num_classes"):
        truncate(loaded, 3, 1)


@pytest.mark.parametrize("name", bb.backbone_names())
def test_mac_counts_equal_torchs_flop_counter_on_every_backbone(name):
    # count_macs counts convolutions and linear layers with hooks; torch's FlopCounterMode counts
    # the same operators (2 FLOPs per MAC) but costs seconds to import: they must agree exactly.
    from torch.utils.flop_counter import FlopCounterMode

    from ttl_search.models.truncation import input_shape

    spec = bb.get_backbone(name)
    model = truncate(bb.load_backbone(name, None), len(spec.cuts), num_classes=3).eval()
    x = torch.zeros(1, *input_shape(spec, 32 if spec.dims == 3 else 64, 3))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    assert count_macs(model, x) == counter.get_total_flops() // 2 > 0
