"""CLR layers: an identity-initialised depthwise conv after every conv with kernel > 1."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

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


class Reprogrammed(nn.Module):
    """The frozen base with CLR kernels spliced in and a new head. Base weights are shared."""

    def __init__(self, base: TapNet, clr: dict[str, nn.Conv2d], head: nn.Linear):
        super().__init__()
        body = shared_copy(base)
        for path, conv in clr.items():
            replace_module(body, path, nn.Sequential(body.get_submodule(path), conv))
        self.body = body.eval()
        self.clr = nn.ModuleDict({path.replace(".", "/"): conv for path, conv in clr.items()})
        self.head = head

    def train(self, mode: bool = True) -> Reprogrammed:
        # The shared base stays in eval mode: its BatchNorm statistics are never updated.
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body.embed(x))  # (B, C, H, W) -> (B, K)

    def delta_state(self) -> dict[str, Tensor]:
        """The only tensors a path stores."""
        out = {f"clr.{name.replace('/', '.')}": conv.weight.detach() for name, conv in self.clr.items()}
        out["head.weight"] = self.head.weight.detach()
        out["head.bias"] = self.head.bias.detach()
        return out


def build_reprogrammed(base: TapNet, num_classes: int, kernel: int = 3, fresh: bool = True) -> Reprogrammed:
    """CLR over ``base``; ``fresh=False`` skips initialisation (weights are loaded right after)."""
    device = next(base.parameters()).device
    clr = {path: clr_conv(c, kernel, device, identity=fresh) for path, c in clr_targets(base)}
    head = (nn.Linear if fresh else partial(skip_init, nn.Linear))(base.feature_dim, num_classes, device=device)
    return Reprogrammed(base, clr, head)


@torch.no_grad()
def load_delta(model: Reprogrammed, tensors: dict[str, Tensor]) -> Reprogrammed:
    for name, conv in model.clr.items():
        conv.weight.copy_(tensors[f"clr.{name.replace('/', '.')}"])
    model.head.weight.copy_(tensors["head.weight"])
    model.head.bias.copy_(tensors["head.bias"])
    return model
