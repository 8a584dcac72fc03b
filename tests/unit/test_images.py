"""zoo_store.core.images: an image of any size as a base's input, as torchvision's Resize + CenterCrop
make it; image predicts and compositions' dataset arrays converted by the same path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from service.api.inputs import image_bytes_input
from zoo_store.core.cards import InputSpec
from zoo_store.core.errors import InvalidInput
from zoo_store.core.images import batch_to_input, image_to_input
from zoo_store.core.settings import Settings
from zoo_store.datasets.tasks import to_input


def spec(channels: int = 1, size: int = 8, resize: int | None = None, interpolation: str = "bilinear") -> InputSpec:
    half = (0.5,) * channels
    return InputSpec(channels=channels, size=size, mean=half, std=half, resize=resize, interpolation=interpolation)


def noise(h: int, w: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """uint8 (H, W) for one channel, (H, W, C) for more."""
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def chw(img: Image.Image) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32) / 255.0
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy()  # (C, H, W)


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


TV_MODES = {name: InterpolationMode(name) for name in ("nearest", "bilinear", "bicubic")}


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize(("size", "resize"), [(8, None), (8, 11), (6, 9)])
@pytest.mark.parametrize(("h", "w"), [(9, 20), (21, 10), (13, 13), (5, 7)])
@pytest.mark.parametrize("channels", [1, 3])
def test_matches_torchvision_resize_center_crop(
    channels: int, h: int, w: int, size: int, resize: int | None, interpolation: str
) -> None:
    s = spec(channels, size, resize, interpolation)
    img = Image.fromarray(noise(h, w, channels))
    want = chw(TF.center_crop(TF.resize(img, [s.resize_side], interpolation=TV_MODES[interpolation]), [size]))
    got = image_to_input(img, s)
    assert got.shape == (channels, size, size) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)  # both are Pillow's uint8 output over 255


@pytest.mark.parametrize("interpolation", ["nearest", "bicubic"])
def test_interpolation_is_honoured(interpolation: str) -> None:
    img = Image.fromarray(noise(20, 30))
    other = image_to_input(img, spec(interpolation=interpolation))
    assert np.abs(other - image_to_input(img, spec(interpolation="bilinear"))).max() > 0.05


@pytest.mark.parametrize("resize", [None, 12])
def test_non_square_is_its_centre_crop(resize: int | None) -> None:
    """8 x 16 with different noise on the sides: only the centre is kept (no squash); without resize, as is."""
    centre = noise(8, 8, seed=1)
    a, b = noise(8, 16, seed=2), noise(8, 16, seed=3)
    a[:, 4:12] = b[:, 4:12] = centre
    s = spec(size=8, resize=resize)
    got = image_to_input(Image.fromarray(a), s)
    np.testing.assert_array_equal(got, image_to_input(Image.fromarray(b), s))
    if resize is None:
        np.testing.assert_array_equal(got, centre[None] / np.float32(255))


@pytest.mark.parametrize("side", [5, 8, 12])
def test_square_images_as_before(side: int) -> None:
    """Cards without resize (bilinear) predict a square image as the old squash did: one bilinear resize."""
    img = Image.fromarray(noise(side, side, 3))
    before = chw(img.resize((8, 8), Image.BILINEAR))
    np.testing.assert_allclose(image_to_input(img, spec(3)), before, atol=1e-6)


def test_an_image_of_the_input_size_is_taken_as_it_is_unless_the_card_zooms() -> None:
    a = noise(8, 8)
    np.testing.assert_array_equal(image_to_input(Image.fromarray(a), spec()), a[None] / np.float32(255))
    zoomed = image_to_input(Image.fromarray(a), spec(resize=12))  # as torchvision's Resize(12) + CenterCrop(8)
    want = chw(TF.center_crop(TF.resize(Image.fromarray(a), [12], interpolation=TV_MODES["bilinear"]), [8]))
    np.testing.assert_array_equal(zoomed, want)
    assert not np.array_equal(zoomed, a[None] / np.float32(255))


@pytest.mark.parametrize(("mode", "channels"), [("L", 3), ("RGB", 1), ("RGB", 3), ("L", 1)])
def test_channels_converted(mode: str, channels: int) -> None:
    a = noise(8, 8, 1 if mode == "L" else 3)
    got = image_to_input(Image.fromarray(a), spec(channels))
    assert got.shape == (channels, 8, 8)
    if mode == "L" and channels == 3:
        np.testing.assert_array_equal(got, np.repeat(a[None] / np.float32(255), 3, axis=0))
    if mode == "RGB" and channels == 1:  # ITU-R 601-2 luma, as Pillow's convert("L")
        luma = (a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).round()
        np.testing.assert_allclose(got[0] * 255, luma, atol=1)


@pytest.mark.parametrize("channels", [2, 4])
def test_two_or_four_channels_refused(channels: int) -> None:
    with pytest.raises(InvalidInput, match=f"takes {channels} channels.*grey.*RGB"):
        image_to_input(Image.fromarray(noise(8, 8, 3)), spec(channels))
    for c in (1, channels):  # a grey dataset to a 2/4-channel base, a 2/4-channel one of another size
        with pytest.raises(InvalidInput, match=f"images of {c} channels, 9x9.*only grey \\(1\\) and RGB"):
            batch_to_input(np.zeros((2, c, 9, 9), np.uint8), spec(channels))
    same = np.full((2, channels, 8, 8), 51, np.uint8)  # already the spec's shape: taken as it is
    np.testing.assert_allclose(batch_to_input(same, spec(channels)), 0.2)


@pytest.mark.parametrize(
    ("data_c", "h", "w", "s"),
    [
        (1, 28, 28, spec(3, 16)),  # grey digits on an RGB base of another size
        (1, 10, 10, spec(3, 16, 20, "bicubic")),
        (3, 9, 17, spec(1, 8)),  # RGB, not square, on a grey base
        (3, 8, 8, spec(1, 8)),  # only the channels differ
        (1, 12, 7, spec(1, 6, 9, "nearest")),
    ],
)
def test_dataset_array_converts_as_the_png_predicts(data_c: int, h: int, w: int, s: InputSpec) -> None:
    x = np.stack([noise(h, w, data_c, seed=i).reshape(h, w, data_c).transpose(2, 0, 1) for i in range(3)])
    got = to_input(x, s).numpy()  # (3, C', S, S)
    assert got.shape == (3, s.channels, s.size, s.size)
    settings = Settings()
    for i in range(3):
        png = png_bytes(x[i, 0] if data_c == 1 else x[i].transpose(1, 2, 0))
        np.testing.assert_array_equal(got[i], image_bytes_input(png, s, settings, f"x[{i}]"))


def test_dataset_of_the_input_shape_is_only_scaled_unless_the_card_zooms() -> None:
    x = np.random.default_rng(0).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    np.testing.assert_array_equal(batch_to_input(x, spec(1, 8)), x / np.float32(255))
    zoomed = np.stack([image_to_input(Image.fromarray(im[0]), spec(1, 8, 12)) for im in x])
    np.testing.assert_array_equal(batch_to_input(x, spec(1, 8, 12)), zoomed)


def test_batch_refuses_what_is_not_uint8_nchw() -> None:
    with pytest.raises(InvalidInput, match="uint8 \\(N, C, H, W\\)"):
        batch_to_input(np.zeros((2, 8, 8), np.uint8), spec())
