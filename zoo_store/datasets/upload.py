"""Validating user uploads (an ImageFolder zip or an .npz) into arrays; never unpickles anything."""

from __future__ import annotations

import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from zoo_store.errors import BadRequest, InvalidInput, PayloadTooLarge


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 * 2**20  # whole upload, and everything it unpacks to
    max_samples: int = 100_000
    max_side: int = 512
    max_pixels_total: int = 2**28
    max_labels: int = 1000


@dataclass(frozen=True)
class ParsedDataset:
    x: np.ndarray  # (N, C, H, W) uint8, C in {1, 3}
    y: np.ndarray  # (N,) int64 in [0, len(labels))
    labels: list[str]


def parse_upload(data: bytes, filename: str = "", limits: Limits = Limits()) -> ParsedDataset:
    if not data:
        raise BadRequest("upload is empty")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"upload is {len(data)} bytes; the limit is {limits.max_bytes}")
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise BadRequest(f"upload {filename!r} is neither a zip of image folders nor an .npz")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise BadRequest(f"upload {filename!r} is a corrupt zip: {e}") from e
    with zf:
        _check_members(zf, limits)
        parsed = _parse_npz(data, limits) if {"x.npy", "y.npy"} <= set(names) else _parse_folders(zf, limits)
    _check_result(parsed, limits)
    return parsed


def _check_members(zf: zipfile.ZipFile, limits: Limits) -> None:
    total = 0
    for info in zf.infolist():
        p = PurePosixPath(info.filename)
        if info.filename.startswith(("/", "\\")) or ".." in p.parts or ":" in info.filename:
            raise BadRequest(f"zip member {info.filename!r} has an unsafe path")
        total += info.file_size
    if total > limits.max_bytes:
        raise PayloadTooLarge(f"zip unpacks to {total} bytes; the limit is {limits.max_bytes}")


def _read(zf: zipfile.ZipFile, name: str, limits: Limits) -> bytes:
    """Read one member, counting real bytes (declared sizes can lie)."""
    with zf.open(name) as f:
        out = f.read(limits.max_bytes + 1)
    if len(out) > limits.max_bytes:
        raise PayloadTooLarge(f"zip member {name!r} unpacks past the limit of {limits.max_bytes} bytes")
    return out


# -- .npz -------------------------------------------------------------------------------------
def _parse_npz(data: bytes, limits: Limits) -> ParsedDataset:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            x, y = z["x"], z["y"]
            labels_arr = z["labels"] if "labels" in z.files else None
    except ValueError as e:
        raise InvalidInput(f".npz holds object arrays or is malformed (pickled data is never loaded): {e}") from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise BadRequest(f".npz cannot be read: {e}") from e
    x = _images(x)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InvalidInput(f"y must be a 1-d integer array, got shape {list(y.shape)} dtype {y.dtype}")
    if len(y) != len(x):
        raise InvalidInput(f"x has {len(x)} samples but y has {len(y)}")
    if len(y) == 0:
        raise InvalidInput("the dataset has no samples")
    if y.min() < 0:
        raise InvalidInput(f"y has negative label index {int(y.min())}")
    n_labels = int(y.max()) + 1
    if labels_arr is None:
        labels = [str(i) for i in range(n_labels)]
    else:
        if labels_arr.ndim != 1 or labels_arr.dtype.kind not in "UO":
            raise InvalidInput(f"labels must be a 1-d array of strings, got dtype {labels_arr.dtype}")
        labels = [str(v) for v in labels_arr]
        if len(labels) < n_labels:
            raise InvalidInput(f"y uses label index {n_labels - 1} but only {len(labels)} labels are named")
    return ParsedDataset(x, y.astype(np.int64), labels)


