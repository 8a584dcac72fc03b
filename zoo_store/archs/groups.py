"""Channel groups traced from the graph, not declared: which tensors' channel axes are coupled.

The network is traced with torch.fx (torchvision's tracer settings) and its shapes propagated on
the meta device. Each value with a channel axis (``(B, C, H, W)`` or ``(B, D)``) belongs to a
*channel space*; a conv (groups 1) or linear layer reads one space (a consumer) and writes a new
one (a producer, with the BatchNorm that directly follows it); a depthwise conv, a BatchNorm,
activations, dropout, pooling and the flatten of a 1 x 1 map carry a space through; an elementwise
add or multiply of two values joins their spaces (a residual add, a squeeze-excitation scale).
Anything else a space meets (a concatenation, a reshape, a grouped conv, a channels-last permute,
the network's input or output, a BatchNorm that does not follow its producer) leaves it *opaque*:
not proven, so not resampled. Spaces joined by a residual add are traced but, as before, kept out
of the groups a resample touches: only the internal channels of blocks are resampled.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.ops import StochasticDepth  # per sample in training, the identity in eval

from zoo_store.archs.base import ChannelGroup
from zoo_store.archs.traced import config_key

# modules and functions that carry each channel to the same channel, one to one
CARRY_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                 nn.LeakyReLU, nn.ELU, nn.Mish, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, StochasticDepth)  # fmt: skip
CARRY_FUNCTIONS = {F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, torch.sigmoid, torch.relu, F.dropout,
                   F.adaptive_avg_pool2d, F.max_pool2d, F.avg_pool2d, torch.tanh}  # fmt: skip
JOIN_FUNCTIONS = {operator.add, operator.mul, torch.add, torch.mul, operator.iadd, operator.imul}


@dataclass
class _Space:
    producers: list[tuple[str, str | None]] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    depthwise: list[tuple[str, str | None]] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)  # why it cannot be proven
    residual: bool = False


@dataclass(frozen=True)
class TracedGroups:
    groups: list[ChannelGroup]  # the ones a resample may touch
    residual: list[str]  # coupled through a residual add (kept at full width)
    opaque: dict[str, str]  # the first producer of a space -> why it is left at full width
    probe: tuple[int, int] = (3, 64)  # (channels, size) of an input the network takes

    def report(self) -> dict:
        """What a resample job reports: the groups it may touch and the ones left at full width, with why."""
        return {"groups": [g.name for g in self.groups], "residual": self.residual, "left_at_full_width": self.opaque}


def trace_groups(net: nn.Module) -> TracedGroups:
    """Every channel space of ``net``'s forward, sorted into resamplable groups, residual ones and
    opaque ones (with the reason)."""
    try:
        graph, shapes, probe = _traced(net)
    except Exception as e:  # noqa: BLE001 - whatever torch.fx or the forward raises: nothing is proven
        return TracedGroups([], [], {"(the network)": f"cannot be traced: {type(e).__name__}: {e}"})
    found = _Analysis(net, graph, shapes).run()
    return TracedGroups(found.groups, found.residual, found.opaque, probe)


def _traced(net: nn.Module) -> tuple[fx.Graph, dict[fx.Node, tuple[int, ...] | None], tuple[int, int]]:
    """The graph, each node's shape, and the (channels, size) of the probe input it was propagated with."""
    from zoo_store.archs.surgery import on_meta
    from zoo_store.archs.traced import node_tracer

    graph = node_tracer().trace(net)
    meta = on_meta(net)
    channels = next((m.in_channels for m in net.modules() if isinstance(m, nn.Conv2d)), 3)  # the first conv's
    size = getattr(net, "probe_size", 64)
    gm = fx.GraphModule(meta, graph)
    ShapeProp(gm).propagate(torch.empty(2, channels, size, size, device="meta"))
    shapes = {n: (tuple(n.meta["tensor_meta"].shape) if hasattr(n.meta.get("tensor_meta"), "shape") else None)
              for n in gm.graph.nodes}  # fmt: skip
    return gm.graph, shapes, (channels, size)


def _numel(shape: tuple[int, ...] | None) -> int:
    n = 1
    for d in shape or ():
        n *= d
    return n if shape is not None else 0


