"""Three small families for 28x28 inputs: a ResNet, a VGG-style net and a MobileNetV2-style net."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from zoo_store.archs.base import FLATTEN, Stage, Tap, TapNet
from zoo_store.archs.registry import register_arch


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SmallNet(TapNet):
    """The demo families end alike: global average pool (tap ``pool``), then a linear head."""

    stages: nn.ModuleDict

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
    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128),
                 blocks: Sequence[int] = (1, 1, 2)):  # fmt: skip
        super().__init__()
        self.stages = nn.ModuleDict()
        self.stages["stem"] = conv_bn(in_channels, widths[0], 3, 2)  # 28 -> 14
        plan = [Stage(Tap("stem", widths[0], 2), ("stages.stem",))]
        cin, stride_total = widths[0], 2
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            stride_total *= stride
            self.stages[f"stage{i + 1}"] = nn.Sequential(*[BasicBlock(cin if j == 0 else w, w, stride if j == 0 else 1) for j in range(n)])
            plan.append(Stage(Tap(f"stage{i + 1}", w, stride_total), (f"stages.stage{i + 1}",)))
            cin = w
        self._finish(plan, cin, num_classes)


class SmallVGG(SmallNet):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        self.stages = nn.ModuleDict()
        plan, cin = [], in_channels
        for i, w in enumerate(widths):
            self.stages[f"block{i + 1}"] = nn.Sequential(conv_bn(cin, w), conv_bn(w, w), nn.MaxPool2d(2, ceil_mode=True))
            plan.append(Stage(Tap(f"block{i + 1}", w, 2 ** (i + 1)), (f"stages.block{i + 1}",)))
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
    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64),
                 last: int = 128):  # fmt: skip
        super().__init__()
        self.stages = nn.ModuleDict()
        self.stages["stem"] = conv_bn(in_channels, widths[0], 3, 2, act=nn.ReLU6)  # 28 -> 14
        plan = [Stage(Tap("stem", widths[0], 2), ("stages.stem",))]
        cin, stride_total = widths[0], 2
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stride_total *= stride
            blocks: list[nn.Module] = [InvertedResidual(cin, w, stride), InvertedResidual(w, w, 1)]
            if i == len(widths) - 1:
                blocks.append(conv_bn(w, last, 1, act=nn.ReLU6))
                w = last
            self.stages[f"stage{i + 1}"] = nn.Sequential(*blocks)
            plan.append(Stage(Tap(f"stage{i + 1}", w, stride_total), (f"stages.stage{i + 1}",)))
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
