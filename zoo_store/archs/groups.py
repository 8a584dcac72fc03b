"""Channel groups traced from the graph, not declared: which tensors' channel axes are coupled.

The network is traced with torch.fx (torchvision's tracer settings) and its shapes propagated on
the meta device. Each value with a channel axis (``(B, C, H, W)`` or ``(B, D)``) belongs to a
*channel space*; a conv (groups 1) or linear layer reads one space (a consumer) and writes a new
one (a producer, with the BatchNorm that directly follows it); a depthwise conv, a BatchNorm,
activations, dropout, pooling and the flatten of a 1 x 1 map carry a space through; an elementwise
add or multiply of two values joins their spaces (a residual add, a squeeze-excitation scale). A
grouped conv (G groups) reads its input space block by block and writes a new one, both split into
G blocks that a permutation or a resample must respect (``ChannelGroup.blocks``). A
concatenation along channels is a value of several spaces side by side: a conv or linear layer
that reads it reads each space at its offset (``sliced``), a BatchNorm over it normalizes each at
its offset (``carried``; as does a BatchNorm that does not directly follow its producer), and
activations and pooling carry it. Anything else a space meets (a reshape, a split, a channels-last
permute, grouped convs of different group counts, an add of a concatenation, the network's input
or output) leaves it *opaque*:
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

from zoo_store.archs.fxtrace import trace
from zoo_store.archs.registry import build_arch
from zoo_store.archs.surgery import on_meta
from zoo_store.archs.traced import config_key, node_tracer

# modules and functions that carry each channel to the same channel, one to one
CARRY_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Dropout,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    StochasticDepth,
)
CARRY_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.hardswish,
    F.hardsigmoid,
    F.silu,
    F.gelu,
    torch.sigmoid,
    torch.relu,
    F.dropout,
    F.adaptive_avg_pool2d,
    F.max_pool2d,
    F.avg_pool2d,
    torch.tanh,
}
JOIN_FUNCTIONS = {operator.add, operator.mul, torch.add, torch.mul, operator.iadd, operator.imul}


@dataclass(frozen=True)
class ChannelGroup:
    """One set of coupled channels: permuting or resampling it must touch every tensor listed.

    ``producers`` write the channels (output rows of a conv or linear, each with the BatchNorm that
    follows it, if any); ``depthwise`` convs carry them one to one (with their BatchNorm);
    ``consumers`` read them (input columns of a conv or linear). Channels that meet a residual
    addition are never in a group: only the internal channels of blocks are.

    A group that a grouped conv (``G`` groups, not depthwise) reads or writes falls into ``blocks``
    = G contiguous blocks of equal size: channel i of block b meets only block b of that conv, so
    a permutation keeps each channel in its block and a resample shrinks every block alike. The
    grouped convs that read the group are its ``grouped`` consumers (each block of their input
    columns read by the same block of their output rows); one that writes it is a producer.

    A concatenation puts groups side by side: a layer that reads it reads each group's channels at an
    offset of its input (``sliced``), a BatchNorm over it (or one that does not directly follow the
    group's producer) holds each group's statistics at an offset (``carried``).
    """

    name: str
    producers: tuple[tuple[str, str | None], ...]  # (conv/linear path, its BatchNorm path or None)
    consumers: tuple[str, ...]
    depthwise: tuple[tuple[str, str | None], ...] = ()
    grouped: tuple[str, ...] = ()  # grouped convs reading the group, block by block
    blocks: int = 1
    sliced: tuple[tuple[str, int], ...] = ()  # (conv/linear, offset): reading it within a concatenation
    carried: tuple[tuple[str, int], ...] = ()  # (BatchNorm, offset): normalizing it, not folded into a producer


@dataclass
class _Space:
    producers: list[tuple[str, str | None]] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    depthwise: list[tuple[str, str | None]] = field(default_factory=list)
    grouped: list[str] = field(default_factory=list)  # grouped convs reading it, block by block
    sliced: list[tuple[str, int]] = field(default_factory=list)  # (layer, offset): reading it within a concatenation
    carried: list[tuple[str, int]] = field(default_factory=list)  # (BatchNorm, offset): normalizing it, not folded
    blocks: set[int] = field(default_factory=set)  # the group counts of the grouped convs it meets
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
    graph = trace(node_tracer(), net)
    meta = on_meta(net)
    channels = next((m.in_channels for m in net.modules() if isinstance(m, nn.Conv2d)), 3)  # the first conv's
    size = getattr(net, "probe_size", 64)
    gm = fx.GraphModule(meta, graph)
    ShapeProp(gm).propagate(torch.empty(2, channels, size, size, device="meta"))
    shapes = {
        n: (tuple(n.meta["tensor_meta"].shape) if hasattr(n.meta.get("tensor_meta"), "shape") else None)
        for n in gm.graph.nodes
    }
    return gm.graph, shapes, (channels, size)


def _plain_norm(m: nn.Module) -> bool:
    """A BatchNorm with a scale, a shift and running statistics: one whose rows can be shuffled."""
    return isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.affine and m.track_running_stats


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
        self.cat: dict[fx.Node, list[tuple[int, int]]] = {}  # a concatenation -> its (space, channels), in order

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
            sa.grouped += sb.grouped
            sa.sliced += sb.sliced
            sa.carried += sb.carried
            sa.blocks |= sb.blocks
            sa.opaque += sb.opaque
            sa.residual |= sb.residual
            self.parent[b] = a
        return a

    def space(self, n: fx.Node) -> _Space | None:
        return self.spaces[self.find(self.of[n])] if n in self.of else None

    def taint(self, n: object, why: str) -> None:
        if isinstance(n, fx.Node) and (s := self.space(n)) is not None:
            s.opaque.append(why)
        for space, _ in self.cat.get(n, []) if isinstance(n, fx.Node) else []:
            self.spaces[self.find(space)].opaque.append(why)

    def held(self, n: object) -> bool:
        """A value of one space, or a concatenation of several."""
        return isinstance(n, fx.Node) and (n in self.of or n in self.cat)

    def carry(self, n: fx.Node, x: fx.Node) -> None:
        """``n`` holds ``x``'s channels, one to one."""
        if x in self.of:
            self.of[n] = self.of[x]
        else:
            self.cat[n] = self.cat[x]

    def at_offsets(self, x: fx.Node) -> list[tuple[_Space, int]]:
        """Each space of ``x`` with the offset of its channels in ``x``."""
        out, offset = [], 0
        for space, width in self.cat[x]:
            out.append((self.spaces[self.find(space)], offset))
            offset += width
        return out

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
            s.grouped.sort(key=order.__getitem__)
            s.sliced.sort(key=lambda p: order[p[0]])
            s.carried.sort(key=lambda p: order[p[0]])
            name = s.producers[0][0]
            if s.opaque:
                opaque[name] = s.opaque[0]
            elif not s.consumers and not s.grouped and not s.sliced:
                opaque[name] = "no layer reads its channels"
            elif len(s.blocks) > 1:
                opaque[name] = f"grouped convs of different group counts meet it ({sorted(s.blocks)})"
            elif s.residual:
                residual.append(name)
            else:
                groups.append(
                    ChannelGroup(
                        name,
                        tuple(s.producers),
                        tuple(s.consumers),
                        tuple(s.depthwise),
                        tuple(s.grouped),
                        max(s.blocks, default=1),
                        tuple(s.sliced),
                        tuple(s.carried),
                    )
                )
        groups.sort(key=lambda g: order.get(g.name, 0))
        return TracedGroups(groups, sorted(residual, key=lambda p: order.get(p, 0)), opaque)

    def visit(self, n: fx.Node) -> None:
        shape = self.shapes.get(n)
        inputs = [a for a in n.all_input_nodes if self.held(a)]
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
        if x is not None and x in self.cat and self.concatenated(n, m, x, shape):
            return
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
            elif (
                groups == m.in_channels
            ):  # depthwise with a channel multiplier: blocks of one channel, nothing to shrink
                self.taint(x, f"{n.target} is a depthwise conv with a channel multiplier")
                self.of[n] = self.new()
                self.spaces[self.of[n]].opaque.append(
                    f"written by {n.target}, a depthwise conv with a channel multiplier"
                )
            else:  # grouped: block b of its input feeds block b of its output, and nothing else
                self.space(x).grouped.append(n.target)
                self.space(x).blocks.add(groups)
                self.of[n] = self.new()
                self.spaces[self.of[n]].producers.append((n.target, None))
                self.spaces[self.of[n]].blocks.add(groups)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and x is not None and x in self.of:
            self.of[n] = self.of[x]
            self.attach_bn(n, x, m)
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

    def concatenated(self, n: fx.Node, m: nn.Module, x: fx.Node, shape: tuple[int, ...] | None) -> bool:
        """A module over a concatenation: a conv (groups 1) or linear layer reads each space at its
        offset, a BatchNorm normalizes each at its offset, a carrying module carries them all.
        False for anything else (the caller leaves the spaces opaque)."""
        if isinstance(m, nn.Conv2d | nn.Linear) and getattr(m, "groups", 1) == 1 and self.reads_channels(m, x):
            for space, offset in self.at_offsets(x):
                space.sliced.append((n.target, offset))
            self.of[n] = self.new()
            self.spaces[self.of[n]].producers.append((n.target, None))
        elif _plain_norm(m):
            for space, offset in self.at_offsets(x):
                space.carried.append((n.target, offset))
            self.cat[n] = self.cat[x]
        elif isinstance(m, CARRY_MODULES) and shape is not None:
            self.cat[n] = self.cat[x]
        elif isinstance(m, nn.Flatten):
            self.flatten(n, x)
        else:
            return False
        return True

    def reads_channels(self, m: nn.Module, x: fx.Node) -> bool:
        """A conv reads axis 1 of (B, C, H, W); a linear layer the last axis (of (B, D), (B, N, D), or a
        channels-last map). Where a space's axis and a reader's axis merely have the same size, the proof
        finds it out."""
        shape = self.shapes.get(x) or ()
        if isinstance(m, nn.Conv2d):
            return len(shape) == 4 and shape[1] == m.in_channels
        return len(shape) >= 2 and shape[-1] == m.in_features

    def attach_bn(self, bn: fx.Node, x: fx.Node, m: nn.Module) -> None:
        """A BatchNorm folds into the conv it directly follows (that conv's only reader); any other
        is carried (kept, its rows shuffled with the channels) if it has the usual tensors."""
        s = self.space(x)
        for entries in (s.producers, s.depthwise):
            for i, (conv, old) in enumerate(entries):
                if x.op == "call_module" and x.target == conv and old is None and len(x.users) == 1:
                    entries[i] = (conv, bn.target)
                    return
        if _plain_norm(m):
            s.carried.append((bn.target, 0))  # not folded: its rows shuffled and resampled with the channels
        else:
            s.opaque.append(f"{bn.target} is a BatchNorm without an affine map or running statistics")

    def flatten(self, n: fx.Node, x: fx.Node) -> None:
        shape = self.shapes.get(x)
        if self.held(x) and shape is not None and len(shape) == 4 and shape[2] * shape[3] == 1:
            self.carry(n, x)  # (B, C, 1, 1) -> (B, C): each channel stays one column
        else:
            self.taint(x, f"flattened with its spatial positions at {n.name}")

    def function(self, n: fx.Node, inputs: list[fx.Node], shape: tuple[int, ...] | None) -> None:
        target = n.target
        if target in (torch.flatten, "flatten") and inputs:
            self.flatten(n, inputs[0])
        elif (target in CARRY_FUNCTIONS or target in ("relu", "relu_", "sigmoid", "contiguous")) and len(inputs) == 1:
            self.carry(n, inputs[0])
        elif target in (torch.cat, torch.concat) and (parts := self.along_channels(n)):
            self.cat[n] = [
                seg for a in parts for seg in (self.cat[a] if a in self.cat else [(self.of[a], self.shapes[a][1])])
            ]
        elif (target in JOIN_FUNCTIONS or target in ("add", "mul", "add_", "mul_")) and shape is not None:
            self.join_values(n, inputs, shape)
        else:
            for a in inputs:
                self.taint(a, f"{n.name} ({getattr(target, '__name__', target)}) reads its channels")
            if shape is not None and inputs:
                self.of[n] = self.new()
                self.spaces[self.of[n]].opaque.append(f"written by {n.name}")

    def along_channels(self, n: fx.Node) -> list[fx.Node] | None:
        """The values a concatenation joins, if all are held and it joins them along their channel
        axis (1 of (B, C, H, W) or (B, D)); else None."""
        parts = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if not isinstance(parts, list | tuple) or not parts or not all(self.held(a) for a in parts):
            return None
        shapes = [self.shapes.get(a) for a in parts]
        if any(s is None or len(s) not in (2, 4) for s in shapes) or len({len(s) for s in shapes}) != 1:
            return None
        return list(parts) if isinstance(dim, int) and dim % len(shapes[0]) == 1 else None

    def join_values(self, n: fx.Node, inputs: list[fx.Node], shape: tuple[int, ...]) -> None:
        """``a + b`` or ``a * b`` (or with a scalar): channel i of each operand meets channel i of the result."""
        loose = [a for a in n.all_input_nodes if a not in self.of and _numel(self.shapes.get(a)) > 1]
        if any(a in self.cat for a in inputs):
            for a in inputs:
                self.taint(a, f"{n.name} adds or multiplies a concatenation")
            self.of[n] = self.new()
            self.spaces[self.of[n]].opaque.append(f"written by {n.name}")
            return
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


def channel_groups(net: nn.Module) -> list[ChannelGroup]:
    """The coupled channel groups that width resampling may shrink: traced from the graph and
    proven by permutation."""
    return proven_groups(net).groups


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
    consumers' columns, grouped convs' columns block by block, the columns and BatchNorm rows at
    each offset of a concatenation; within blocks in a group in blocks): the outputs must stay within 1e-5 of their
    largest magnitude. All groups at
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
            perms = {g.name: block_perm(group_width(net, g), g.blocks, gen) for g in gs}
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