class _Analysis:
    def __init__(self, net: nn.Module, graph: fx.Graph, shapes: dict[fx.Node, tuple[int, ...] | None]):
        self.net, self.graph, self.shapes = net, graph, shapes
        self.parent: dict[int, int] = {}
        self.spaces: dict[int, _Space] = {}
        self.of: dict[fx.Node, int] = {}  # node -> its channel space

    # -- union-find over spaces ---------------------------------------------------------------
    def new(self) -> int:
        i = len(self.parent)
        self.parent[i], self.spaces[i] = i, _Space()
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            sa, sb = self.spaces[a], self.spaces[b]
            sa.producers += sb.producers
            sa.consumers += sb.consumers
            sa.depthwise += sb.depthwise
            sa.opaque += sb.opaque
            sa.residual |= sb.residual
            self.parent[b] = a
        return a

    def space(self, n: fx.Node) -> _Space | None:
        return self.spaces[self.find(self.of[n])] if n in self.of else None

    def taint(self, n: object, why: str) -> None:
        if isinstance(n, fx.Node) and (s := self.space(n)) is not None:
            s.opaque.append(why)

    # -- the walk -----------------------------------------------------------------------------
    def run(self) -> TracedGroups:
        for n in self.graph.nodes:
            self.visit(n)
        order = {m: i for i, (m, _) in enumerate(self.net.named_modules())}
        groups, residual, opaque = [], [], {}
        for root in {self.find(i) for i in self.parent}:
            s = self.spaces[root]
            if not s.producers or (not s.consumers and "the network's output" in s.opaque):
                continue  # the input, or the logits
            s.producers.sort(key=lambda p: order[p[0]])  # in module order: the same group however it was joined
            s.depthwise.sort(key=lambda p: order[p[0]])
            s.consumers.sort(key=order.__getitem__)
            name = s.producers[0][0]
            if s.opaque:
                opaque[name] = s.opaque[0]
            elif not s.consumers:
                opaque[name] = "no layer reads its channels"
            elif s.residual:
                residual.append(name)
            else:
                groups.append(ChannelGroup(name, tuple(s.producers), tuple(s.consumers), tuple(s.depthwise)))
        groups.sort(key=lambda g: order.get(g.name, 0))
        return TracedGroups(groups, sorted(residual, key=lambda p: order.get(p, 0)), opaque)

    def visit(self, n: fx.Node) -> None:
        shape = self.shapes.get(n)
        inputs = [a for a in n.all_input_nodes if a in self.of]
        if n.op == "placeholder":
            self.of[n] = self.new()
            self.spaces[self.of[n]].opaque.append("the network's input")
        elif n.op == "output":
            for a in inputs:
                self.taint(a, "the network's output")
        elif n.op == "call_module":
            self.module(n, self.net.get_submodule(n.target), inputs, shape)
        elif n.op in ("call_function", "call_method"):
            self.function(n, inputs, shape)

    def module(self, n: fx.Node, m: nn.Module, inputs: list[fx.Node], shape: tuple[int, ...] | None) -> None:
        x = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if isinstance(m, nn.Conv2d | nn.Linear) and x is not None and x in self.of and not self.reads_channels(m, x):
            self.taint(x, f"{n.target} reads another axis than its channels")
            self.of[n] = self.new()
            self.spaces[self.of[n]].opaque.append(f"written by {n.target}, which read another axis")
        elif isinstance(m, nn.Conv2d | nn.Linear) and x is not None and x in self.of:
            groups = getattr(m, "groups", 1)
            if groups == 1:
                self.space(x).consumers.append(n.target)
                self.of[n] = self.new()
                self.spaces[self.of[n]].producers.append((n.target, None))
            elif groups == m.in_channels == m.out_channels:
                self.of[n] = self.of[x]
                self.space(x).depthwise.append((n.target, None))
            else:
                self.taint(x, f"{n.target} is a grouped conv ({groups} groups)")
                self.of[n] = self.new()
                self.spaces[self.of[n]].opaque.append(f"{n.target} is a grouped conv ({groups} groups)")
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and x is not None and x in self.of:
            self.of[n] = self.of[x]
            self.attach_bn(n, x)
        elif isinstance(m, CARRY_MODULES) and x is not None and x in self.of and shape is not None:
            self.of[n] = self.of[x]
        elif isinstance(m, nn.Flatten) and x is not None:
            self.flatten(n, x)
        else:
            for a in inputs:
                self.taint(a, f"{n.target} ({type(m).__name__}) reads its channels")
            if shape is not None:
                self.of[n] = self.new()
                self.spaces[self.of[n]].opaque.append(f"written by {n.target} ({type(m).__name__})")

    def reads_channels(self, m: nn.Module, x: fx.Node) -> bool:
        """A conv reads axis 1 of (B, C, H, W); a linear layer the last axis (of (B, D), (B, N, D), or a
        channels-last map). Where a space's axis and a reader's axis merely have the same size, the proof
        finds it out."""
        shape = self.shapes.get(x) or ()
        if isinstance(m, nn.Conv2d):
            return len(shape) == 4 and shape[1] == m.in_channels
        return len(shape) >= 2 and shape[-1] == m.in_features

    def attach_bn(self, bn: fx.Node, x: fx.Node) -> None:
        """A BatchNorm folds into the conv it directly follows (that conv's only reader)."""
        s = self.space(x)
        for entries in (s.producers, s.depthwise):
            for i, (conv, old) in enumerate(entries):
                if x.op == "call_module" and x.target == conv and old is None and len(x.users) == 1:
                    entries[i] = (conv, bn.target)
                    return
        s.opaque.append(f"{bn.target} is a BatchNorm that does not directly follow its conv")

    def flatten(self, n: fx.Node, x: fx.Node) -> None:
        shape = self.shapes.get(x)
        if x in self.of and shape is not None and len(shape) == 4 and shape[2] * shape[3] == 1:
            self.of[n] = self.of[x]  # (B, C, 1, 1) -> (B, C): each channel stays one column
        else:
            self.taint(x, f"flattened with its spatial positions at {n.name}")

    def function(self, n: fx.Node, inputs: list[fx.Node], shape: tuple[int, ...] | None) -> None:
        target = n.target
        if target in (torch.flatten, "flatten") and inputs:
            self.flatten(n, inputs[0])
        elif (target in CARRY_FUNCTIONS or target in ("relu", "relu_", "sigmoid", "contiguous")) and len(inputs) == 1:
            self.of[n] = self.of[inputs[0]]
        elif (target in JOIN_FUNCTIONS or target in ("add", "mul", "add_", "mul_")) and shape is not None:
            self.join_values(n, inputs, shape)
        else:
            for a in inputs:
                self.taint(a, f"{n.name} ({getattr(target, '__name__', target)}) reads its channels")
            if shape is not None and inputs:
                self.of[n] = self.new()
                self.spaces[self.of[n]].opaque.append(f"written by {n.name}")

    def join_values(self, n: fx.Node, inputs: list[fx.Node], shape: tuple[int, ...]) -> None:
        """``a + b`` or ``a * b`` (or with a scalar): channel i of each operand meets channel i of the result."""
        loose = [a for a in n.all_input_nodes if a not in self.of and _numel(self.shapes.get(a)) > 1]
        if loose:  # a tensor from outside any space (a parameter, say) that would have to be shuffled too
            for a in inputs:
                self.taint(a, f"{n.name} combines its channels with {loose[0].name}, which no space holds")
            self.of[n] = self.new()
            self.spaces[self.of[n]].opaque.append(f"written by {n.name}")
            return
        spaced = [a for a in inputs if self.shapes.get(a) is not None and len(self.shapes[a]) >= 2]
        if any(self.shapes[a][1] != shape[1] for a in spaced) or not spaced:
            for a in inputs:
                self.taint(a, f"{n.name} mixes channels by broadcasting")
            self.of[n] = self.new()
            self.spaces[self.of[n]].opaque.append(f"written by {n.name}")
            return
        root = self.of[spaced[0]]
        for a in spaced[1:]:
            root = self.join(root, self.of[a])
        if len(spaced) > 1 and n.target in (operator.add, torch.add, operator.iadd, "add", "add_"):
            self.spaces[self.find(root)].residual = True
        self.of[n] = root


