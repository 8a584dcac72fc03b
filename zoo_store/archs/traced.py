"""Any torchvision classifier as a tapped network: ``torchvision:<name>`` (and ``timm:<name>`` when
timm is installed), its taps traced from the graph, not declared.

The model is traced with torchvision's own tracer (``models.feature_extraction``, which keeps
``torchvision.ops`` as leaves and names each node by its module path). Shapes come from a forward
on the meta device. A node is a *cut* when it is the only value the rest of the graph still needs;
the taps are the last cut at each spatial resolution (up to the last convolution) and the head's
input, which must be a cut and a vector: the head is the ``nn.Linear`` whose output the network
returns. Each stage, the nodes between two taps, is compiled to a function of ``(self, x)`` as
``torch.fx`` compiles a ``GraphModule``, so it looks its modules up on the network at call time and
a structural edit (a CLR layer spliced after a conv) reaches it.

The network holds the model's own children, parameters and buffers under their own names: its
state dict is the model's, key for key, so weights saved with ``torch.save(model.state_dict())``
load unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import torch
import torchvision
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.ops import SqueezeExcitation

from zoo_store.archs.base import Stage, Tap, TapNet
from zoo_store.archs.fxtrace import trace
from zoo_store.archs.surgery import shared_copy
from zoo_store.core.errors import InvalidInput

PREFIXES = ("torchvision:", "timm:")
PROBE_SIZE = 224  # the meta forward's input side, unless the config names an image_size (img_size in timm)
# arch_config keys that would fetch or read weights: torchvision's weights/progress, timm's pretrained*,
# checkpoint_path, cache_dir (weights come only with the registration's upload)
DENIED_KEYS = {"weights", "progress", "checkpoint_path", "cache_dir"}
DENIED_PREFIXES = ("pretrained",)


@dataclass(frozen=True)
class Plan:
    """What tracing found: the tap plan and each stage's compiled code."""

    stages: tuple[Stage, ...]
    codes: tuple[Callable[..., Tensor], ...]  # stage i: (net, x) -> the tap's value
    head_path: str
    probe_size: int  # the input side the shapes were traced at


def config_key(config: dict[str, Any] | None) -> str:
    """A config as a cache key (sorted JSON)."""
    return json.dumps(config, sort_keys=True, default=str)


def is_traced(arch: str) -> bool:
    return arch.startswith(PREFIXES)


def build_traced(arch: str, config: dict[str, Any]) -> TracedNet:
    """The network ``arch`` names, untrained, with its traced plan (the plan is traced once per
    architecture and config, on the meta device)."""
    plan = _plan(arch, config_key(config))
    return TracedNet(_library_model(arch, config), plan)


class TracedNet(TapNet):
    def __init__(self, model: nn.Module, plan: Plan):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model._parameters.items():
            self.register_parameter(name, p)
        for name, b in model._buffers.items():
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        self._codes = plan.codes
        self.probe_size = plan.probe_size
        self._set_plan(plan.stages, head_path=plan.head_path)
        self.eval()

    def stage_fn(self, index: int) -> Callable[[Tensor], Tensor]:
        return partial(self._codes[index], self)


# -- building the library's model --------------------------------------------------------------


def _library_model(arch: str, config: dict[str, Any]) -> nn.Module:
    """The library's model, with random weights; under a meta default device, a shared copy of the
    one meta-device model of this architecture and config (``_meta_model``)."""
    if torch.get_default_device().type == "meta":
        return shared_copy(_meta_model(arch, config_key(config)))
    return _build(arch, config)


def _build(arch: str, config: dict[str, Any]) -> nn.Module:
    library, _, name = arch.partition(":")
    cfg = dict(config)
    if denied := [k for k in cfg if k in DENIED_KEYS or k.startswith(DENIED_PREFIXES)]:
        raise InvalidInput(f"arch_config may not set {denied}: weights come only with the registration's upload")
    channels = cfg.pop("in_channels", None)
    try:
        if library == "torchvision":
            if name not in torchvision.models.list_models(module=torchvision.models):
                raise InvalidInput(
                    f"unknown torchvision classifier {name!r}; choose one of "
                    f"torchvision.models.list_models(module=torchvision.models)"
                )
            model = torchvision.models.get_model(name, weights=None, **cfg)
            if channels not in (None, 3):
                _set_input_channels(model, arch, channels)
        else:
            model = _timm().create_model(name, pretrained=False, **cfg, **({"in_chans": channels} if channels else {}))
    except InvalidInput:
        raise
    except Exception as e:
        raise InvalidInput(f"bad config for architecture {arch!r}: {type(e).__name__}: {e}") from e
    return model.eval()