def group_width(net: nn.Module, g: ChannelGroup) -> int:
    """The group's channels in ``net``: its first producer's output rows."""
    return net.get_submodule(g.producers[0][0]).weight.shape[0]


def block_perm(n: int, blocks: int, gen: torch.Generator) -> torch.Tensor:
    """(n,) a random permutation that keeps every channel in its block (``blocks`` equal ones)."""
    b = n // blocks
    return torch.cat([torch.randperm(b, generator=gen) + i * b for i in range(blocks)])


def in_blocks(idx: torch.Tensor, n: int, blocks: int) -> bool:
    """Whether ``idx`` (blocks * k,) lists k of the n channels from each of ``blocks`` equal blocks,
    block after block (a permutation that keeps every channel in its block, when k = n / blocks)."""
    if n % blocks or len(idx) % blocks:
        return False
    block = torch.arange(blocks, device=idx.device).repeat_interleave(len(idx) // blocks)  # (blocks * k,)
    return bool((idx.long() // (n // blocks) == block).all())


def keeps_blocks(perm: torch.Tensor, blocks: int) -> bool:
    """Whether the permutation (n,) maps each of ``blocks`` equal blocks onto itself."""
    return in_blocks(perm, len(perm), blocks)


def grouped_columns(w: torch.Tensor, idx: torch.Tensor, blocks: int) -> torch.Tensor:
    """The input columns of a grouped conv's weight ``w`` (out, n / blocks, *kernel), whose row block
    i reads channel block i, taken at ``idx`` (blocks * k,): channels of the full input, k from each
    block in block order (a block-keeping permutation, or a balanced selection). Returns
    (out, k, *kernel)."""
    out, b = w.shape[0], w.shape[1]
    k = len(idx) // blocks
    local = (
        idx.to(w.device).long().view(blocks, k) - torch.arange(blocks, device=w.device).view(-1, 1) * b
    )  # (blocks, k)
    wv = w.reshape(blocks, out // blocks, b, *w.shape[2:])  # (blocks, out / blocks, b, *kernel)
    index = local.view(blocks, 1, k, *([1] * (w.dim() - 2))).expand(blocks, out // blocks, k, *w.shape[2:])
    return wv.gather(2, index).reshape(out, k, *w.shape[2:])


ROWS = ("weight", "bias", "running_mean", "running_var")  # what a producer or a BatchNorm holds per channel


def _fits(net: nn.Module, g: ChannelGroup, n: int) -> bool:
    """Every tensor the shuffle touches has ``n`` channels on the axis it shuffles."""

    def sized(m: nn.Module) -> bool:
        return all(t.shape[0] == n for t in (getattr(m, k, None) for k in ROWS) if isinstance(t, torch.Tensor))

    rows = [net.get_submodule(p) for pair in (*g.producers, *g.depthwise) for p in pair if p]
    grouped = [net.get_submodule(c) for c in g.grouped]
    return (
        n % g.blocks == 0
        and all(sized(m) for m in rows)
        and all(net.get_submodule(c).weight.shape[1] == n for c in g.consumers)
        and all(m.groups == g.blocks and m.weight.shape[1] * m.groups == n for m in grouped)
        and all(net.get_submodule(c).weight.shape[1] >= at + n for c, at in g.sliced)
        and all(net.get_submodule(b).num_features >= at + n for b, at in g.carried)
    )


def _permute(net: nn.Module, g: ChannelGroup, perm: torch.Tensor) -> None:
    """Shuffle the group's channels in place: producers' and depthwise convs' output rows (and their
    BatchNorms), consumers' input columns, grouped consumers' columns block by block, the columns
    and BatchNorm rows at each offset of a concatenation."""

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
    for c in g.grouped:
        w = net.get_submodule(c).weight
        w.copy_(grouped_columns(w, perm, g.blocks))
    n = len(perm)
    for c, at in g.sliced:
        w = net.get_submodule(c).weight
        w[:, at : at + n] = w[:, at : at + n][:, perm]
    for b, at in g.carried:
        for t in (getattr(net.get_submodule(b), k, None) for k in ROWS):
            if isinstance(t, torch.Tensor):
                t[at : at + n] = t[at : at + n][perm]
