"""Cut points read off a model's graph.

TruncatedTL cuts only where no skip connection crosses: everything after the cut depends on the
input through that one tensor. :func:`analyze_graph` traces a model with torch.fx (the leaf-module
and autowrap rules of torchvision's feature extraction and of timm, plus: convolution, linear and
normalisation layers and modules without submodules are single operations) and reads the cuts off
the graph:

1. **Separators.** A node is a separator when every value computed before it and used after it is
   the node itself: in a topological order, a node that every path from the input to the output
   passes through (a dominator) is exactly that. Nodes that do not depend on the input
   (parameters, constants) may cross; each unit recomputes them.
2. **Features and head.** The features end at the last separator before the head starts: the first
   separator that is not an ``N x C x spatial`` map (nor a token sequence after a ViT's patch
   embedding), or a global (adaptive) pooling, or whose map collapses to 1 where the one before
   did not, or that runs in a top-level ``fc``/``classifier``/``head`` module.
3. **Block outputs.** A separator strictly inside a *closed* module is no cut: a module stays
   closed (one block) unless it holds at least two blocks of one class (a block: a module with
   two or more convolution or linear layers on one path), or at least two such layers run by the
   generic ``nn.Sequential`` forward (a VGG ``features``), or is a module around such a stage
   (timm's ``ConvNeXtStage``). Residual, dense and inception units have no separator inside
   anyway; this rule keeps an MBConv block without its residual whole, and a transformer block
   (attention and MLP, each with its residual) one unit.
4. **Units with a layer each.** Between two kept cuts lies at least one convolution or linear
   layer: a normalisation, activation or pooling goes with the layer before it (a stem
   ``conv-bn-relu-maxpool`` is one unit; DenseNet's final ``norm5`` and ReLU go with the last dense
   block).
5. **Stages.** A stage ends where the next cut's output has a smaller spatial resolution.

Each cut is named by the deepest module whose call spans exactly its unit (``layer3.5``,
``features.4.1``), else by the module whose output it is, else by its node. Unit ``k`` is a
``GraphModule`` holding the nodes between cut ``k-1`` and cut ``k``: keeping units ``1..k`` keeps
exactly the modules and parameters the features use up to the cut. Graph constructs that depend on
training versus evaluation mode in Python code are found by tracing both modes and comparing the
units code for code. Token sequences (``N x L x C``) leave and enter units channels-first
(``N x C x L``), so that heads, probes and cut tables treat them as 1D maps; a model whose maps
turn channels-last between blocks (Swin) is refused.

A model that cannot be traced (Python control flow on tensor values...) can still be cut where its
author says: ``cuts`` given by hand as module paths, in forward order, are checked against the
model's own forward pass (each listed module must take exactly the previous one's output) and run
as chains of those modules (``a+b`` puts modules ``a`` and ``b`` in one unit).
"""

from __future__ import annotations

import bisect
import difflib
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from ..errors import BackboneError, CutError

log = logging.getLogger(__name__)

MAC_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
"""Layers that carry the multiply-accumulates: a unit must hold at least one."""
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
"""Normalisations (and their subclasses, e.g. timm's ``BatchNormAct2d``, ``LayerNorm2d``): one
operation each, run by their own ``forward`` so that training mode reaches them."""
MAC_FUNCTIONS = re.compile(r"^(conv\d?d|conv_transpose\dd|linear|_convolution|convolution)$")
"""Functional convolutions and linear layers (a unit holding one of these holds a layer)."""
GENERIC_FORWARDS = (nn.Sequential.forward,)
"""The forward of a plain container: its children run one after the other."""
HEAD_NAMES = ("fc", "classifier", "head", "heads", "last_linear", "logits")
"""Names of top-level modules that classify: the features end before the first of them runs (a
SqueezeNet's classifier is a convolution on a feature map, which shapes alone do not tell)."""
DEFAULT_SIZES = {2: 224, 3: 64}
"""Analysis input side by spatial dimensions when none is given."""


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class GraphCut:
    """One cut of a model, found in its graph (or given by hand)."""

    name: str
    """Module path whose output the cut is (``layer3.5``), or the node's qualified name."""
    node: str
    """Qualified name of the graph node (``""`` for cuts given by hand on an untraced model)."""
    stage: int
    """1-based stage: it changes where the spatial resolution drops."""
    stage_end: bool
    """True for the last cut of its stage."""
    shape: tuple[int, ...]
    """Output shape without the batch axis at the analysis input size."""