# -- the proof ---------------------------------------------------------------------------------

_PROVEN: dict[tuple[str, str], TracedGroups] = {}
_PROVEN_MAX = 64  # architectures and configs remembered (the oldest forgotten first)


def proven_groups(net: nn.Module) -> TracedGroups:
    """The traced groups whose permutation is proven function-preserving (``_prove``) on a
    random-weight network of the same architecture and config (once per architecture and config
    in a process: the proof is a property of the structure, not of the weights); the groups that
    fail it join the opaque ones, with why."""
    arch, config = getattr(net, "arch", ""), getattr(net, "arch_config", None)
    key = (arch, config_key(config))
    if arch and config is not None and key in _PROVEN:
        return _PROVEN[key]
    traced = trace_groups(net)
    if arch and config is not None:
        from zoo_store.archs.registry import build_arch

        with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
            sample = build_arch(arch, config).eval()
        kept, failed = _guarded(sample, traced, fresh=True)
    elif next(net.parameters()).is_meta:
        kept, failed = [], {g.name: "not proven (a network without weights)" for g in traced.groups}
    else:  # built by hand: proven on itself in eval mode, its weights and mode restored after
        training = net.training
        kept, failed = _guarded(net.eval(), traced, fresh=False)
        net.train(training)
    result = TracedGroups(kept, traced.residual, {**traced.opaque, **failed}, traced.probe)
    if arch and config is not None:
        while len(_PROVEN) >= _PROVEN_MAX:
            _PROVEN.pop(next(iter(_PROVEN)))
        _PROVEN[key] = result
    return result