@lru_cache(maxsize=64)  # keyed by the cards' configs: bounded
def _meta_model(arch: str, config_key: str) -> nn.Module:
    """Built on the meta device (shapes only, nothing allocated or initialised); a builder that
    computes with its tensors there (RegNet derives its widths so) is built once on the CPU and
    moved to the meta device instead."""
    config = json.loads(config_key)
    try:
        with torch.device("meta"):
            return _build(arch, config)
    except InvalidInput:
        with torch.device("cpu"), torch.random.fork_rng(devices=[]):
            return _build(arch, config).to("meta")  # a config error raises here too, with its CPU message


def _timm():
    try:
        import timm
    except ImportError as e:
        raise InvalidInput("timm architectures need timm: pip install -e '.[timm]'") from e
    return timm


def _set_input_channels(model: nn.Module, arch: str, channels: int) -> None:
    """The first conv reads ``channels`` planes instead of 3 (grey inputs): a new conv, the same otherwise."""
    path, conv = next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None:
        raise InvalidInput(f"{arch}: in_channels needs a first Conv2d to resize; the model has none")
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
        device=conv.weight.device,
    )
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# -- tracing -----------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _plan(arch: str, config_key: str) -> Plan:
    config = json.loads(config_key)
    model = shared_copy(_meta_model(arch, config_key))  # tracing may add constants to its root
    graph, names = _trace(model, arch)
    size = int(config.get("image_size", config.get("img_size", PROBE_SIZE)))
    channels = int(config.get("in_channels", config.get("in_chans", 3)))
    gm = fx.GraphModule(model, graph)
    try:
        ShapeProp(gm).propagate(torch.empty(2, channels, size, size, device="meta"))
    except Exception as e:
        raise InvalidInput(f"{arch}: a forward at {channels} x {size} x {size} failed: {e}") from e
    nodes = list(graph.nodes)
    head = _head(nodes, names, model, arch)
    feature = head.args[0]
    cuts = _cuts(nodes)
    if feature not in cuts or _shape(feature) is None or len(_shape(feature)) != 2:
        raise InvalidInput(
            f"{arch}: the head {head.target!r} does not read one flat feature vector "
            f"(its input {names.get(feature, feature.name)!r} is {_shape(feature)})"
        )
    convs = [n for n in nodes if n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.Conv2d)]
    taps = _spatial_taps(nodes, cuts, feature, convs, size)
    boundaries = [n for n, _ in taps] + [feature]
    tap_list = [Tap(names[n], _shape(n)[1], stride) for n, stride in taps]
    tap_list.append(
        Tap(names[feature] if names[feature] not in {t.name for t in tap_list} else "pool", _shape(feature)[1], 0)
    )
    for n in nodes:
        if n.op == "get_attr" and not _resolves(model, n.target):
            raise InvalidInput(
                f"{arch}: node {names.get(n, n.name)!r} reads a constant that is not a "
                f"parameter or buffer of the model ({n.target!r})"
            )
    stages, codes, start = [], [], None
    for tap, end in zip(tap_list, boundaries, strict=True):
        body = _between(nodes, start, end)
        steps = tuple(dict.fromkeys(n.target for n in body if n.op == "call_module"))
        stages.append(Stage(tap, steps))
        codes.append(_compile(body, start, end, arch, names))
        start = end
    return Plan(tuple(stages), tuple(codes), head.target, size)


def node_tracer():
    """torchvision's own tracer and settings (``torchvision.ops`` wrapped), except that its
    conv-norm-activation blocks and squeeze-excitations are traced through, so their convs are nodes
    of the graph, and that subclasses of nn.Conv2d and nn.Linear (timm's) are leaves as those are."""
    from torchvision.models import feature_extraction as fe

    kwargs = fe._set_default_tracer_kwargs(None)
    leaves = [m for m in kwargs["leaf_modules"] if not issubclass(m, nn.Sequential | SqueezeExcitation)]
    kwargs["leaf_modules"] = [*leaves, nn.Conv2d, nn.Linear]
    return fe.NodePathTracer(**kwargs)


