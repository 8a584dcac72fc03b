"""Decoding predict inputs (nested-list tensors, ``.npy`` bodies, base64 or uploaded images) to
(N, C, H, W) float32 arrays in [0, 1], with numpy and Pillow only: the HTTP workers of `zoo serve`
decode with this, without torch; the inference process turns the arrays into tensors."""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.requests import Request

from service.api.bodies import PredictRequest
from zoo_store.core.cards import InputSpec
from zoo_store.core.errors import InvalidInput, PayloadTooLarge
from zoo_store.core.images import image_to_input
from zoo_store.core.settings import Settings


def tensor_input(values: list, spec: InputSpec, i: int) -> np.ndarray:
    try:
        t = np.asarray(values, dtype=np.float32)  # one C loop over the nested lists
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"inputs[{i}].tensor is not a rectangular array of numbers: {e}") from e
    want = (spec.channels, spec.size, spec.size)
    if tuple(t.shape) != want:
        raise InvalidInput(f"inputs[{i}].tensor has shape {list(t.shape)}, expected {list(want)} (C x H x W)")
    if not np.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise InvalidInput(f"inputs[{i}].tensor values must be finite and in [0, 1]")
    return t  # (C, H, W)


def image_bytes_input(data: bytes, spec: InputSpec, settings: Settings, name: str) -> np.ndarray:
    if len(data) > settings.max_image_bytes:
        raise PayloadTooLarge(f"{name} is {len(data)} bytes; the limit is {settings.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if max(img.size) > settings.max_image_side:
                raise PayloadTooLarge(
                    f"{name} is {img.size[0]}x{img.size[1]}; the limit is {settings.max_image_side} a side"
                )
            if img.format not in ("PNG", "JPEG"):
                raise InvalidInput(f"{name} is {img.format}; send PNG or JPEG")
            img.load()
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as e:
        raise InvalidInput(f"{name} is not a decodable PNG or JPEG image: {e}") from e
    try:
        return image_to_input(img, spec)  # (C, S, S): the shorter side resized, the centre cropped
    except InvalidInput as e:
        raise InvalidInput(f"{name}: {e.detail}") from e


def image_input(b64: str, spec: InputSpec, settings: Settings, i: int) -> np.ndarray:
    if len(b64) > math.ceil(settings.max_image_bytes * 4 / 3) + 4:
        raise PayloadTooLarge(f"inputs[{i}].image is larger than {settings.max_image_bytes} bytes")
    if b64.startswith("data:"):
        b64 = b64.partition(",")[2]
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"inputs[{i}].image is not valid base64: {e}") from e
    return image_bytes_input(data, spec, settings, f"inputs[{i}].image")


NPY_MAGIC = b"\x93NUMPY"


def npy_input(data: bytes, spec: InputSpec, settings: Settings) -> np.ndarray:
    """One ``.npy`` array N x C x H x W, float32 in [0, 1] or uint8 in [0, 255] -> (N, C, H, W) float32.
    Read with ``allow_pickle=False``; anything but a plain numeric array is refused."""
    return npy_values(npy_array(data), spec, settings)


def npy_array(data: bytes) -> np.ndarray:
    """The array of a ``.npy`` body, read without pickle (nothing checked against a path yet)."""
    if not data.startswith(NPY_MAGIC):
        raise InvalidInput(
            "application/octet-stream predict body must be one .npy array (it starts with "
            f"{NPY_MAGIC!r}); got {data[:8]!r}"
        )
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InvalidInput(f"the .npy body cannot be read: {e}") from e


def npy_values(arr: np.ndarray, spec: InputSpec | None, settings: Settings) -> np.ndarray:
    """A ``.npy`` body's array, (N, C, H, W), as float32 in [0, 1]. With ``spec`` None the C, H and W
    are left to whoever knows the path (``check_npy_shape``): only the batch axis is checked here."""
    if spec is not None:
        check_npy_shape(arr.shape, spec)
    if not 1 <= len(arr) <= settings.max_predict_inputs:
        raise InvalidInput(f"the .npy array holds {len(arr)} inputs; send 1 to {settings.max_predict_inputs}")
    if arr.size == 0:
        raise InvalidInput(f"the .npy array has shape {list(arr.shape)}: it holds no values")
    kind = (arr.dtype.kind, arr.dtype.itemsize)
    if kind == ("u", 1):
        return arr.astype(np.float32) / 255.0  # (N, C, H, W)
    if kind != ("f", 4):
        raise InvalidInput(f"the .npy array is {arr.dtype}; send float32 in [0, 1] or uint8 in [0, 255]")
    t = arr.astype(np.float32, copy=False)  # native byte order
    if not np.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise InvalidInput("the .npy float32 values must be finite and in [0, 1]")
    return t  # (N, C, H, W)


def check_npy_shape(shape: tuple[int, ...], spec: InputSpec) -> None:
    want = (spec.channels, spec.size, spec.size)
    if len(shape) != 4 or tuple(shape[1:]) != want:
        raise InvalidInput(f"the .npy array has shape {list(shape)}, expected [N, {', '.join(map(str, want))}]")


async def read_inputs(request: Request, spec: InputSpec, settings: Settings) -> tuple[np.ndarray, int]:
    """A predict body, whatever its content type, as (N, C, H, W) in [0, 1] and top_k."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/octet-stream"):
        top_k = query_top_k(request)
        return npy_input(await request.body(), spec, settings), top_k
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise InvalidInput("multipart predict needs at least one image file")
        top_k = _int_field(form.get("top_k"), 1)
        xs = [
            image_bytes_input(await f.read(settings.max_image_bytes + 1), spec, settings, f"file {f.filename!r}")
            for f in files
        ]
    else:
        try:
            req = PredictRequest.model_validate_json(await request.body())
        except ValueError as e:
            raise InvalidInput(f"predict body: {_short(e)}") from e
        top_k = req.top_k
        xs = [
            tensor_input(item.tensor, spec, i)
            if item.tensor is not None
            else image_input(item.image or "", spec, settings, i)
            for i, item in enumerate(req.inputs)
        ]
    if len(xs) > settings.max_predict_inputs:
        raise PayloadTooLarge(f"{len(xs)} inputs in one request; the limit is {settings.max_predict_inputs}")
    return np.stack(xs), top_k  # (N, C, H, W)


def query_top_k(request: Request) -> int:
    """A binary predict's ``top_k``, from its query string (1 when absent)."""
    return _int_field(request.query_params.get("top_k"), 1)


def _int_field(value: object, default: int) -> int:
    if value is None:
        return default
    try:
        v = int(str(value))
    except ValueError as e:
        raise InvalidInput(f"top_k must be an integer, got {value!r}") from e
    if v < 1:
        raise InvalidInput("top_k must be at least 1")
    return v


def _short(e: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:3])
    return str(e)