@dataclass(frozen=True)
class GraphAnalysis:
    """The cuts of one model at one input size, and how to build its units."""

    label: str
    """The model as users name it (``timm:convnext_atto``)."""
    cuts: tuple[GraphCut, ...]
    """The cuts in forward order."""
    input_size: int
    """Side of the (square or cubic) zero input the shapes were taken at."""
    in_channels: int
    """Input channels of the analysed model."""
    dims: int
    """Spatial dimensions (2 or 3)."""
    first_conv: str
    """Module path of the first convolution (adapted for other input channel counts)."""
    feature_keys: frozenset[str]
    """State-dict keys of the full model that the kept features use."""
    head_keys: tuple[str, ...]
    """The full model's other state-dict keys: its classifier (and auxiliary heads)."""
    seconds: float
    """Wall time of the analysis (tracing both modes, shapes, cuts, units)."""
    traced: bool
    """True when the units are graph segments; False for module chains given by hand."""
    hand: bool = False
    """True when the cuts were given by hand."""
    note: str = ""
    """Why the model runs as module chains (the tracing error), for messages."""
    segments: tuple[fx.Graph, ...] = ()
    """Traced models: the graph of every unit (its input is the previous cut's output)."""
    constants: dict[str, Any] = field(default_factory=dict)
    """Traced models: tensors the trace captured as constants (get_attr targets not in the model)."""
    chains: tuple[tuple[str, ...], ...] = ()
    """Untraced models: the module paths every unit runs in order."""

    @property
    def stage_ends(self) -> list[int]:
        return [i + 1 for i, c in enumerate(self.cuts) if c.stage_end]


# ---------------------------------------------------------------------------------------------
# Tracing


@dataclass
class _Call:
    path: str
    module: nn.Module
    start: int
    end: int
    input: fx.Node | None
    output: fx.Node | None


def _library_leaves() -> tuple[list[type], list[Callable]]:
    """torchvision's and timm's leaf modules and untraceable functions (those already imported:
    a model built from a library's layers has imported it)."""
    import sys

    leaves: list[type] = []
    functions: list[Callable] = []
    if "torchvision" in sys.modules:
        from torchvision.models.feature_extraction import _get_leaf_modules_for_ops

        leaves += _get_leaf_modules_for_ops()
    if "timm" in sys.modules:
        from timm.layers import get_notrace_functions, get_notrace_modules

        leaves += list(get_notrace_modules())
        functions += list(get_notrace_functions())
    return leaves, functions


def _is_generic_container(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and type(m).forward in GENERIC_FORWARDS


class _Tracer(fx.Tracer):
    """torch.fx tracer with the leaf rules of torchvision's feature extraction and of timm, plus:
    convolution, linear and normalisation layers (subclasses included) and modules without
    submodules are leaves (one operation each, run by their own forward, so that training mode and
    forward hooks reach them). Records every module call and a scope-qualified name per node."""

    def __init__(self, leaves: Sequence[type], functions: Sequence[Callable]) -> None:
        import torchvision

        super().__init__(autowrap_modules=(math, torchvision.ops), autowrap_functions=tuple(functions))
        self.leaves = tuple(leaves)
        self.calls: list[_Call] = []
        self.qualname: dict[fx.Node, str] = {}
        self._scope: list[str] = []
        self._counts: dict[str, int] = {}
        self.created: dict[fx.Node, int] = {}
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaves + MAC_LAYERS + NORM_LAYERS):
            return True
        if _is_generic_container(m):
            return False
        if super().is_leaf_module(m, module_qualified_name):
            return True
        return next(m.children(), None) is None

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        start = len(self.created)
        self._scope.append(path)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = path
            raise
        finally:
            self._scope.pop()
        first = next((a.node for a in list(args) + list(kwargs.values()) if isinstance(a, fx.Proxy)), None)
        self.calls.append(_Call(path, m, start, len(self.created), first,
                                out.node if isinstance(out, fx.Proxy) else None))
        return out

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.created[node] = len(self.created)
        scope = self._scope[-1] if self._scope else ""
        if kind == "call_module":
            base = str(target)
        else:
            base = (scope + "." if scope else "") + re.sub(r"_\d+$", "", node.name)
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        self.qualname[node] = base if n == 0 else f"{base}@{n}" if kind == "call_module" else f"{base}_{n}"
        return node


