"""The families the contract tests and ``zoo bench --suite architectures`` cover: one small member
of each torchvision classification family (and of two timm families, when timm is installed)."""

from __future__ import annotations

FAMILIES: dict[str, str] = {  # family -> architecture name
    "resnet": "torchvision:resnet18",
    "resnext": "torchvision:resnext50_32x4d",
    "wide_resnet": "torchvision:wide_resnet50_2",
    "vgg_bn": "torchvision:vgg11_bn",
    "mobilenet_v2": "torchvision:mobilenet_v2",
    "mobilenet_v3_large": "torchvision:mobilenet_v3_large",
    "efficientnet": "torchvision:efficientnet_b0",
    "regnet": "torchvision:regnet_x_400mf",
    "convnext": "torchvision:convnext_tiny",
    "densenet": "torchvision:densenet121",
    "shufflenet": "torchvision:shufflenet_v2_x0_5",
    "mnasnet": "torchvision:mnasnet0_5",
    "googlenet": "torchvision:googlenet",
    "swin": "torchvision:swin_t",
    "squeezenet": "torchvision:squeezenet1_0",
    "vit": "torchvision:vit_b_16",
}
TIMM_FAMILIES: dict[str, str] = {
    "timm_resnet": "timm:resnet18",
    "timm_efficientnet": "timm:efficientnet_b0",
}