def _trace(model: nn.Module, arch: str) -> tuple[fx.Graph, dict[fx.Node, str]]:
    tracer = node_tracer()
    try:
        graph = trace(tracer, model)
    except Exception as e:
        raise InvalidInput(f"{arch}: torch.fx cannot trace this model ({type(e).__name__}: {e})") from e
    return graph, dict(tracer.node_to_qualname)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _head(nodes: list[fx.Node], names: dict[fx.Node, str], model: nn.Module, arch: str) -> fx.Node:
    out = next(n for n in nodes if n.op == "output").args[0]
    if isinstance(out, fx.Node) and out.op == "call_module" and isinstance(model.get_submodule(out.target), nn.Linear):
        return out
    what = names.get(out, getattr(out, "name", repr(out))) if isinstance(out, fx.Node) else type(out).__name__
    raise InvalidInput(
        f"{arch}: no linear head: the network's output comes from node {what!r}, not from an "
        f"nn.Linear, so there is no classifier to replace"
    )


def _cuts(nodes: list[fx.Node]) -> set[fx.Node]:
    """Nodes after which nothing else computed so far is still needed (parameters are free)."""
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in nodes}
    cuts, live_until = set(), -1  # the furthest position any value before this node is read at
    for i, n in enumerate(nodes):
        if n.op in ("get_attr", "output"):
            continue
        if live_until <= i and n.op != "placeholder":
            cuts.add(n)
        live_until = max(live_until, last_use[n])
    return cuts


def _spatial_taps(
    nodes: list[fx.Node], cuts: set[fx.Node], feature: fx.Node, convs: list[fx.Node], size: int
) -> list[tuple[fx.Node, int]]:
    """(node, stride): at each resolution before ``feature``, up to the resolution of the last conv
    (a global pool's 1 x 1 output is not a tap), the narrowest cut (B, C, H, W), the last of equals:
    a block's output, not the expanded channels inside the next block."""
    if not convs:
        return []
    end, last_conv, final = nodes.index(feature), nodes.index(convs[-1]), _shape(convs[-1])[-2:]
    conv_set = set(convs)
    by_resolution: dict[tuple[int, ...], fx.Node] = {}
    conv: tuple[int, ...] = ()  # the shape the last conv so far wrote
    for i, n in enumerate(nodes[:end]):
        shape = _shape(n)
        if shape is None or len(shape) != 4:
            continue
        if n in conv_set:
            conv = shape
        # (B, C, H, W) as the conv wrote it: its channels or its resolution (not a channels-last (B, H, W, C))
        nchw = bool(conv) and (shape[1] == conv[1] or shape[-2:] == conv[-2:])
        if n in cuts and nchw and (i <= last_conv or shape[-2:] == final):
            best = by_resolution.get(shape[-2:])
            if best is None or shape[1] <= _shape(best)[1]:
                by_resolution[shape[-2:]] = n
    position = {n: i for i, n in enumerate(nodes)}
    return [(n, max(1, round(size / _shape(n)[-1]))) for n in sorted(by_resolution.values(), key=position.__getitem__)]


def _between(nodes: list[fx.Node], start: fx.Node | None, end: fx.Node) -> list[fx.Node]:
    lo = nodes.index(start) + 1 if start is not None else 0
    return [n for n in nodes[lo : nodes.index(end) + 1] if n.op not in ("placeholder", "get_attr", "output")]


def _compile(
    body: list[fx.Node], start: fx.Node | None, end: fx.Node, arch: str, names: dict[fx.Node, str]
) -> Callable[..., Tensor]:
    """The stage's nodes as ``forward(self, x)``, compiled the way torch.fx compiles a GraphModule."""
    g = fx.Graph()
    x = g.placeholder("x")
    env: dict[fx.Node, fx.Node] = {}

    def arg(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "placeholder" and start is None:
            return x
        if n.op == "get_attr":
            env[n] = g.node_copy(n)
            return env[n]
        raise InvalidInput(
            f"{arch}: the stage ending at {names.get(end, end.name)!r} reads "
            f"{names.get(n, n.name)!r} from before its start"
        )

    if start is not None:
        env[start] = x
    for n in body:
        env[n] = g.node_copy(n, arg)
    g.output(env[end])
    code = g.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, f"<stage {names.get(end, end.name)}>", "exec"), scope)  # noqa: S102 - fx's own codegen
    return scope["forward"]


def _resolves(model: nn.Module, target: str) -> bool:
    try:
        model.get_parameter(target)
    except AttributeError:
        try:
            model.get_buffer(target)
        except AttributeError:
            return False
    return True