@dataclass
class _Traced:
    graph: fx.Graph
    calls: list[_Call]
    qualname: dict[fx.Node, str]
    constants: dict[str, Any]
    order: dict[fx.Node, int]
    """Creation index of every node: a topological order that call ranges index into."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def trace_model(model: nn.Module, label: str, train: bool) -> _Traced:
    """Trace ``model`` in training or evaluation mode; an untraceable model raises
    :class:`BackboneError` naming the module where tracing failed and why."""
    leaves, functions = _library_leaves()
    tracer = _Tracer(leaves, functions)
    model.train(train)
    before = set(dict(model.named_buffers()).keys()) | {n for n, _ in model.named_parameters()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the model's: say where and why
        where = f" in module {tracer.failed_in!r}" if tracer.failed_in else " in its forward"
        raise BackboneError(f"{label} cannot be traced by torch.fx{where}: {type(exc).__name__}: {_first_line(exc)}") from exc
    constants = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in before:
            try:
                constants[node.target] = _get_attr(model, node.target)
            except AttributeError:
                pass
    traced = _Traced(graph, tracer.calls, tracer.qualname, constants, tracer.created)
    _drop_identities(traced, dict(model.named_modules()))
    return traced


def _drop_identities(traced: _Traced, modules: dict[str, nn.Module]) -> None:
    """Remove ``nn.Identity`` calls (timm's absent ``norm_pre``, ConvNeXt's first ``downsample``...):
    they compute nothing, and a cut after one would be named after it."""
    for node in list(traced.graph.nodes):
        if node.op == "call_module" and type(modules.get(node.target)) is nn.Identity and len(node.args) == 1 \
                and isinstance(node.args[0], fx.Node):
            source = node.args[0]
            node.replace_all_uses_with(source)
            for call in traced.calls:
                call.output = source if call.output is node else call.output
                call.input = source if call.input is node else call.input
            traced.graph.erase_node(node)
            del traced.order[node], traced.qualname[node]


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------
# Reading the graph


def _input_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "placeholder")


def _depends_on_input(graph: fx.Graph) -> set[fx.Node]:
    x = _input_node(graph)
    dep = {x}
    for node in graph.nodes:
        if node is not x and any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen = {node}
    stack = [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _separators(graph: fx.Graph, target: fx.Node, order: dict[fx.Node, int], dep: set[fx.Node]) -> list[fx.Node]:
    """Input-dependent nodes (before ``target``, ``target`` included unless it is the output) that
    no other input-dependent value needed for ``target`` jumps over."""
    needed = _ancestors(target) & dep
    reach = -1
    seps = []
    for node in graph.nodes:
        if node not in needed:
            continue
        if node.op != "placeholder" and node.op != "output" and reach <= order[node]:
            seps.append(node)
        users = [order[u] for u in node.users if u in needed or u is target]
        reach = max([reach, order[node], *users])
    return seps


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    """The node's output shape (batch included), None when it is not a tensor."""
    return node.meta.get("shape")


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _is_global_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]).__name__.startswith(("Adaptive", "SelectAdaptive"))
    return node.op in ("call_function", "call_method") and _target_name(node).startswith("adaptive_")


def _mac_count(m: nn.Module) -> int:
    return sum(isinstance(x, MAC_LAYERS) for x in m.modules())


