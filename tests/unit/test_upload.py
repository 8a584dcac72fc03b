"""parse_upload: every accepted shape and every refusal, built in memory (no files, no server)."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from zoo_store.core.errors import BadRequest, InvalidInput, PayloadTooLarge, ZooError
from zoo_store.datasets.upload import Limits, ParsedDataset, parse_upload

# -- builders ---------------------------------------------------------------------------------


def png(value: int | tuple[int, int, int] = 128, size: tuple[int, int] = (8, 6), mode: str = "L") -> bytes:
    """A flat image (size is W x H) as PNG bytes."""
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def zip_of(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def npz_of(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def gray_folders(prefix: str = "") -> dict[str, bytes]:
    return {
        f"{prefix}dark/a.png": png(10),
        f"{prefix}dark/sub/deeper/b.png": png(20),
        f"{prefix}light/c.png": png(240),
    }


def refused(data: bytes, cls: type[ZooError], needle: str, limits: Limits | None = None) -> ZooError:
    with pytest.raises(cls) as info:
        parse_upload(data, "upload.bin", limits or Limits())
    assert type(info.value) is cls, info.value
    assert needle in info.value.detail, info.value.detail
    return info.value


# -- ImageFolder zips -------------------------------------------------------------------------


def test_gray_zip() -> None:
    p = parse_upload(zip_of(gray_folders()), "d.zip")
    assert isinstance(p, ParsedDataset)
    assert p.labels == ["dark", "light"]
    assert p.x.shape == (3, 1, 6, 8) and p.x.dtype == np.uint8
    assert p.y.dtype == np.int64 and p.y.tolist() == [0, 0, 1]
    assert sorted(p.x[:, 0, 0, 0].tolist()) == [10, 20, 240]


def test_rgb_zip_converts_every_image_to_rgb() -> None:
    files = {"cat/1.png": png((200, 10, 10), mode="RGB"), "dog/1.png": png(77), "dog/2.jpg": b""}
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (0, 0, 255)).save(buf, format="JPEG")
    files["dog/2.jpg"] = buf.getvalue()
    p = parse_upload(zip_of(files), "d.zip")
    assert p.labels == ["cat", "dog"] and p.x.shape == (3, 3, 6, 8)
    assert p.x[0, :, 0, 0].tolist() == [200, 10, 10]
    assert p.x[1, :, 0, 0].tolist() == [77, 77, 77]  # the gray image, replicated to RGB
    assert p.y.tolist() == [0, 1, 1]


def test_wrapped_root_folder_and_junk_are_ignored() -> None:
    files = gray_folders("mydata/")
    files |= {
        "__MACOSX/mydata/dark/._a.png": b"resource fork",
        "mydata/.DS_Store": b"junk",
        "mydata/dark/.hidden.png": b"junk",
        "mydata/.git/config": b"junk",
    }
    p = parse_upload(zip_of(files), "d.zip")
    assert p.labels == ["dark", "light"] and len(p.y) == 3


def test_integer_labels_sort_numerically() -> None:
    files = {f"{k}/a.png": png(k) for k in (10, 2, 1)}
    p = parse_upload(zip_of(files), "d.zip")
    assert p.labels == ["1", "2", "10"]
    assert p.x[p.y == 2][0, 0, 0, 0] == 10


def test_format_by_content_not_filename() -> None:
    assert parse_upload(zip_of(gray_folders()), "data.npz").labels == ["dark", "light"]
    npz = npz_of(x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, 1]))
    assert parse_upload(npz, "images.zip").labels == ["0", "1"]


# -- .npz -------------------------------------------------------------------------------------


def test_npz_uint8_nhw() -> None:
    x = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    p = parse_upload(npz_of(x=x, y=np.array([0, 1, 2, 1])), "d.npz")
    assert p.x.shape == (4, 1, 5, 6) and np.array_equal(p.x[:, 0], x)
    assert p.labels == ["0", "1", "2"] and p.y.dtype == np.int64


def test_npz_float_nchw_is_rounded() -> None:
    x = np.full((2, 3, 4, 4), 0.5, np.float32)
    x[1] = 1.0
    p = parse_upload(npz_of(x=x, y=np.array([1, 0], np.int32)), "d.npz")
    assert p.x.shape == (2, 3, 4, 4) and p.x.dtype == np.uint8
    assert p.x[0, 0, 0, 0] == 128 and p.x[1, 2, 3, 3] == 255  # round(0.5 * 255) = 128


def test_npz_nhwc_with_labels() -> None:
    x = np.zeros((3, 4, 5, 3), np.uint8)
    x[..., 1] = 9
    labels = np.array(["cat", "dog", "eel"])
    p = parse_upload(npz_of(x=x, y=np.array([2, 0, 1]), labels=labels), "d.npz")
    assert p.x.shape == (3, 3, 4, 5) and (p.x[:, 1] == 9).all() and (p.x[:, 0] == 0).all()
    assert p.labels == ["cat", "dog", "eel"] and p.y.tolist() == [2, 0, 1]


# -- container refusals -----------------------------------------------------------------------


def test_empty_upload() -> None:
    assert refused(b"", BadRequest, "empty").status == 400


def test_not_a_zip() -> None:
    assert refused(b"plain text, not a zip", BadRequest, "neither a zip of image folders nor an .npz").status == 400


def test_corrupt_central_directory() -> None:
    data = zip_of(gray_folders()).replace(b"PK\x01\x02", b"PK\x01\x09", 1)
    assert refused(data, BadRequest, "corrupt zip").status == 400


def test_corrupt_member_data() -> None:
    data = bytearray(zip_of({"a/1.png": png(1), "b/1.png": png(2)}, zipfile.ZIP_STORED))
    at = data.index(b"IHDR") + 6  # inside the first PNG, past the local header
    data[at] ^= 0xFF
    assert refused(bytes(data), BadRequest, "'a/1.png' cannot be read").status == 400


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "..\\evil.png"])
def test_path_traversal(name: str) -> None:
    data = zip_of({"a/1.png": png(), name: png()})
    assert name in zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert refused(data, BadRequest, "unsafe path").status == 400


def test_too_big() -> None:
    data = zip_of(gray_folders())
    assert refused(data, PayloadTooLarge, "limit", Limits(max_bytes=len(data) - 1)).status == 413


def test_zip_bomb_declared_size() -> None:
    data = zip_of({"a/1.png": png(), "a/bomb.png": bytes(4 * 2**20), "b/1.png": png()})
    assert len(data) < 2**16
    assert refused(data, PayloadTooLarge, "uncompressed", Limits(max_bytes=2**20)).status == 413


def test_zip_lying_about_its_size_is_refused() -> None:
    """A central directory that under-declares a member: never read past it, refuse cleanly."""
    data = bytearray(zip_of({"a/1.png": png(), "b/1.png": bytes(100_000)}))
    cd = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 4)  # central entry of b/1.png
    data[cd + 24 : cd + 28] = (10).to_bytes(4, "little")  # uncompressed size: 10 bytes
    with pytest.raises(ZooError) as info:
        parse_upload(bytes(data), "d.zip", Limits(max_bytes=50_000))
    assert info.value.status in (400, 413) and "b/1.png" in info.value.detail


# -- image refusals ---------------------------------------------------------------------------


def test_undecodable_image_is_named() -> None:
    files = gray_folders() | {"light/broken.png": b"\x89PNG\r\n\x1a\n not really"}
    assert refused(zip_of(files), InvalidInput, "light/broken.png").status == 422
    files = gray_folders() | {"light/truncated.png": png(3)[:40]}
    refused(zip_of(files), InvalidInput, "light/truncated.png")
    files = gray_folders() | {"light/readme.txt": b"hello"}
    refused(zip_of(files), InvalidInput, "light/readme.txt is not a decodable image")


def test_eps_is_not_handed_to_ghostscript() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 6\nshowpage\n"
    refused(zip_of(gray_folders() | {"dark/x.eps": eps}), InvalidInput, "dark/x.eps")


def test_mismatched_image_sizes() -> None:
    files = gray_folders() | {"light/big.png": png(5, size=(9, 7))}
    e = refused(zip_of(files), InvalidInput, "light/big.png is 9x7")
    assert "8x6" in e.detail and e.status == 422


def test_image_side_limit_checked_from_header() -> None:
    files = {"a/1.png": png(size=(600, 4)), "b/1.png": png(size=(600, 4))}
    refused(zip_of(files), InvalidInput, "600x4")


def test_total_pixels_limit() -> None:
    e = refused(zip_of(gray_folders()), PayloadTooLarge, "pixels", Limits(max_pixels_total=100))
    assert e.status == 413


def test_files_outside_label_folders() -> None:
    refused(zip_of({"a.png": png(), "b/1.png": png()}), InvalidInput, "inside a label folder")
    refused(zip_of({"__MACOSX/x": b"", "a/.DS_Store": b""}), InvalidInput, "no image files")


def test_single_label_zip() -> None:
    files = {"cat/1.png": png(), "cat/2.png": png()}
    assert refused(zip_of(files), InvalidInput, "at least 2 labels").status == 422


def test_too_many_samples_and_labels_in_zip() -> None:
    assert refused(zip_of(gray_folders()), PayloadTooLarge, "3 images", Limits(max_samples=2)).status == 413
    files = {f"{k}/a.png": png() for k in range(4)}
    assert refused(zip_of(files), InvalidInput, "4 label folders", Limits(max_labels=3)).status == 422


# -- npz refusals -----------------------------------------------------------------------------

_X = np.zeros((4, 5, 5), np.uint8)
_Y = np.array([0, 1, 0, 1])


def test_npz_fewer_than_two_labels() -> None:
    refused(npz_of(x=_X, y=np.zeros(4, np.int64)), InvalidInput, "at least 2 labels")


def test_npz_label_without_samples() -> None:
    e = refused(npz_of(x=_X, y=_Y, labels=np.array(["a", "b", "c"])), InvalidInput, "without samples: ['c']")
    assert e.status == 422


def test_npz_mismatched_n() -> None:
    refused(npz_of(x=_X, y=np.array([0, 1, 0])), InvalidInput, "x has 4 samples but y has 3")


def test_npz_y_out_of_range() -> None:
    refused(npz_of(x=_X, y=np.array([0, 1, 2, 1]), labels=np.array(["a", "b"])), InvalidInput, "out of range")
    refused(npz_of(x=_X, y=np.array([0, 1, -1, 1])), InvalidInput, "negative")
    refused(npz_of(x=_X, y=np.array([0.0, 1, 0, 1])), InvalidInput, "integer")


def test_npz_huge_label_index_without_labels() -> None:
    refused(npz_of(x=_X, y=np.array([0, 1, 0, 10**12])), InvalidInput, "at most 1000 labels")


def test_npz_wrong_dimensions() -> None:
    refused(npz_of(x=np.zeros((4, 25), np.uint8), y=_Y), InvalidInput, "got shape [4, 25]")
    refused(npz_of(x=np.zeros((4, 2, 5, 5), np.uint8), y=_Y), InvalidInput, "C in 1 or 3")
    refused(npz_of(x=_X, y=_Y[:, None]), InvalidInput, "1-d integer")
    refused(npz_of(x=_X.astype(np.int32), y=_Y), InvalidInput, "dtype int32")


def test_npz_bad_floats() -> None:
    x = np.zeros((4, 5, 5), np.float32)
    x[1, 2, 3] = np.nan
    assert refused(npz_of(x=x, y=_Y), InvalidInput, "NaN").status == 422
    x[1, 2, 3] = 1.5
    refused(npz_of(x=x, y=_Y), InvalidInput, "within [0, 1]")


def test_npz_too_many_samples_and_labels() -> None:
    assert refused(npz_of(x=_X, y=_Y), PayloadTooLarge, "4 samples", Limits(max_samples=3)).status == 413
    labels = np.array(["a", "b", "c"])
    refused(npz_of(x=_X, y=np.array([0, 1, 2, 0]), labels=labels), InvalidInput, "3 labels", Limits(max_labels=2))


def test_npz_missing_y() -> None:
    refused(npz_of(x=_X), InvalidInput, "needs arrays 'x' and 'y'")


def test_npz_header_lying_about_shape() -> None:
    """A tiny .npy declaring a gigantic shape is refused from its header, before any allocation."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**12, 3, 3)})
    data = zip_of({"x.npy": buf.getvalue() + bytes(64), "y.npy": _npy(_Y)})
    refused(data, BadRequest, "x.npy declares shape")


