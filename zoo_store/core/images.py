"""An image of any size as a base's input, per its card's `InputSpec`, with numpy and Pillow only (the
HTTP workers of `zoo serve` decode predicts with this and import no torch; compositions convert
dataset arrays with it, so a dataset image and the same image sent as a PNG become the same input).

What torchvision's ``Resize(resize) + CenterCrop(size)`` do to a PIL image, and timm's eval
transforms from its data config: channels converted (grey "L" for 1 channel, "RGB" for 3, as
Pillow's ``convert`` does: RGB to grey is ITU-R 601-2 luma, grey to RGB repeats the channel), the
shorter side resized to ``spec.resize_side`` with ``spec.interpolation`` (Pillow's resampling
filters, antialiased when shrinking), then the centre ``size`` x ``size`` crop, scaled to [0, 1].
Normalizing with mean/std is left to the model's side (`zoo_store.training.normalize`).

A dataset array goes through the very same steps, image by image, unless nothing would change it
(it has the base's shape and the card keeps the whole shorter side). Cards of 2 or 4 channels take
tensors only: which channels an image would fill (alpha? another band?) is not something an image says.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from zoo_store.core.cards import InputSpec
from zoo_store.core.errors import InvalidInput

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
MODES = {1: "L", 3: "RGB"}  # channels -> the Pillow mode an image is converted to


def image_mode(spec: InputSpec) -> str:
    """The Pillow mode images become for ``spec``; InvalidInput for 2 or 4 channels."""
    mode = MODES.get(spec.channels)
    if mode is None:
        raise InvalidInput(
            f"this base takes {spec.channels} channels; images convert only to 1 (grey) or 3 (RGB): "
            f"send a tensor or .npy of shape [{spec.channels}, {spec.size}, {spec.size}]"
        )
    return mode


def resized_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``side`` and the aspect kept, the longer side truncated
    as torchvision's ``resize(img, [side])`` truncates it."""
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


def centre_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) of the centre ``size`` x ``size`` crop, rounded as torchvision's
    ``center_crop`` rounds (Python's round: halves to even)."""
    left, top = round((width - size) / 2), round((height - size) / 2)
    return left, top, left + size, top + size


def image_to_input(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """A PIL image of any size and mode -> (C, size, size) float32 in [0, 1] per ``spec``."""
    img = img.convert(image_mode(spec))
    size = spec.size
    w, h = resized_size(*img.size, spec.resize_side)
    if (w, h) != img.size:
        img = img.resize((w, h), RESAMPLE[spec.interpolation])
    if (w, h) != (size, size):
        img = img.crop(centre_box(w, h, size))
    hwc = np.asarray(img, dtype=np.float32).reshape(size, size, spec.channels) / 255.0  # (S, S, C)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))  # (C, S, S)


def batch_to_input(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 (N, C', size, size) in [0, 1]: each image as `image_to_input`
    converts it (C in 1 or 3), unless that would not change it (then only scaled)."""
    if x.ndim != 4 or x.dtype != np.uint8:
        raise InvalidInput(f"images must be uint8 (N, C, H, W); got {x.dtype} of shape {list(x.shape)}")
    if tuple(x.shape[1:]) == (spec.channels, spec.size, spec.size) and spec.resize_side == spec.size:
        return x.astype(np.float32) / 255.0  # (N, C, S, S)
    if x.shape[1] not in MODES or spec.channels not in MODES:
        raise InvalidInput(
            f"images of {x.shape[1]} channels, {x.shape[3]}x{x.shape[2]}, cannot be converted to the base's "
            f"{spec.channels}x{spec.size}x{spec.size} input: only grey (1) and RGB (3) images convert, to 1 or 3"
        )
    out = np.empty((len(x), spec.channels, spec.size, spec.size), dtype=np.float32)  # (N, C', S, S)
    for i, chw in enumerate(x):
        hwc = np.ascontiguousarray(chw.transpose(1, 2, 0))  # (H, W, C)
        out[i] = image_to_input(Image.fromarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc), spec)
    return out
