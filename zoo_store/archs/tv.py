"""torchvision adapters: the torchvision model itself (same state-dict keys) with a tap plan."""

from __future__ import annotations

import torchvision
from torch import nn

from zoo_store.archs.base import FLATTEN, Stage, Tap, TapNet
from zoo_store.archs.registry import register_arch


class TVResNet(TapNet, torchvision.models.ResNet):
    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int = 1000, in_channels: int = 3):
        torchvision.models.ResNet.__init__(self, block, layers, num_classes=num_classes)
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        widths = [64 * block.expansion * 2**i for i in range(4)]
        plan = [Stage(Tap("stem", 64, 4), ("conv1", "bn1", "relu", "maxpool"))]
        plan += [Stage(Tap(f"layer{i + 1}", w, 4 * 2**i), (f"layer{i + 1}",)) for i, w in enumerate(widths)]
        plan.append(Stage(Tap("pool", widths[-1], 0), ("avgpool", FLATTEN)))
        self._set_plan(plan, head_path="fc")

    forward = TapNet.forward


class TVMobileNetV3Small(TapNet, torchvision.models.MobileNetV3):
    # (tap name, last features index, channels, stride) at each resolution change
    STAGES = (("stage1", 1, 16, 4), ("stage2", 3, 24, 8), ("stage3", 8, 48, 16), ("stage4", 12, 576, 32))

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        from torchvision.models.mobilenetv3 import _mobilenet_v3_conf

        settings, last_channel = _mobilenet_v3_conf("mobilenet_v3_small")
        torchvision.models.MobileNetV3.__init__(self, settings, last_channel, num_classes=num_classes)
        if in_channels != 3:
            self.features[0][0] = nn.Conv2d(in_channels, 16, 3, 2, 1, bias=False)
        plan, first = [], 0
        for name, last, ch, stride in self.STAGES:
            plan.append(Stage(Tap(name, ch, stride), tuple(f"features.{i}" for i in range(first, last + 1))))
            first = last + 1
        plan.append(
            Stage(Tap("pool", last_channel, 0), ("avgpool", FLATTEN, "classifier.0", "classifier.1", "classifier.2"))
        )
        self._set_plan(plan, head_path="classifier.3")

    forward = TapNet.forward


@register_arch("tv_resnet18")
def tv_resnet18(num_classes: int = 1000, in_channels: int = 3) -> TapNet:
    return TVResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes, in_channels)


@register_arch("tv_resnet50")
def tv_resnet50(num_classes: int = 1000, in_channels: int = 3) -> TapNet:
    return TVResNet(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], num_classes, in_channels)


@register_arch("tv_mobilenet_v3_small")
def tv_mobilenet_v3_small(num_classes: int = 1000, in_channels: int = 3) -> TapNet:
    return TVMobileNetV3Small(num_classes, in_channels)