def _npy(a: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


# -- pickle -----------------------------------------------------------------------------------

UNPICKLED: list[str] = []


def _record(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Trap:
    def __reduce__(self):  # unpickling this calls _record
        return (_record, ("unpickled!",))


@pytest.mark.parametrize("member", ["x", "y", "labels"])
def test_object_array_refused_without_unpickling(member: str, monkeypatch: pytest.MonkeyPatch) -> None:
    trap = np.empty(4, dtype=object)
    trap[:] = [_Trap() for _ in range(4)]
    arrays = {"x": _npy(_X), "y": _npy(_Y), "labels": _npy(np.array(["a", "b"]))}
    arrays[member] = _npy(trap, allow_pickle=True)
    data = zip_of({f"{k}.npy": v for k, v in arrays.items()})

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("pickle was used")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    UNPICKLED.clear()
    e = refused(data, InvalidInput, "object array")
    assert e.status == 422 and f"{member}.npy" in e.detail and "pickle" in e.detail
    assert UNPICKLED == []


def test_trap_really_would_fire() -> None:
    """Sanity check of the trap itself: a pickle-allowing load does run it."""
    trap = np.empty(1, dtype=object)
    trap[0] = _Trap()
    UNPICKLED.clear()
    np.load(io.BytesIO(_npy(trap, allow_pickle=True)), allow_pickle=True)
    assert UNPICKLED == ["unpickled!"]
