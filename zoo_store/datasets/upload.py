"""Validating user uploads (an ImageFolder zip or an .npz) into arrays; never unpickles anything.

`parse_upload` is pure: it reads only the bytes it is given and writes nothing. Every refusal is a
`ZooError` with a message naming the problem: 400 for a malformed upload (not a zip, corrupt zip,
unsafe member path), 413 for anything too large (including zip bombs), 422 for well-formed content
that is wrong (undecodable image, mismatched sizes, bad arrays, too few labels...).
"""

from __future__ import annotations

import io
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from zoo_store.core.errors import BadRequest, InvalidInput, PayloadTooLarge

#: Pillow formats accepted in an ImageFolder zip (no EPS/PDF/etc: nothing that shells out to a decoder).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
#: Members of an ImageFolder zip that are not data (besides hidden files and folders).
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"})
_INT = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 * 2**20  # whole upload, and everything it unpacks to
    max_samples: int = 100_000
    max_side: int = 512  # images larger than this on either side are refused
    max_pixels_total: int = 2**28  # across all images
    max_labels: int = 1000


@dataclass(frozen=True)
class ParsedDataset:
    x: np.ndarray  # (N, C, H, W) uint8, C in {1, 3}
    y: np.ndarray  # (N,) int64, values in [0, len(labels))
    labels: list[str]


def parse_upload(data: bytes, filename: str = "", limits: Limits = Limits()) -> ParsedDataset:
    """Parse an ImageFolder zip or an .npz (told apart by content) into a validated dataset."""
    if not data:
        raise BadRequest("upload is empty")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"upload is {len(data)} bytes; the limit is {limits.max_bytes}")
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise BadRequest(f"upload {filename!r} is neither a zip of image folders nor an .npz")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise BadRequest(f"upload {filename!r} is a corrupt zip: {e}") from e
    with zf:
        _check_members(zf, limits)
        parsed = _parse_npz(zf, data, limits) if _is_npz(zf) else _parse_folders(zf, limits)
    _check_result(parsed, limits)
    return parsed


# -- the zip container ------------------------------------------------------------------------
def _check_members(zf: zipfile.ZipFile, limits: Limits) -> None:
    """Refuse unsafe or duplicate member names, and zips that declare more than the byte budget."""
    infos = zf.infolist()
    if len(infos) > limits.max_samples + 1000:
        raise PayloadTooLarge(f"zip has {len(infos)} members; the limit is {limits.max_samples} samples")
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts or ":" in name or "\x00" in name:
            raise BadRequest(f"zip member {name!r} has an unsafe path (absolute or with '..')")
        if name in seen:
            raise BadRequest(f"zip member {name!r} appears twice")
        seen.add(name)
        total += info.file_size
    if total > limits.max_bytes:
        raise PayloadTooLarge(f"zip declares {total} bytes uncompressed; the limit is {limits.max_bytes}")


class _Budget:
    """Counts the bytes really decompressed, across members (declared sizes can lie)."""

    def __init__(self, limit: int) -> None:
        self.limit = self.left = limit

    def read(self, zf: zipfile.ZipFile, name: str) -> bytes:
        try:
            with zf.open(name) as f:
                out = f.read(self.left + 1)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, ValueError) as e:
            raise BadRequest(f"zip member {name!r} cannot be read (corrupt, encrypted or unsupported): {e}") from e
        self.left -= len(out)
        if self.left < 0:
            raise PayloadTooLarge(f"zip unpacks past the limit of {self.limit} bytes at member {name!r}")
        return out


def _is_npz(zf: zipfile.ZipFile) -> bool:
    return any(n.endswith(".npy") and "/" not in n for n in zf.namelist())


# -- .npz -------------------------------------------------------------------------------------
def _parse_npz(zf: zipfile.ZipFile, data: bytes, limits: Limits) -> ParsedDataset:
    names = {n.removesuffix(".npy") for n in zf.namelist() if n.endswith(".npy")}
    if not {"x", "y"} <= names:
        raise InvalidInput(f".npz needs arrays 'x' and 'y' (optional 'labels'); found {sorted(names)}")
    for key in ("x", "y", "labels"):
        if key in names:
            _check_npy_header(zf, f"{key}.npy")
    x, y, labels_arr = _load_npz(data)
    x = _images(x, limits)
    y = _targets(y, len(x))
    labels = _npz_labels(labels_arr, y, limits)
    return ParsedDataset(x, y.astype(np.int64), labels)


