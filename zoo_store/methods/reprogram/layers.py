"""CLR layers: an identity-initialised depthwise conv after every conv with kernel > 1, and, when a
path tunes BatchNorm, its own copy of every BatchNorm of the base.

Traced networks (timm's) inline their BatchNorm modules: the graph reads ``<bn>.weight`` and the
running statistics by attribute and calls ``F.batch_norm`` with ``training=False`` fixed at trace
time. Swapping a BatchNorm module for the path's copy therefore works for every architecture in
eval mode, but switching it to train mode does not; ``batch_statistics`` does that for both kinds:
while it is active, the ``F.batch_norm`` calls that read the given modules' running statistics use
the batch's statistics and update the running ones, as a BatchNorm in train mode does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init
from torch.overrides import TorchFunctionMode

from zoo_store.archs import TapNet
from zoo_store.archs.surgery import conv_paths, replace_module, shared_copy, state_bytes


def clr_conv(channels: int, kernel: int = 3, device: torch.device | str = "cpu", identity: bool = True) -> nn.Conv2d:
    """Depthwise k x k conv; identity-initialised (the same as ``nn.init.dirac_`` with groups=C)."""
    conv = skip_init(
        nn.Conv2d, channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False, device=device
    )
    if identity:
        with torch.no_grad():
            conv.weight.zero_()[:, 0, kernel // 2, kernel // 2] = 1.0  # (C, 1, k, k)
    return conv


def clr_targets(base: TapNet) -> list[tuple[str, int]]:
    """(conv path, out channels) of every conv that gets a CLR kernel."""
    return [(path, conv.out_channels) for path, conv in conv_paths(base, min_kernel=2)]


def bn_targets(base: nn.Module) -> list[tuple[str, int]]:
    """(BatchNorm path, channels) of every BatchNorm2d (timm's BatchNormAct2d too) a path may tune."""
    return [(path, m.num_features) for path, m in base.named_modules() if isinstance(m, nn.BatchNorm2d)]


def bn_refusal(base: nn.Module) -> str | None:
    """Why per-task BatchNorm cannot apply to ``base``, or None."""
    bns = [(p, m) for p, m in base.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return "per-task BatchNorm ('bn': true) needs a base with BatchNorm2d layers; this one has none"
    odd = [p for p, m in bns if not m.affine or not m.track_running_stats]
    if odd:
        return f"per-task BatchNorm needs affine BatchNorms with running statistics; these lack them: {odd}"
    return None


class _BatchStatistics(TorchFunctionMode):
    """Every ``F.batch_norm`` that reads one of ``modules``' running means runs in training mode."""

    def __init__(self, modules: Iterable[nn.BatchNorm2d]):
        super().__init__()
        self.by_mean = {id(m.running_mean): m for m in modules}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is F.batch_norm:
            call = batch_norm_args(args, kwargs)
            module = self.by_mean.get(id(call["running_mean"]))
            if module is not None:
                call.update(training=True, momentum=0.1 if module.momentum is None else module.momentum)
                return func(**call)
        return func(*args, **kwargs)


_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def batch_norm_args(args: tuple, kwargs: dict) -> dict[str, Any]:
    """``F.batch_norm``'s arguments by name."""
    return {**dict(zip(_BN_ARGS, args, strict=False)), **kwargs}


@contextlib.contextmanager
def batch_statistics(modules: Iterable[nn.BatchNorm2d]) -> Iterator[None]:
    """Inside the block, ``modules`` normalise with batch statistics and update their running ones."""
    with _BatchStatistics(modules):
        yield


def own_norm(bn: nn.BatchNorm2d, device: torch.device | str) -> nn.BatchNorm2d:
    """A structural copy of ``bn`` (its activation too, for timm's BatchNormAct2d) with its own tensors."""
    new = shared_copy(bn)
    new._parameters = {
        k: None if v is None else nn.Parameter(v.detach().to(device).clone()) for k, v in bn._parameters.items()
    }
    new._buffers = {k: None if v is None else v.detach().to(device).clone() for k, v in bn._buffers.items()}
    return new


def reprogram_refusal(net: TapNet) -> str | None:
    """CLR reprograms spatial filters: a network needs a conv with kernel > 1 that is not a patch
    embedding (stride as large as its kernel: each input pixel is read once)."""
    convs = conv_paths(net, min_kernel=2)
    if any(min(c.stride) < max(c.kernel_size) for _, c in convs):
        return None
    found = ", ".join(f"{p} ({c.kernel_size[0]}x{c.kernel_size[1]}, stride {c.stride[0]})" for p, c in convs)
    return "CLR needs a spatial convolution (kernel > 1, stride below its kernel) to reprogram; this network has " + (
        f"only patch embeddings: {found}" if found else "no convolution with kernel > 1"
    )


def dense_bytes(base: TapNet, delta_bytes: int) -> int:
    """The dense network a reprogram path stands for: the base without its head, plus the path's tensors."""
    return state_bytes(base) - state_bytes(base.head_layer) + delta_bytes


NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")  # what a path stores of each BatchNorm


class Reprogrammed(nn.Module):
    """The frozen base with CLR kernels spliced in and a new head, and with ``bn`` its own copy of
    every BatchNorm. Every other base weight is shared."""

    def __init__(self, base: TapNet, clr: dict[str, nn.Conv2d], head: nn.Linear, bn: bool = False):
        super().__init__()
        body = shared_copy(base)
        device = head.weight.device
        norms = {path: own_norm(body.get_submodule(path), device) for path, _ in bn_targets(body)} if bn else {}
        for path, norm in norms.items():
            replace_module(body, path, norm)
        for path, conv in clr.items():
            replace_module(body, path, nn.Sequential(body.get_submodule(path), conv))
        self.body = body.eval()
        self.clr = nn.ModuleDict({path.replace(".", "/"): conv for path, conv in clr.items()})
        self.norms = nn.ModuleDict({path.replace(".", "/"): norm for path, norm in norms.items()})
        self.head = head

    def train(self, mode: bool = True) -> Reprogrammed:
        # The shared base stays in eval mode: its BatchNorm statistics are never updated. The path's own
        # BatchNorms (``bn``) use batch statistics while training, through ``batch_statistics``.
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        stats = batch_statistics(self.norms.values()) if self.training and len(self.norms) else contextlib.nullcontext()
        with stats:
            return self.head(self.body.embed(x))  # (B, C, H, W) -> (B, K)

    def delta_state(self) -> dict[str, Tensor]:
        """The only tensors a path stores."""
        out = {f"clr.{name.replace('/', '.')}": conv.weight.detach() for name, conv in self.clr.items()}
        for name, norm in self.norms.items():
            for t in NORM_TENSORS:
                out[f"bn.{name.replace('/', '.')}.{t}"] = getattr(norm, t).detach()
        out["head.weight"] = self.head.weight.detach()
        out["head.bias"] = self.head.bias.detach()
        return out


def build_reprogrammed(
    base: TapNet, num_classes: int, kernel: int = 3, fresh: bool = True, bn: bool = False
) -> Reprogrammed:
    """CLR over ``base``; ``fresh=False`` skips initialisation (weights are loaded right after); ``bn``:
    the path's own BatchNorms, starting as copies of the base's."""
    device = next(base.parameters()).device
    clr = {path: clr_conv(c, kernel, device, identity=fresh) for path, c in clr_targets(base)}
    head = (nn.Linear if fresh else partial(skip_init, nn.Linear))(base.feature_dim, num_classes, device=device)
    return Reprogrammed(base, clr, head, bn=bn)


@torch.no_grad()
def load_delta(model: Reprogrammed, tensors: dict[str, Tensor]) -> Reprogrammed:
    for name, conv in model.clr.items():
        conv.weight.copy_(tensors[f"clr.{name.replace('/', '.')}"])
    for name, norm in model.norms.items():
        for t in NORM_TENSORS:
            getattr(norm, t).copy_(tensors[f"bn.{name.replace('/', '.')}.{t}"])
    model.head.weight.copy_(tensors["head.weight"])
    model.head.bias.copy_(tensors["head.bias"])
    return model