def _is_mac_node(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and bool(MAC_FUNCTIONS.match(_target_name(node)))


class _Structure:
    """Which modules are blocks (two or more layers in a row) and which are open (rule 3)."""

    def __init__(self, traced: _Traced, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.depth: dict[int, int] = {}
        self._nodes = list(traced.order)  # creation order
        self._index = [traced.order[n] for n in self._nodes]
        for call in traced.calls:
            self.depth[id(call.module)] = max(self.depth.get(id(call.module), 0), self._call_depth(call))
        self._open: dict[int, bool] = {}

    def _weight(self, node: fx.Node) -> int:
        if node.op == "call_module":  # a leaf: its layers cannot be seen in the graph
            return min(_mac_count(self.modules[node.target]), 2)
        return int(_is_mac_node(node))

    def _call_depth(self, call: _Call) -> int:
        """The most layers on one path through the nodes of ``call``."""
        depth: dict[fx.Node, int] = {}
        for node in self._nodes[bisect.bisect_left(self._index, call.start):bisect.bisect_left(self._index, call.end)]:
            depth[node] = self._weight(node) + max((depth.get(a, 0) for a in node.all_input_nodes), default=0)
        return max(depth.values(), default=0)

    def is_block(self, m: nn.Module) -> bool:
        if next(m.children(), None) is None:
            return False
        return self.depth.get(id(m), min(_mac_count(m), 2)) >= 2

    def stage_like(self, m: nn.Module) -> bool:
        """Two or more blocks of one class (a stage's repeated blocks; not a transformer block's
        attention and MLP, nor a block's own layers)."""
        classes = [type(c) for c in m.children() if self.is_block(c)]
        return any(classes.count(t) >= 2 for t in set(classes))

    def is_open(self, m: nn.Module) -> bool:
        """Whether cuts may fall inside ``m`` (see the module docstring, rule 3)."""
        key = id(m)
        if key not in self._open:
            self._open[key] = (self.stage_like(m)
                               or (_is_generic_container(m) and sum(_mac_count(c) > 0 for c in m.children()) >= 2)
                               or any(self.stage_like(c) for c in m.children()))
        return self._open[key]


def _has_layer(nodes: Sequence[fx.Node], modules: dict[str, nn.Module]) -> bool:
    return any((n.op == "call_module" and _mac_count(modules[n.target]) > 0) or _is_mac_node(n) for n in nodes)


def _spatial(shape: tuple[int, ...]) -> int:
    """Spatial positions of a C x spatial map."""
    return math.prod(shape[1:])


def _stages(shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, bool]]:
    stages = [1]
    for prev, cur in zip(shapes, shapes[1:]):
        stages.append(stages[-1] + (_spatial(cur) < _spatial(prev)))
    return [(s, i == len(stages) - 1 or stages[i + 1] != s) for i, s in enumerate(stages)]


def _feature_end(traced: _Traced, modules: dict[str, nn.Module], dims: int, label: str) -> fx.Node:
    graph = traced.graph
    order, dep = traced.order, _depends_on_input(graph)
    output = next(n for n in graph.nodes if n.op == "output")
    head_calls = [c for c in traced.calls if c.path in HEAD_NAMES]
    end, prev_shape, flat = None, None, None
    for node in _separators(graph, output, order, dep):
        shape = _shape(node)
        if shape is None:
            continue  # a tuple or a size: no cut, no head
        if _channels_last(node, prev_shape, dims):
            raise BackboneError(f"{label} turns its feature maps channels-last (N x {' x '.join('S' * dims)} x C) "
                                f"between blocks at {traced.qualname[node]} (a Swin-style layout); its cuts would "
                                "pool the wrong axes: not supported")
        is_map = len(shape) == 2 + dims
        # Tokens (N x L x C) start where a flattened map (N x C x L) is transposed, as a ViT's patch
        # embedding does; a flattened map that is not transposed next is a pooling head's input.
        was_tokens = prev_shape is not None and len(prev_shape) == 3
        tokens = len(shape) == 3 and (was_tokens or (flat is not None and _transposes(node)))
        if len(shape) == 3 and not tokens and flat is None and not was_tokens:
            flat = node
            continue
        if flat is not None and not tokens:
            break
        collapsed = is_map and prev_shape is not None and len(prev_shape) == len(shape) and \
            all(d == 1 for d in shape[2:]) and any(d > 1 for d in prev_shape[2:])
        in_head = any(c.start <= order[node] < c.end for c in head_calls)
        if not (is_map or tokens) or collapsed or in_head or _is_global_pool(node, modules):
            break
        end, prev_shape, flat = node, shape, None
    if end is None:
        first = next((n for n in _separators(graph, output, order, dep)), None)
        what = f"its first separate output ({traced.qualname.get(first, '?')}) has shape {_shape(first)}" if first else "it has none"
        raise BackboneError(f"{label} has no {dims}D feature map (N x C x {' x '.join('S' * dims)}) or token sequence "
                            f"after a patch embedding (N x L x C) to cut: {what}")
    return end


def _channels_last(node: fx.Node, prev_shape: tuple[int, ...] | None, dims: int) -> bool:
    """Whether ``node`` permutes a channels-first map to channels-last."""
    if node.op not in ("call_method", "call_function") or _target_name(node) != "permute" or prev_shape is None:
        return False
    order = [a for a in node.args[1:]] if len(node.args) > 2 else list(node.args[1]) if len(node.args) == 2 else []
    return len(prev_shape) == 2 + dims and order[:1] == [0] and order[-1:] == [1]


def _transposes(node: fx.Node) -> bool:
    """Whether ``node`` swaps the last two axes of a rank-3 tensor (N x C x L -> N x L x C)."""
    name = _target_name(node) if node.op in ("call_method", "call_function") else ""
    args = [a for a in node.args[1:]] if len(node.args) > 1 else list(node.kwargs.values())
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    return (name == "transpose" and sorted(a % 3 for a in args if isinstance(a, int)) == [1, 2]) or \
        (name == "permute" and [a % 3 for a in args if isinstance(a, int)] == [0, 2, 1])


def _is_tokens(shape: tuple[int, ...] | None, dims: int) -> bool:
    """A sequence of tokens (N x L x C), as transformers pass between blocks."""
    return shape is not None and len(shape) == 3 and len(shape) != 2 + dims


def _node_by_name(traced: _Traced, name: str) -> fx.Node | None:
    """The output of the last call of module ``name`` (``path@k``: its k-th extra call), or the
    node with that qualified name."""
    path, _, k = name.partition("@")
    calls = [c for c in traced.calls if c.path == path and c.output is not None]
    if calls and not k:
        return calls[-1].output if len(calls) == 1 else None
    if calls and k.isdigit() and int(k) < len(calls):
        return calls[int(k)].output
    return next((n for n, q in traced.qualname.items() if q == name), None)


def _cut_name(node: fx.Node, prev: fx.Node, traced: _Traced) -> str:
    order = traced.order
    calls = [c for c in traced.calls if c.output is node and c.path and c.start <= order[node] < c.end]
    exact = [c for c in calls if c.input is prev]
    own = [c for c in exact if not _is_generic_container(c.module)]  # a block rather than its wrappers
    pool = own or exact or calls
    if not pool:
        return traced.qualname[node]
    return max(pool, key=lambda c: (c.path.count("."), c.start)).path


def _choose_cuts(traced: _Traced, modules: dict[str, nn.Module], end: fx.Node) -> list[fx.Node]:
    graph = traced.graph
    order, dep = traced.order, _depends_on_input(graph)
    seps = _separators(graph, end, order, dep)
    structure = _Structure(traced, modules)
    closed = [c for c in traced.calls if c.path and not structure.is_open(c.module)]
    candidates = [s for s in seps if s is end or (_shape(s) is not None and not any(
        c.start <= order[s] < c.end and c.output is not s for c in closed))]
    if candidates[-1] is not end:
        candidates.append(end)
    needed = _ancestors(end)
    nodes = [n for n in graph.nodes if n in needed]
    # Group the stretches between candidates into units that each hold a layer.
    cuts: list[fx.Node] = []
    start = -1
    stretches = []
    for b in candidates:
        stretches.append((b, _has_layer([n for n in nodes if start < order[n] <= order[b]], modules)))
        start = order[b]
    unit_has_layer = False
    for i, (b, has_layer) in enumerate(stretches):
        unit_has_layer |= has_layer
        next_has_layer = i + 1 < len(stretches) and stretches[i + 1][1]
        if i == len(stretches) - 1 or (unit_has_layer and next_has_layer):
            cuts.append(b)
            unit_has_layer = False
    return cuts


def _segment(graph: fx.Graph, prev: fx.Node, cut: fx.Node, order: dict[fx.Node, int],
             dep: set[fx.Node], tokens_in: bool = False, tokens_out: bool = False) -> fx.Graph:
    """The nodes computing ``cut`` from ``prev`` (and what does not depend on the input), with
    canonical names so that two segments compare by their code. Token sequences cross a cut
    channels-first (N x C x L), as feature maps do, so that every head and probe pools tokens."""
    needed = {n for n in _ancestors(cut) if n in dep and order[prev] < order[n]}
    stack = list(needed)
    while stack:  # what those use that does not depend on the input (parameters, constants)
        for a in stack.pop().all_input_nodes:
            if a not in dep and a not in needed:
                needed.add(a)
                stack.append(a)
    seg = fx.Graph()
    env: dict[fx.Node, fx.Node] = {prev: seg.placeholder("x")}
    if tokens_in:
        env[prev] = seg.call_method("transpose", (env[prev], 1, 2))

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            raise CutError(f"internal error: {n.name} crosses the cut at {cut.name}")
        return env[n]

    for i, node in enumerate(n for n in graph.nodes if n in needed):
        if node.op == "placeholder":
            env[node] = seg.create_node("placeholder", node.target, node.args, {}, name=f"extra{i}")
            continue
        env[node] = seg.create_node(node.op, node.target, fx.map_arg(node.args, lookup),
                                    fx.map_arg(node.kwargs, lookup), name=f"v{i}")
    out = env[cut]
    if tokens_out:
        out = seg.call_method("transpose", (out, 1, 2))
    seg.output(out)
    return seg


def _segments(traced: _Traced, cuts: Sequence[fx.Node], dims: int) -> list[fx.Graph]:
    graph = traced.graph
    order, dep = traced.order, _depends_on_input(graph)
    prev = _input_node(graph)
    out = []
    for cut in cuts:
        out.append(_segment(graph, prev, cut, order, dep, _is_tokens(_shape(prev), dims), _is_tokens(_shape(cut), dims)))
        prev = cut
    return out


def _code(seg: fx.Graph) -> str:
    return seg.python_code("self").src


def bind_segment(seg: fx.Graph, model: nn.Module, constants: dict[str, Any]) -> fx.GraphModule:
    """A unit: ``seg`` as a GraphModule whose modules and parameters are ``model``'s own (shared)."""
    attrs: dict[str, Any] = {}
    for node in seg.nodes:
        if node.op == "call_module":
            attrs[node.target] = model.get_submodule(node.target)
        elif node.op == "get_attr":
            try:
                attrs[node.target] = _get_attr(model, node.target)
            except AttributeError:  # a tensor the trace created (e.g. torch.tensor(...) in a forward)
                attrs[node.target] = constants[node.target]
    copy = fx.Graph()
    copy.output(copy.graph_copy(seg, {}))
    return fx.GraphModule(attrs, copy, class_name="GraphUnit")


# ---------------------------------------------------------------------------------------------
# The analysis


class _ShapeInterpreter(fx.Interpreter):
    """Runs a graph and records each tensor's shape in ``node.meta["shape"]``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["shape"] = tuple(int(d) for d in result.shape)
        return result


def _shapes_by_propagation(traced: _Traced, model: nn.Module, example: torch.Tensor) -> None:
    model.eval()
    gm = fx.GraphModule(model, traced.graph)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _ShapeInterpreter(gm).run(example)


def _first_conv(model: nn.Module, paths: Sequence[str]) -> str:
    for path in paths:
        module = model.get_submodule(path)
        for sub, m in module.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                return f"{path}.{sub}".strip(".") if sub else path
    raise BackboneError("no 2D or 3D convolution in the kept features")


def model_dims(model: nn.Module, label: str) -> tuple[int, int]:
    """(spatial dimensions, input channels) of ``model``, read off its first convolution."""
    conv = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    if conv is None:
        raise BackboneError(f"{label} has no Conv2d or Conv3d layer; ttl-search cuts CNNs over images (2D) or volumes (3D)")
    return (2 if isinstance(conv, nn.Conv2d) else 3), conv.in_channels


def analyze_graph(build: Callable[[], nn.Module], label: str, input_size: int | None = None,
                  hand: Sequence[str] | None = None) -> GraphAnalysis:
    """The cuts of the model ``build()`` returns, at a zero input of side ``input_size`` (None:
    224 for 2D models, 64 for 3D).

    ``hand``: cut points given by hand (module paths in forward order; ``a+b`` joins modules
    into one unit where the model cannot be traced). Raises :class:`BackboneError` when the model
    can be neither traced nor cut as given, saying why.
    """
    start = time.perf_counter()
    model = _build_quiet(build, meta=True)
    dims, in_channels = model_dims(model, label)
    input_size = input_size or DEFAULT_SIZES[dims]
    try:
        eval_trace = trace_model(model, label, train=False)
        train_trace = trace_model(model, label, train=True)
    except BackboneError as exc:
        if not hand:
            raise BackboneError(f"{exc}; give its cuts by hand: `{label}?cuts=<module>,<module>,...` "
                                "(module paths in forward order, `a+b` for modules run one after the other in one "
                                "unit)") from exc
        return _hand_chains(build, label, input_size, hand, str(exc), start)
    example = torch.zeros(1, in_channels, *(input_size,) * dims)
    try:
        _shapes_by_propagation(eval_trace, model, example.to("meta"))
    except Exception:  # noqa: BLE001 - a layer without meta support: run it for real instead
        model = _build_quiet(build, meta=False)
        eval_trace = trace_model(model, label, train=False)
        train_trace = trace_model(model, label, train=True)
        try:
            _shapes_by_propagation(eval_trace, model, example)
        except Exception as exc:  # noqa: BLE001 - the user's model fails at this size
            raise BackboneError(f"{label} fails at {input_size} px input: {type(exc).__name__}: {_first_line(exc)}") from exc
    modules = dict(model.named_modules())
    if hand:
        try:
            end = _feature_end(eval_trace, modules, dims, label)
        except BackboneError:
            end = None
        cuts = _hand_cut_nodes(eval_trace, modules, hand, label, dims, end)
    else:
        cuts = _choose_cuts(eval_trace, modules, _feature_end(eval_trace, modules, dims, label))
    segments = _segments(eval_trace, cuts, dims)
    try:
        _check_modes(eval_trace, train_trace, cuts, segments, label, dims)
    except BackboneError as exc:
        if not hand:
            raise
        return _hand_chains(build, label, input_size, hand, str(exc), start)
    prev = _input_node(eval_trace.graph)
    names, shapes = [], []
    for node in cuts:
        names.append(hand[len(names)] if hand else _cut_name(node, prev, eval_trace))
        shape = _shape(node)[1:]
        shapes.append((shape[1], shape[0]) if _is_tokens(_shape(node), dims) else shape)
        prev = node
    names = _unique(names)
    graph_cuts = tuple(GraphCut(name, eval_trace.qualname[node], stage, last, shape)
                       for name, node, (stage, last), shape in zip(names, cuts, _stages(shapes), shapes))
    used = [n.target for seg in segments for n in seg.nodes if n.op in ("call_module", "get_attr")]
    keys = _feature_keys(model, used)
    first_conv = _first_conv(model, [t for seg in segments for t in _module_targets(seg)])
    seconds = time.perf_counter() - start
    log.info("%s: %d cuts from its graph in %.2f s (stage ends %s)", label, len(graph_cuts), seconds,
             [i + 1 for i, c in enumerate(graph_cuts) if c.stage_end])
    head = tuple(k for k in model.state_dict() if k not in keys)
    return GraphAnalysis(label, graph_cuts, input_size, in_channels, dims, first_conv, frozenset(keys), head, seconds,
                         traced=True, hand=bool(hand), segments=tuple(segments), constants=eval_trace.constants)


def _module_targets(seg: fx.Graph) -> list[str]:
    return [n.target for n in seg.nodes if n.op == "call_module"]


def _feature_keys(model: nn.Module, targets: Sequence[str]) -> set[str]:
    keys = set()
    state = model.state_dict(keep_vars=True)
    for target in targets:
        prefix = target + "."
        keys |= {k for k in state if k == target or k.startswith(prefix)}
    return keys


def _unique(names: list[str]) -> list[str]:
    out, seen = [], {}
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(name if k == 0 else f"{name}#{k + 1}")
    return out


def _build_quiet(build: Callable[[], nn.Module], meta: bool) -> nn.Module:
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        if meta:
            try:
                with torch.device("meta"):
                    return build()
            except Exception:  # noqa: BLE001 - some constructors read tensor values: build for real
                pass
        return build()


def _check_modes(eval_trace: _Traced, train_trace: _Traced, cuts: Sequence[fx.Node], segments: Sequence[fx.Graph],
                 label: str, dims: int) -> None:
    """Units traced in training mode must be the units traced in evaluation mode, code for code
    (Python that reads ``self.training`` outside leaf modules is baked into a trace)."""
    by_name = {q: n for n, q in train_trace.qualname.items()}
    train_cuts = [by_name.get(eval_trace.qualname[c]) for c in cuts]
    problem = ""
    if any(c is None for c in train_cuts):
        missing = next(eval_trace.qualname[c] for c, t in zip(cuts, train_cuts) if t is None)
        problem = f"its training-mode graph has no node {missing}"
    else:
        graph = train_trace.graph
        order, dep = train_trace.order, _depends_on_input(graph)
        seps = set(_separators(graph, train_cuts[-1], order, dep))
        prev, eval_prev = _input_node(graph), _input_node(eval_trace.graph)
        for cut, train_cut, seg in zip(cuts, train_cuts, segments):
            if train_cut not in seps:
                problem = f"in training mode a value crosses the cut at {eval_trace.qualname[cut]}"
                break
            tokens = (_is_tokens(_shape(eval_prev), dims), _is_tokens(_shape(cut), dims))  # shapes: evaluation mode
            if _code(_segment(graph, prev, train_cut, order, dep, *tokens)) != _code(seg):
                problem = f"the unit ending at {eval_trace.qualname[cut]} differs between training and evaluation mode"
                break
            prev, eval_prev = train_cut, cut
    if problem:
        raise BackboneError(f"{label} computes its features differently in training and evaluation mode in Python code "
                            f"that tracing fixes ({problem}); give its cuts by hand: `{label}?cuts=<module>,...` "
                            "runs the listed modules themselves")


def _hand_cut_nodes(traced: _Traced, modules: dict[str, nn.Module], hand: Sequence[str], label: str,
                    dims: int, end: fx.Node | None) -> list[fx.Node]:
    """The nodes of cuts given by hand; each must be a separator up to the model's feature end
    (or the last given cut, where that comes later)."""
    nodes = []
    for name in hand:
        if "+" in name:
            raise CutError(f"{label}: '+' joins modules only for models that cannot be traced; this one can: "
                           f"name the last module of the unit instead of {name!r}")
        node = _node_by_name(traced, name)
        if node is None:
            calls = sorted({c.path for c in traced.calls if c.path})
            close = difflib.get_close_matches(name, calls, n=5)
            repeated = [c for c in traced.calls if c.path == name]
            why = (f"module {name!r} runs {len(repeated)} times; name one call as {name}@0..{name}@{len(repeated) - 1}"
                   if len(repeated) > 1 else f"no module or node {name!r} in its graph")
            raise CutError(f"{label}: cut {name!r} given by hand: {why}"
                           + (f"; close module paths: {', '.join(close)}" if close else ""))
        nodes.append(node)
    order, dep = traced.order, _depends_on_input(traced.graph)
    if any(order[a] >= order[b] for a, b in zip(nodes, nodes[1:])):
        raise CutError(f"{label}: the cuts given by hand must follow the forward order: {', '.join(hand)}")
    target = end if end is not None and order[end] > order[nodes[-1]] else nodes[-1]
    seps = set(_separators(traced.graph, target, order, dep))
    for name, node in zip(hand, nodes):
        if node not in seps:
            raise CutError(f"{label}: no cut at {name!r}: {_crossing(traced, node, target, order, dep)}")
        shape = _shape(node)
        if shape is None or (len(shape) != 2 + dims and not _is_tokens(shape, dims)):
            raise CutError(f"{label}: cut {name!r} gives shape {shape}, not an N x C x {' x '.join('S' * dims)} feature map")
    return nodes


def _crossing(traced: _Traced, node: fx.Node, end: fx.Node, order: dict[fx.Node, int], dep: set[fx.Node]) -> str:
    needed = _ancestors(end) & dep
    for u in traced.graph.nodes:
        if u in needed and order[u] < order[node]:
            for user in u.users:
                if user in needed and order[user] > order[node]:
                    return (f"{traced.qualname[u]} (computed before it) is used by {traced.qualname[user]} after it "
                            "(a skip connection crosses the cut)")
    return "it is not a separate output of the model's graph"


# ---------------------------------------------------------------------------------------------
# Cuts given by hand on a model that cannot be traced


class ModuleChain(nn.Sequential):
    """A unit of an untraced model: modules of the model run one after the other."""


def _run_hooked(model: nn.Module, modules: dict[str, nn.Module], paths: Sequence[str], x: torch.Tensor, train: bool,
                label: str, input_size: int) -> tuple[dict[str, list], list[str]]:
    """One forward pass of ``model`` recording the input and output of every module in ``paths``."""
    seen: dict[str, list[tuple[torch.Tensor | None, torch.Tensor | None]]] = {p: [] for p in paths}
    calls: list[str] = []

    def hook(path: str):
        def record(module, inputs, output):
            calls.append(path)
            first = inputs[0] if inputs else None
            seen[path].append((first.detach().clone() if isinstance(first, torch.Tensor) else None,
                               output.detach().clone() if isinstance(output, torch.Tensor) else None))
        return record

    handles = [modules[p].register_forward_hook(hook(p)) for p in dict.fromkeys(paths)]
    model.train(train)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(x)
    except Exception as exc:  # noqa: BLE001 - the user's model fails at this size
        raise BackboneError(f"{label} fails at {input_size} px input: {type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        for h in handles:
            h.remove()
    return seen, calls


def _hand_chains(build: Callable[[], nn.Module], label: str, input_size: int | None, hand: Sequence[str], reason: str,
                 start: float) -> GraphAnalysis:
    model = _build_quiet(build, meta=False).eval()
    dims, in_channels = model_dims(model, label)
    input_size = input_size or DEFAULT_SIZES[dims]
    chains = tuple(tuple(p.strip() for p in entry.split("+")) for entry in hand)
    paths = [p for chain in chains for p in chain]
    modules = dict(model.named_modules())
    for path in paths:
        if path not in modules or not path:
            close = difflib.get_close_matches(path, [n for n in modules if n], n=5)
            raise CutError(f"{label}: no module {path!r}" + (f"; close module paths: {', '.join(close)}" if close else ""))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_channels, *(input_size,) * dims, generator=g)
    seen: dict[str, list[tuple[torch.Tensor | None, torch.Tensor | None]]] = {}
    calls: list[str] = []
    for train in (False, True):  # Python between the modules may run in one mode only
        seen, calls = _run_hooked(model, modules, paths, x, train, label, input_size)
        current = x
        for path in paths:
            if len(seen[path]) != 1:
                raise CutError(f"{label}: module {path!r} runs {len(seen[path])} times in the model's forward; "
                               "a module given by hand must run once")
            given, output = seen[path][0]
            if given is None or output is None:
                raise CutError(f"{label}: module {path!r} does not map a tensor to a tensor")
            if given.shape != current.shape or not torch.equal(given, current):
                before = "the model's input" if current is x else "the output of the module before it"
                mode = "training" if train else "evaluation"
                raise CutError(f"{label}: module {path!r} does not take {before} in the model's own forward "
                               f"({mode} mode): the model computes something between them outside the listed "
                               "modules; list every module the features pass through, in order")
            current = output
    model.eval()
    order = [calls.index(p) for p in paths]
    if order != sorted(order):
        raise CutError(f"{label}: the modules given by hand do not run in the listed order")
    shapes = []
    for chain in chains:
        shape = tuple(seen[chain[-1]][0][1].shape[1:])
        if len(shape) != 1 + dims:
            raise CutError(f"{label}: cut {'+'.join(chain)!r} gives shape {shape}, not a C x {' x '.join('S' * dims)} map")
        shapes.append(shape)
    names = _unique(["+".join(c) for c in chains])
    cuts = tuple(GraphCut(n, "", s, end, shape) for n, (s, end), shape in zip(names, _stages(shapes), shapes))
    keys = _feature_keys(model, paths)
    seconds = time.perf_counter() - start
    log.info("%s: %d cuts given by hand, checked against its forward in %.2f s", label, len(cuts), seconds)
    head = tuple(k for k in model.state_dict() if k not in keys)
    return GraphAnalysis(label, cuts, input_size, in_channels, dims, _first_conv(model, paths), frozenset(keys), head,
                         seconds, traced=False, hand=True, note=reason, chains=chains)


# ---------------------------------------------------------------------------------------------
# Units of a loaded model


def bind_units(analysis: GraphAnalysis, model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """The units of ``model`` (built like the analysed one) as (name, stage, module), sharing its
    parameters."""
    units = []
    for i, cut in enumerate(analysis.cuts):
        if analysis.traced:
            unit: nn.Module = bind_segment(analysis.segments[i], model, analysis.constants)
        else:
            unit = ModuleChain(*[model.get_submodule(p) for p in analysis.chains[i]])
        units.append((cut.name, cut.stage, unit))
    return units