def _guarded(net: nn.Module, traced: TracedGroups, fresh: bool) -> tuple[list[ChannelGroup], dict[str, str]]:
    """``_prove``, or nothing proven when its forward fails (with why)."""
    try:
        return _prove(net, traced, fresh)
    except Exception as e:  # noqa: BLE001 - the network's own forward failed: nothing is proven
        return [], {g.name: f"the proof could not run: {type(e).__name__}: {e}" for g in traced.groups}


def _prove(net: nn.Module, traced: TracedGroups, fresh: bool) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Each group's channels shuffled (producers' rows and their BatchNorms, depthwise convs,
    consumers' columns): the outputs must stay within 1e-5 of their largest magnitude. All groups at
    once; when that fails, each alone, then the survivors together again. ``fresh``: a throwaway
    network, every tensor of which is perturbed first, so that no constant initialisation (a zero
    BatchNorm scale, a layer scale of 1e-6) hides a shuffle."""
    groups = traced.groups
    if not groups:
        return [], {}
    channels, size = traced.probe
    gen = torch.Generator().manual_seed(0)
    device = next(net.parameters()).device
    with torch.no_grad():
        if fresh:
            _perturb(net, gen)
        x = torch.rand(2, channels, size, size, generator=gen).to(device)  # (B, C, H, W)
        y = net(x)  # (B, K)
        tol = 1e-5 * max(1.0, y.abs().max().item())

        def holds(gs: list[ChannelGroup]) -> bool:
            perms = {g.name: torch.randperm(_size(net, g), generator=gen) for g in gs}
            if not all(_fits(net, g, len(perms[g.name])) for g in gs):
                return False  # a tensor of the group has another size: not a coupling
            for g in gs:
                _permute(net, g, perms[g.name])
            try:
                return bool(torch.allclose(net(x), y, rtol=1e-5, atol=tol))
            finally:
                for g in gs:
                    _permute(net, g, torch.argsort(perms[g.name]))  # back as it was

        if holds(groups):
            return groups, {}
        kept = [g for g in groups if holds([g])]
        if kept and not holds(kept):
            kept = []
    return kept, {g.name: "traced, but its channels shuffled changed the outputs" for g in groups if g not in kept}


def _perturb(net: nn.Module, gen: torch.Generator) -> None:
    """Every floating tensor moved off its initial value; BatchNorm variances kept positive."""
    for m in net.modules():
        for name, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is None or not t.is_floating_point():
                continue
            if name == "running_var":
                t.copy_((torch.rand(t.shape, generator=gen) + 0.5).to(t.device))
            else:
                t.add_(0.05 * torch.randn(t.shape, generator=gen).to(t.device))


def _size(net: nn.Module, g: ChannelGroup) -> int:
    return net.get_submodule(g.producers[0][0]).weight.shape[0]


ROWS = ("weight", "bias", "running_mean", "running_var")  # what a producer or a BatchNorm holds per channel


def _fits(net: nn.Module, g: ChannelGroup, n: int) -> bool:
    """Every tensor the shuffle touches has ``n`` channels on the axis it shuffles."""

    def sized(m: nn.Module) -> bool:
        return all(t.shape[0] == n for t in (getattr(m, k, None) for k in ROWS) if isinstance(t, torch.Tensor))

    rows = [net.get_submodule(p) for pair in (*g.producers, *g.depthwise) for p in pair if p]
    return all(sized(m) for m in rows) and all(net.get_submodule(c).weight.shape[1] == n for c in g.consumers)


def _permute(net: nn.Module, g: ChannelGroup, perm: torch.Tensor) -> None:
    """Shuffle the group's channels in place: producers' and depthwise convs' output rows (and their
    BatchNorms), consumers' input columns."""

    def rows(m: nn.Module | None) -> None:
        for t in (getattr(m, k, None) for k in ROWS):
            if isinstance(t, torch.Tensor):
                t.copy_(t[perm])

    for layer, bn in (*g.producers, *g.depthwise):
        rows(net.get_submodule(layer))
        rows(net.get_submodule(bn) if bn else None)
    for c in g.consumers:
        w = net.get_submodule(c).weight
        w.copy_(w[:, perm])