def _images(x: np.ndarray) -> np.ndarray:
    """Accept (N,H,W), (N,H,W,C) or (N,C,H,W), uint8 or float in [0,1]; return uint8 (N,C,H,W)."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise InvalidInput(f"x must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1 or 3, got {list(x.shape)}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise InvalidInput("float x must be finite and within [0, 1]")
        return np.ascontiguousarray(np.rint(x * 255).astype(np.uint8))
    raise InvalidInput(f"x must be uint8 or float in [0, 1], got {x.dtype}")


# -- ImageFolder zip --------------------------------------------------------------------------
IGNORED = ("__MACOSX",)


def _image_members(zf: zipfile.ZipFile) -> list[tuple[str, str]]:
    """(label, member name) for every file, the common wrapping folder stripped."""
    files = [
        i.filename for i in zf.infolist()
        if not i.is_dir() and not any(part.startswith(".") or part in IGNORED for part in PurePosixPath(i.filename).parts)
    ]  # fmt: skip
    parts = [PurePosixPath(f).parts for f in files]
    while parts and all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    bad = [f for f, p in zip(files, parts, strict=True) if len(p) < 2]
    if bad or not files:
        raise InvalidInput(f"an image-folder zip needs label_name/image files; found {bad[:3] or 'no files'}")
    return [(p[0], f) for f, p in zip(files, parts, strict=True)]


def _decode(raw: bytes, name: str, limits: Limits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            if max(img.size) > limits.max_side:
                raise InvalidInput(f"{name} is {img.size[0]}x{img.size[1]}; images may be at most {limits.max_side} a side")
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:  # fmt: skip
        raise InvalidInput(f"{name} is not a decodable image: {e}") from e
    return img


def _parse_folders(zf: zipfile.ZipFile, limits: Limits) -> ParsedDataset:
    members = _image_members(zf)
    if len(members) > limits.max_samples:
        raise PayloadTooLarge(f"{len(members)} images; the limit is {limits.max_samples}")
    names = sorted({lab for lab, _ in members})
    labels = sorted(names, key=int) if all(n.lstrip("-").isdigit() for n in names) else names
    images, ys, pixels = [], [], 0
    for label, name in members:
        img = _decode(_read(zf, name, limits), name, limits)
        pixels += img.size[0] * img.size[1]
        if pixels > limits.max_pixels_total:
            raise PayloadTooLarge(f"images hold more than {limits.max_pixels_total} pixels in all")
        images.append((name, img))
        ys.append(labels.index(label))
    colour = any(img.mode not in ("1", "L", "LA", "I", "I;16", "F") for _, img in images)
    size = images[0][1].size
    arrays = []
    for name, img in images:
        if img.size != size:
            raise InvalidInput(f"{name} is {img.size[0]}x{img.size[1]} but {images[0][0]} is {size[0]}x{size[1]}; all images need one size")
        a = np.asarray(img.convert("RGB" if colour else "L"), dtype=np.uint8)
        arrays.append(a.transpose(2, 0, 1) if colour else a[None])  # (C, H, W)
    return ParsedDataset(np.stack(arrays), np.array(ys, dtype=np.int64), labels)


def _check_result(p: ParsedDataset, limits: Limits) -> None:
    if len(p.y) > limits.max_samples:
        raise PayloadTooLarge(f"{len(p.y)} samples; the limit is {limits.max_samples}")
    if len(p.labels) > limits.max_labels:
        raise InvalidInput(f"{len(p.labels)} labels; the limit is {limits.max_labels}")
    if len(p.labels) < 2:
        raise InvalidInput(f"a dataset needs at least 2 labels, got {p.labels}")
    if len(set(p.labels)) != len(p.labels):
        raise InvalidInput(f"labels repeat: {p.labels}")
    counts = np.bincount(p.y, minlength=len(p.labels))
    empty = [p.labels[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise InvalidInput(f"labels without samples: {empty}")
    if max(p.x.shape[2:]) > limits.max_side:
        raise InvalidInput(f"images are {p.x.shape[3]}x{p.x.shape[2]}; at most {limits.max_side} a side")
