"""Cuts read off a model's graph: equal to the hand-written lists of every registered family,
index for index; models that cannot be traced, or trace differently in training mode; cuts given by
hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ttl_search.errors import BackboneError, CutError
from ttl_search.models import backbones as bb
from ttl_search.models.graph import analyze_graph, bind_units

REGISTERED = [n for n in bb.backbone_names() if not n.endswith("_fine")]

GRAPH_STAGE_ENDS = {
    # DenseNet: a transition (BN-ReLU-conv-pool) halves the resolution at its end, so its output
    # belongs to the next stage by resolution; the hand-written list ends each stage with its
    # transition. EfficientNet: the hand-written stages are the paper's seven MBConv stages, two
    # pairs of which share a resolution (14 and 7 px at 224 px input).
    "densenet121": [2, 4, 6, 8],
    "densenet201": [2, 4, 6, 8],
    "efficientnet_b0": [2, 4, 6, 12, 18],
    "efficientnet_lite0": [2, 4, 6, 12, 18],
}


def _kept(units, k) -> set[int]:
    """The tensors (parameters and buffers) units 1..k hold, by identity."""
    return {id(t) for _, _, u in units[:k] for t in list(u.parameters()) + list(u.buffers())}


def _outputs(units, x) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for _, _, unit in units:
            x = unit(x)
            outs.append(x)
    return outs


@pytest.mark.parametrize("name", REGISTERED)
def test_graph_cuts_equal_the_hand_written_lists(name):
    """Cut k of the graph keeps exactly the tensors cut k of the hand-written list keeps, and
    computes the same feature map; the stage ends differ where GRAPH_STAGE_ENDS says why."""
    spec = bb.get_backbone(name)
    analysis = analyze_graph(spec.build, name, spec.default_input_size)
    loaded = bb.load_backbone(name, None)
    model = loaded.model.eval()
    graph_units, hand_units = bind_units(analysis, model), loaded.units
    assert len(graph_units) == len(hand_units) == len(spec.cuts)
    size = 64 if spec.dims == 2 else 16
    x = torch.randn(1, 3, *(size,) * spec.dims, generator=torch.Generator().manual_seed(0))
    for k, (g, h) in enumerate(zip(_outputs(graph_units, x), _outputs(hand_units, x)), start=1):
        assert _kept(graph_units, k) == _kept(hand_units, k), (name, k)
        assert torch.equal(g, h), (name, k)
        assert analysis.cuts[k - 1].shape[0] == g.shape[1] and len(analysis.cuts[k - 1].shape) == 1 + spec.dims
    assert analysis.stage_ends == GRAPH_STAGE_ENDS.get(name, bb.stage_ends(spec))


@pytest.mark.slow
@pytest.mark.parametrize("name,layers", [("densenet121_fine", (6, 12, 24)), ("densenet201_fine", (6, 12, 48))])
def test_densenet_fine_cuts_refine_the_graph_cuts(name, layers):
    """A dense layer's concatenated output is no node of torchvision's graph (each layer
    concatenates all earlier outputs anew), so the graph finds the block-level cuts; every one of
    them is a cut of the fine hand-written list, which stays as written."""
    spec = bb.get_backbone(name)
    analysis = analyze_graph(spec.build, name, spec.default_input_size)
    loaded = bb.load_backbone(name, None)
    graph_units, hand_units = bind_units(analysis, loaded.model.eval()), loaded.units
    hand_kept = [_kept(hand_units, k) for k in range(1, len(hand_units) + 1)]
    matches = [hand_kept.index(_kept(graph_units, k)) + 1 for k in range(1, len(graph_units) + 1)]
    names = [spec.cuts[m - 1].name for m in matches]
    assert names == ["stem", f"denseblock1.denselayer{layers[0]}", "transition1", f"denseblock2.denselayer{layers[1]}",
                     "transition2", f"denseblock3.denselayer{layers[2]}", "transition3", "norm5"]
    assert len(hand_units) > 60  # the fine list: after every dense layer


# ---------------------------------------------------------------------------------------------
# Models that cannot be traced, or trace differently in training mode


class Gate(nn.Module):
    """A conv block with Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.abs().max() > 1e9:
            y = y / y.abs().max()
        return torch.relu(y)


class UntraceableNet(nn.Module):
    def __init__(self, shift: bool = False) -> None:
        super().__init__()
        self.shift = shift
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Gate(8, 8, 1), Gate(8, 16, 2), Gate(16, 16, 1))
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        x = self.stem(x)
        if self.shift:
            x = x + 1  # outside any module: a chain of modules cannot reproduce it
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))