def _check_npy_header(zf: zipfile.ZipFile, name: str) -> None:
    """Read only the .npy header: refuse object arrays (pickles) and shapes the member cannot hold."""
    info = zf.getinfo(name)
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise InvalidInput(f"{name} uses .npy format version {version}; save it with np.savez")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as e:
        raise BadRequest(f"{name} in the .npz is not a readable .npy array: {e}") from e
    if dtype.hasobject:
        raise InvalidInput(
            f"{name} holds a Python object array (dtype {dtype}); pickled data is never loaded, "
            "save plain numeric or string arrays"
        )
    declared = math.prod(int(s) for s in shape) * dtype.itemsize
    if declared > info.file_size:
        raise BadRequest(f"{name} declares shape {list(shape)} ({declared} bytes) but holds {info.file_size}")


def _load_npz(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return z["x"], z["y"], (z["labels"] if "labels" in z.files else None)
    except ValueError as e:  # object arrays land here too, should the header check ever miss one
        raise InvalidInput(f".npz holds object arrays or malformed arrays (pickle is never loaded): {e}") from e
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError) as e:
        raise BadRequest(f".npz cannot be read: {e}") from e


def _images(x: np.ndarray, limits: Limits) -> np.ndarray:
    """Accept (N,H,W), (N,H,W,C) or (N,C,H,W), uint8 or float in [0,1]; return uint8 (N,C,H,W)."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or min(x.shape[2:]) < 1:
        raise InvalidInput(
            f"x must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1 or 3, got shape {list(x.shape)}"
        )
    _check_sizes(len(x), x.shape[2], x.shape[3], limits)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise InvalidInput("x must be finite; it holds NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise InvalidInput(f"float x must lie within [0, 1], found values in [{lo:g}, {hi:g}]")
        return np.ascontiguousarray(np.rint(x.astype(np.float64) * 255).astype(np.uint8))
    raise InvalidInput(f"x must be uint8, or float within [0, 1]; got dtype {x.dtype}")


def _check_sizes(n: int, h: int, w: int, limits: Limits) -> None:
    if n > limits.max_samples:
        raise PayloadTooLarge(f"{n} samples; the limit is {limits.max_samples}")
    if max(h, w) > limits.max_side:
        raise InvalidInput(f"images are {w}x{h} (WxH); at most {limits.max_side} pixels a side are accepted")
    if n * h * w > limits.max_pixels_total:
        raise PayloadTooLarge(f"images hold {n * h * w} pixels in all; the limit is {limits.max_pixels_total}")


def _targets(y: np.ndarray, n: int) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise InvalidInput(f"y must be a 1-d integer array, got shape {list(y.shape)} dtype {y.dtype}")
    if len(y) != n:
        raise InvalidInput(f"x has {n} samples but y has {len(y)}")
    if n == 0:
        raise InvalidInput("the dataset has no samples")
    if y.dtype.kind == "i" and int(y.min()) < 0:
        raise InvalidInput(f"y holds a negative label index {int(y.min())}")
    return y


def _npz_labels(labels_arr: np.ndarray | None, y: np.ndarray, limits: Limits) -> list[str]:
    top = int(y.max())
    if labels_arr is None:
        if top + 1 > limits.max_labels:
            raise InvalidInput(f"y uses label index {top}; at most {limits.max_labels} labels are accepted")
        return [str(i) for i in range(top + 1)]
    if labels_arr.ndim != 1 or labels_arr.dtype.kind not in "US":
        raise InvalidInput(
            f"labels must be a 1-d array of strings, got shape {list(labels_arr.shape)} dtype {labels_arr.dtype}"
        )
    if len(labels_arr) > limits.max_labels:
        raise InvalidInput(f"{len(labels_arr)} labels; at most {limits.max_labels} are accepted")
    labels = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in labels_arr.tolist()]
    if top >= len(labels):
        raise InvalidInput(f"y is out of range: it uses label index {top} but only {len(labels)} labels are named")
    return labels


# -- ImageFolder zip --------------------------------------------------------------------------
def _parse_folders(zf: zipfile.ZipFile, limits: Limits) -> ParsedDataset:
    members = _image_members(zf)
    if len(members) > limits.max_samples:
        raise PayloadTooLarge(f"zip holds {len(members)} images; the limit is {limits.max_samples}")
    labels = _sorted_labels({label for label, _ in members})
    if len(labels) > limits.max_labels:
        raise InvalidInput(f"{len(labels)} label folders; at most {limits.max_labels} are accepted")
    index = {label: i for i, label in enumerate(labels)}
    images = _decode_all(zf, [name for _, name in members], limits)
    x = _stack(images)
    y = np.array([index[label] for label, _ in members], dtype=np.int64)
    return ParsedDataset(x, y, labels)


def _ignored(name: str) -> bool:
    return any(p.startswith(".") or p in IGNORED_NAMES for p in PurePosixPath(name).parts)


def _image_members(zf: zipfile.ZipFile) -> list[tuple[str, str]]:
    """(label, member name) for every data file, any single wrapping root folder stripped."""
    files = [i.filename for i in zf.infolist() if not i.is_dir() and not _ignored(i.filename)]
    if not files:
        raise InvalidInput("the zip holds no image files; expected label_name/image files")
    parts = [PurePosixPath(f).parts for f in files]
    while len({p[0] for p in parts}) == 1 and all(len(p) >= 2 for p in parts) and any(len(p) > 2 for p in parts):
        parts = [p[1:] for p in parts]
    loose = [f for f, p in zip(files, parts, strict=True) if len(p) < 2]
    if loose:
        raise InvalidInput(f"files must sit inside a label folder (label_name/image.png); {loose[:3]} do not")
    return sorted((p[0], f) for f, p in zip(files, parts, strict=True))


def _sorted_labels(names: set[str]) -> list[str]:
    if all(_INT.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _decode_all(zf: zipfile.ZipFile, names: list[str], limits: Limits) -> list[tuple[str, Image.Image]]:
    budget = _Budget(limits.max_bytes)
    out: list[tuple[str, Image.Image]] = []
    pixels = 0
    for name in names:
        img = _open_image(budget.read(zf, name), name, limits)
        pixels += img.size[0] * img.size[1]
        if pixels > limits.max_pixels_total:
            raise PayloadTooLarge(f"images hold more than {limits.max_pixels_total} pixels in all")
        out.append((name, _load_image(img, name)))
    return out


def _open_image(raw: bytes, name: str, limits: Limits) -> Image.Image:
    """Open (header only) and check the size before any pixel is decoded."""
    try:
        img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise InvalidInput(f"{name} is not a decodable image ({', '.join(IMAGE_FORMATS)}): {e}") from e
    w, h = img.size
    if max(w, h) > limits.max_side or min(w, h) < 1:
        raise InvalidInput(f"{name} is {w}x{h}; images may be at most {limits.max_side} pixels a side")
    return img


def _load_image(img: Image.Image, name: str) -> Image.Image:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InvalidInput(f"{name} is not a decodable image: {e}") from e
    return img


def _stack(images: list[tuple[str, Image.Image]]) -> np.ndarray:
    """One (N, C, H, W) uint8 array: "L" if every image is grayscale, else "RGB" for all."""
    first, ref = images[0]
    colour = any(img.mode not in GRAY_MODES for _, img in images)
    arrays = []
    for name, img in images:
        if img.size != ref.size:
            raise InvalidInput(
                f"{name} is {img.size[0]}x{img.size[1]} but {first} is {ref.size[0]}x{ref.size[1]}; "
                "all images must be one size"
            )
        a = np.asarray(img.convert("RGB" if colour else "L"), dtype=np.uint8)
        arrays.append(a.transpose(2, 0, 1) if colour else a[None])
    return np.ascontiguousarray(np.stack(arrays))


# -- whole dataset ----------------------------------------------------------------------------
def _check_result(p: ParsedDataset, limits: Limits) -> None:
    if len(p.y) > limits.max_samples:
        raise PayloadTooLarge(f"{len(p.y)} samples; the limit is {limits.max_samples}")
    if len(p.labels) > limits.max_labels:
        raise InvalidInput(f"{len(p.labels)} labels; at most {limits.max_labels} are accepted")
    if len(p.labels) < 2:
        raise InvalidInput(f"a dataset needs at least 2 labels, got {len(p.labels)}: {p.labels}")
    if any(not label for label in p.labels):
        raise InvalidInput("label names must not be empty")
    if len(set(p.labels)) != len(p.labels):
        dup = sorted({label for label in p.labels if p.labels.count(label) > 1})
        raise InvalidInput(f"label names repeat: {dup}")
    counts = np.bincount(p.y, minlength=len(p.labels))
    empty = [p.labels[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise InvalidInput(f"labels without samples: {empty}")
