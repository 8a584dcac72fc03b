"""Dataset uploads: ImageFolder zips and .npz files parsed, everything malformed refused."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from zoo_store.datasets.upload import Limits, parse_upload
from zoo_store.errors import BadRequest, InvalidInput, PayloadTooLarge


def _png(shape=(8, 8), mode="L", value=128, fmt="PNG") -> bytes:
    arr = np.full(shape if mode == "L" else (*shape, 3), value, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=fmt)
    return buf.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_gray_folders_sorted_numerically() -> None:
    files = {f"{lab}/{i}.png": _png(value=10 * int(lab)) for lab in ("10", "2", "1") for i in range(2)}
    p = parse_upload(_zip(files), "d.zip")
    assert p.labels == ["1", "2", "10"] and p.x.shape == (6, 1, 8, 8) and p.x.dtype == np.uint8
    assert sorted(p.y.tolist()) == [0, 0, 1, 1, 2, 2]


def test_rgb_wrapped_root_and_junk_ignored() -> None:
    files = {"root/cat/a.jpg": _png(mode="RGB", fmt="JPEG"), "root/dog/b.png": _png(),
             "__MACOSX/root/cat/._a.jpg": b"junk", "root/.DS_Store": b"junk"}  # fmt: skip
    p = parse_upload(_zip(files), "d.zip")
    assert p.labels == ["cat", "dog"] and p.x.shape == (2, 3, 8, 8)


@pytest.mark.parametrize(
    "x",
    [np.zeros((4, 6, 6), np.uint8), np.full((4, 1, 6, 6), 0.5, np.float32), np.zeros((4, 6, 6, 3), np.uint8)],
    ids=["uint8 NHW", "float NCHW", "uint8 NHWC"],
)
def test_npz_layouts(x: np.ndarray) -> None:
    p = parse_upload(_npz(x=x, y=np.array([0, 1, 0, 1])), "d.npz")
    assert p.x.shape[0] == 4 and p.x.shape[1] in (1, 3) and p.x.shape[2:] == (6, 6) and p.labels == ["0", "1"]
    if x.dtype == np.float32:
        assert int(p.x.max()) == 128


def test_npz_with_labels() -> None:
    p = parse_upload(_npz(x=np.zeros((2, 4, 4), np.uint8), y=np.array([1, 0]), labels=np.array(["a", "b"])), "d.npz")
    assert p.labels == ["a", "b"] and p.y.tolist() == [1, 0]


def test_object_array_is_never_unpickled() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, arr in (("x", np.zeros((2, 4, 4), np.uint8)), ("y", np.array([0, 1], dtype=object))):
            item = io.BytesIO()
            np.save(item, arr, allow_pickle=True)
            z.writestr(f"{name}.npy", item.getvalue())
    with pytest.raises(InvalidInput, match="never loaded"):
        parse_upload(buf.getvalue(), "evil.npz")


def _bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("a/big.png", b"\0" * (2 * 2**20))
        z.writestr("b/x.png", _png())
    return buf.getvalue()


BAD = {
    "empty": (b"", BadRequest, "empty"),
    "not a zip": (b"hello world", BadRequest, "neither"),
    "corrupt zip": (_zip({"a/1.png": _png(), "b/1.png": _png()})[:-30], BadRequest, "zip"),
    "traversal": (_zip({"../a/1.png": _png(), "b/1.png": _png()}), BadRequest, "unsafe path"),
    "one label": (_zip({"a/1.png": _png(), "a/2.png": _png()}), InvalidInput, "at least 2 labels"),
    "undecodable": (_zip({"a/1.png": b"nope", "b/1.png": _png()}), InvalidInput, "a/1.png"),
    "mixed sizes": (_zip({"a/1.png": _png((8, 8)), "b/1.png": _png((9, 9))}), InvalidInput, "one size"),
    "loose files": (_zip({"1.png": _png(), "2.png": _png()}), InvalidInput, "label_name/image"),
    "too large side": (_zip({"a/1.png": _png((600, 8)), "b/1.png": _png()}), InvalidInput, "a side"),
    "zip bomb": (_bomb(), PayloadTooLarge, "limit"),
    "npz n mismatch": (_npz(x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 1])), InvalidInput, "3 samples"),
    "npz y range": (_npz(x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, 5]), labels=np.array(["a", "b"])), InvalidInput, "label index"),
    "npz negative y": (_npz(x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, -1])), InvalidInput, "negative"),
    "npz dims": (_npz(x=np.zeros((2, 4), np.uint8), y=np.array([0, 1])), InvalidInput, "x must be"),
    "npz nan": (_npz(x=np.full((2, 4, 4), np.nan, np.float32), y=np.array([0, 1])), InvalidInput, "finite"),
    "npz float range": (_npz(x=np.full((2, 4, 4), 3.0), y=np.array([0, 1])), InvalidInput, "[0, 1]"),
    "npz empty label": (_npz(x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, 2])), InvalidInput, "without samples"),
    "npz float y": (_npz(x=np.zeros((2, 4, 4), np.uint8), y=np.array([0.0, 1.0])), InvalidInput, "integer"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_uploads(case: str) -> None:
    data, err, needle = BAD[case]
    with pytest.raises(err, match=None) as info:
        parse_upload(data, "upload", Limits(max_bytes=2**20, max_side=512))
    assert needle in info.value.detail


def test_too_many_samples() -> None:
    data = _npz(x=np.zeros((10, 4, 4), np.uint8), y=np.arange(10) % 2)
    with pytest.raises(PayloadTooLarge, match="limit"):
        parse_upload(data, "d.npz", Limits(max_samples=5))