class ModeNet(nn.Module):
    """Halves a block's output in training mode only, in Python outside a leaf module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
        self.conv2 = nn.Conv2d(8, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.block(self.conv1(x))
        if self.training:
            x = x * 0.5
        return self.fc(self.conv2(x).mean((2, 3)))


def test_an_untraceable_model_says_why_and_how_to_give_its_cuts():
    with pytest.raises(BackboneError) as info:
        analyze_graph(UntraceableNet, "module:nets:untraceable", 32)
    message = str(info.value)
    assert "cannot be traced by torch.fx in module 'blocks.0'" in message
    assert "?cuts=" in message and "\n" not in message


def test_cuts_given_by_hand_run_the_modules_and_match_the_models_forward():
    analysis = analyze_graph(UntraceableNet, "module:nets:untraceable", 32, ["stem", "blocks.0", "blocks.1+blocks.2"])
    assert not analysis.traced and analysis.hand and "cannot be traced" in analysis.note
    assert [c.name for c in analysis.cuts] == ["stem", "blocks.0", "blocks.1+blocks.2"]
    assert analysis.stage_ends == [2, 3] and analysis.first_conv == "stem.0"
    model = UntraceableNet().eval()
    units = bind_units(analysis, model)
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.setdefault("blocks.0", o))
    model.blocks[2].register_forward_hook(lambda m, i, o: seen.setdefault("blocks.2", o))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    outs = _outputs(units, x)
    assert torch.equal(outs[1], seen["blocks.0"]) and torch.equal(outs[2], seen["blocks.2"])
    assert _kept(units, 3) == {id(t) for t in list(model.stem.parameters()) + list(model.stem.buffers())
                               + list(model.blocks.parameters()) + list(model.blocks.buffers())}
    assert analysis.feature_keys == {k for k in model.state_dict() if not k.startswith("fc.")}


@pytest.mark.parametrize("hand,why", [
    (["stem", "blocks.1"], "module 'blocks.1' does not take the output of the module before it"),
    (["blocks.0"], "module 'blocks.0' does not take the model's input"),
    (["stem", "blocks.9"], "no module 'blocks.9'; close module paths: blocks.2, blocks.1, blocks.0"),
])
def test_cuts_given_by_hand_that_do_not_chain_are_refused(hand, why):
    with pytest.raises(CutError) as info:
        analyze_graph(UntraceableNet, "module:nets:untraceable", 32, hand)
    assert why in str(info.value)


def test_a_computation_between_modules_given_by_hand_is_refused():
    with pytest.raises(CutError, match="does not take the output of the module before it"):
        analyze_graph(lambda: UntraceableNet(shift=True), "module:nets:shifted", 32, ["stem", "blocks.0"])


def test_a_model_whose_graph_depends_on_training_mode_is_refused():
    with pytest.raises(BackboneError) as info:
        analyze_graph(ModeNet, "module:nets:mode", 32)
    assert "differently in training and evaluation mode" in str(info.value) and "?cuts=" in str(info.value)
    # Cuts by hand before the mode-dependent code: the graph's units are the same in both modes.
    analysis = analyze_graph(ModeNet, "module:nets:mode", 32, ["conv1", "block"])
    assert analysis.traced and [c.name for c in analysis.cuts] == ["conv1", "block"]
    # After it: the listed modules would run as a chain, which training mode shows to be wrong.
    with pytest.raises(CutError, match="module 'conv2' does not take the output of the module before it in the "
                                       r"model's own forward \(training mode\)"):
        analyze_graph(ModeNet, "module:nets:mode", 32, ["conv1", "block", "conv2"])


def test_cuts_given_by_hand_on_a_traceable_model_are_checked_in_its_graph():
    spec = bb.get_backbone("resnet18")
    analysis = analyze_graph(spec.build, "resnet18", 224, ["maxpool", "layer1", "layer2", "layer3", "layer4"])
    assert analysis.traced and analysis.hand
    assert [c.name for c in analysis.cuts] == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert analysis.stage_ends == [2, 3, 4, 5]
    hand = bb.load_backbone("resnet18", None)
    units = bind_units(analysis, hand.model.eval())
    assert _kept(units, 3) == _kept(hand.units, 5)  # layer2 ends at the hand-written cut 5
    with pytest.raises(CutError, match="layer1.0.conv1.*skip connection crosses the cut"):
        analyze_graph(spec.build, "resnet18", 224, ["layer1.0.conv1", "layer1"])
    with pytest.raises(CutError, match="'layer1.0.relu' runs 2 times"):
        analyze_graph(spec.build, "resnet18", 224, ["layer1.0.relu"])
