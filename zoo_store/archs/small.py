"""Four small families for 28x28 inputs: a ResNet, a VGG-style net, a MobileNetV2-style net and a
ConvNeXt-style net. Each has a tap after every stage; with ``block_taps`` (a config key: it changes
the plan, not the weights) a tap after every block instead, for methods that cut networks finely
(the reassemble bench's deeper pool)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from zoo_store.archs.base import FLATTEN, Stage, Tap, TapNet
from zoo_store.archs.registry import register_arch


def conv_bn(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SmallNet(TapNet):
    """The demo families end alike: global average pool (tap ``pool``), then a linear head."""

    stages: nn.ModuleDict

    def _stage(self, name: str, channels: Sequence[int], stride: int, block_taps: bool) -> list[Stage]:
        """The plan of stage ``name`` (an ``nn.Sequential`` under ``stages``): one tap named after it,
        or with ``block_taps`` one tap per block (``name.<i>``, of ``channels[i]``); a block without
        weights (a pooling) belongs to the block before it, so every tap ends on a learned layer."""
        if not isinstance(block_taps, bool):  # "false" from a config must not read as true
            raise TypeError(f"block_taps must be true or false, not {block_taps!r}")
        if not block_taps:
            return [Stage(Tap(name, channels[-1], stride), (f"stages.{name}",))]
        plan: list[Stage] = []
        for i, m in enumerate(self.stages[name]):
            path = f"stages.{name}.{i}"
            if plan and next(m.parameters(), None) is None:
                plan[-1] = Stage(plan[-1].tap, (*plan[-1].steps, path))
            else:
                plan.append(Stage(Tap(f"{name}.{i}", channels[i], stride), (path,)))
        return plan

    def _finish(self, plan: list[Stage], cin: int, num_classes: int) -> None:
        self.probe_size = 28
        self.stages["pool"] = nn.AdaptiveAvgPool2d(1)
        plan.append(Stage(Tap("pool", cin, 0), ("stages.pool", FLATTEN)))
        self.head = nn.Linear(cin, num_classes)
        self._set_plan(plan)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if (stride != 1 or cin != cout) else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))  # (B, C', H', W')


class SmallResNet(SmallNet):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        blocks: Sequence[int] = (1, 1, 2),
        block_taps: bool = False,
    ):
        super().__init__()
        self.stages = nn.ModuleDict()
        self.stages["stem"] = conv_bn(in_channels, widths[0], 3, 2)  # 28 -> 14
        plan = [Stage(Tap("stem", widths[0], 2), ("stages.stem",))]
        cin, stride_total = widths[0], 2
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            stride_total *= stride
            self.stages[f"stage{i + 1}"] = nn.Sequential(
                *[BasicBlock(cin if j == 0 else w, w, stride if j == 0 else 1) for j in range(n)]
            )
            plan += self._stage(f"stage{i + 1}", [w] * n, stride_total, block_taps)
            cin = w
        self._finish(plan, cin, num_classes)


class SmallVGG(SmallNet):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        block_taps: bool = False,
    ):
        super().__init__()
        self.stages = nn.ModuleDict()
        plan: list[Stage] = []
        cin = in_channels
        for i, w in enumerate(widths):
            self.stages[f"block{i + 1}"] = nn.Sequential(
                conv_bn(cin, w), conv_bn(w, w), nn.MaxPool2d(2, ceil_mode=True)
            )
            stages = self._stage(f"block{i + 1}", [w] * 3, 2 ** (i + 1), block_taps)
            if block_taps:  # the first conv keeps the resolution of the block's input
                stages[0] = Stage(Tap(stages[0].tap.name, w, 2**i), stages[0].steps)
            plan += stages
            cin = w
        self._finish(plan, cin, num_classes)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(
            conv_bn(cin, hidden, 1, act=nn.ReLU6),
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
            conv_bn(hidden, cout, 1, act=None),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)  # (B, C', H', W')
        return x + y if self.residual else y


class SmallMobileNet(SmallNet):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        last: int = 128,
        block_taps: bool = False,
    ):
        super().__init__()
        self.stages = nn.ModuleDict()
        self.stages["stem"] = conv_bn(in_channels, widths[0], 3, 2, act=nn.ReLU6)  # 28 -> 14
        plan = [Stage(Tap("stem", widths[0], 2), ("stages.stem",))]
        cin, stride_total = widths[0], 2
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stride_total *= stride
            blocks: list[nn.Module] = [InvertedResidual(cin, w, stride), InvertedResidual(w, w, 1)]
            channels = [w, w]
            if i == len(widths) - 1:
                blocks.append(conv_bn(w, last, 1, act=nn.ReLU6))
                channels.append(last)
            self.stages[f"stage{i + 1}"] = nn.Sequential(*blocks)
            plan += self._stage(f"stage{i + 1}", channels, stride_total, block_taps)
            cin = channels[-1]
        self._finish(plan, cin, num_classes)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block (Liu et al. 2022) with BatchNorm for LayerNorm: 7x7 depthwise conv, norm,
    1x1 expansion, GELU, 1x1 projection, residual."""

    def __init__(self, dim: int, expand: int = 4):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.pw1 = nn.Conv2d(dim, dim * expand, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(dim * expand, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))  # (B, C, H, W)


class SmallConvNeXt(SmallNet):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        depths: Sequence[int] = (2, 2, 2),
        block_taps: bool = False,
    ):
        super().__init__()
        self.stages = nn.ModuleDict()
        self.stages["stem"] = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 2, 2), nn.BatchNorm2d(widths[0])
        )  # 28 -> 14 patches
        plan = [Stage(Tap("stem", widths[0], 2), ("stages.stem",))]
        cin, stride_total = widths[0], 2
        for i, (w, n) in enumerate(zip(widths, depths, strict=True)):
            down: list[nn.Module] = []
            if i:  # downsampling between stages: norm, then a 2x2 stride-2 conv
                stride_total *= 2
                down = [nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, w, 2, 2))]
            # the downsampling belongs to the stage's first block (one tap each either way)
            blocks = [nn.Sequential(*down, ConvNeXtBlock(w)) if j == 0 and down else ConvNeXtBlock(w) for j in range(n)]
            self.stages[f"stage{i + 1}"] = nn.Sequential(*blocks)
            plan += self._stage(f"stage{i + 1}", [w] * n, stride_total, block_taps)
            cin = w
        self._finish(plan, cin, num_classes)


@register_arch("resnet_s")
def resnet_s(**cfg) -> TapNet:
    return SmallResNet(**cfg)


@register_arch("vgg_s")
def vgg_s(**cfg) -> TapNet:
    return SmallVGG(**cfg)


@register_arch("mobilenet_s")
def mobilenet_s(**cfg) -> TapNet:
    return SmallMobileNet(**cfg)


@register_arch("convnext_s")
def convnext_s(**cfg) -> TapNet:
    return SmallConvNeXt(**cfg)
