"""The Open Inference Protocol (KServe v2, as Triton speaks it) over REST, for one path: request
and response bodies, JSON tensors and the binary tensor data extension.

A path is a model named by its id with one input, ``input`` (N x C x H x W, FP32 in [0, 1] or UINT8
in [0, 255]), and two outputs: ``probabilities`` (N x K, FP32) and ``label`` (N, BYTES: the top
label). A binary body is the JSON header (``Inference-Header-Content-Length`` bytes) followed by
the raw bytes of each tensor that declares ``binary_data_size``, in order; BYTES elements are each a
4-byte little-endian length and the UTF-8 bytes. numpy only: the HTTP workers of `zoo serve` decode
and answer infer requests with this, without torch."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from zoo_store.core.cards import InputSpec
from zoo_store.core.errors import BadRequest, InvalidInput, PayloadTooLarge

HEADER = "Inference-Header-Content-Length"
INPUT, PROBS, LABEL = "input", "probabilities", "label"
DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}


@dataclass
class InferRequest:
    id: str | None
    x: np.ndarray  # (N, C, H, W) float32 in [0, 1]
    outputs: dict[str, bool]  # output name -> in binary


def model_metadata(model_id: str, spec: InputSpec, labels: tuple[str, ...], platform: str) -> dict[str, Any]:
    """A path's or a base's metadata (``platform``: ``zoo_<method>``, or ``zoo_base``)."""
    c, s = spec.channels, spec.size
    return {
        "name": model_id,
        "versions": ["1"],
        "platform": platform,
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, c, s, s]}],
        "outputs": [
            {"name": PROBS, "datatype": "FP32", "shape": [-1, len(labels)]},
            {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
        ],
    }


def parse_infer(body: bytes, header_length: str | None, spec: InputSpec | None, max_inputs: int) -> InferRequest:
    """An infer request (JSON, or JSON and binary tensors) as the path's input in [0, 1]. With
    ``spec`` None the input's C, H and W are left to whoever knows the path (``check_input_shape``)."""
    split = _header_length(header_length, len(body))
    try:
        req = orjson.loads(body[:split])
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"the inference request header is not JSON: {e}") from e
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise InvalidInput('an inference request is a JSON object with "inputs": [...]')
    if len(req["inputs"]) != 1 or not isinstance(req["inputs"][0], dict) or req["inputs"][0].get("name") != INPUT:
        names = [i.get("name") for i in req["inputs"] if isinstance(i, dict)]
        raise InvalidInput(f'a model takes one input named "{INPUT}"; got {names}')
    tail = memoryview(body)[split:]
    x = _input_tensor(req["inputs"][0], tail, spec, max_inputs)
    binary = bool(_params(req, "the request").get("binary_data_output", False))  # each output's default
    wanted = req.get("outputs")
    if wanted is None or wanted == []:  # every output
        outputs = {PROBS: binary, LABEL: binary}
    else:
        outputs = {}
        for o in wanted if isinstance(wanted, list) else [None]:
            if not isinstance(o, dict) or o.get("name") not in (PROBS, LABEL):
                raise InvalidInput(f'requested outputs are "{PROBS}" and "{LABEL}"; got {o!r}')
            outputs[o["name"]] = bool(_params(o, f"output {o['name']!r}").get("binary_data", binary))
    rid = req.get("id")
    return InferRequest(str(rid) if rid is not None else None, x, outputs)


def _params(obj: dict, what: str) -> dict:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(f'"parameters" of {what} must be a JSON object, got {params!r}')
    return params


def _header_length(value: str | None, total: int) -> int:
    if value is None:
        return total
    if not (value.isascii() and value.isdigit()) or int(value) > total:
        raise BadRequest(f"{HEADER} is {value!r}; it must be a byte count within the body's {total} bytes")
    return int(value)


def check_input_shape(shape: object, spec: InputSpec | None) -> None:
    """The input's shape: N x C x H x W, whole numbers, C, H and W the path's (``spec`` None: what
    any path's could be, 1 to 1024)."""
    want = (spec.channels, spec.size, spec.size) if spec is not None else None
    fits = isinstance(shape, list) and len(shape) == 4 and all(type(d) is int for d in shape)
    if fits and want is not None:
        fits = tuple(shape[1:]) == want
    elif fits:
        fits = all(1 <= d <= 1024 for d in shape[1:])  # type: ignore[index]
    if not fits:
        takes = ", ".join(map(str, want)) if want is not None else "C, H, W"
        raise InvalidInput(f"input shape {shape!r}; this model takes [N, {takes}]")


def _input_tensor(tensor: dict, binary: memoryview, spec: InputSpec | None, max_inputs: int) -> np.ndarray:
    name = tensor.get("datatype")
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise InvalidInput(f"input datatype {tensor.get('datatype')!r}; send one of {sorted(DTYPES)}")
    shape = tensor.get("shape")
    check_input_shape(shape, spec)
    if not 1 <= shape[0] <= max_inputs:
        raise PayloadTooLarge(f"{shape[0]} inputs in one request; send 1 to {max_inputs}")
    count = int(np.prod(shape))
    size = _params(tensor, "the input").get("binary_data_size")
    if size is None and len(binary):
        raise InvalidInput(f"{len(binary)} bytes follow the header but the input declares no binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize or len(binary) != size:
            raise InvalidInput(
                f"binary_data_size is {size} and {len(binary)} bytes follow the header; "
                f"shape {shape} of {tensor['datatype']} needs {count * dtype.itemsize}"
            )
        arr = np.frombuffer(binary, dtype=dtype)
    else:
        data = tensor.get("data")
        try:
            raw = np.asarray(data)
        except (TypeError, ValueError, OverflowError) as e:  # ragged nesting, integers past 64 bits
            raise InvalidInput(f"input data is not an array of {name} numbers: {e}") from e
        if raw.dtype.kind not in "iuf":  # strings, booleans, null, objects
            raise InvalidInput(f"input data is not an array of {name} numbers (it holds {raw.dtype.name} values)")
        values = raw.astype(np.float64).reshape(-1)
        if values.size != count:
            raise InvalidInput(f"input data holds {values.size} values; shape {shape} needs {count}")
        if dtype == DTYPES["UINT8"] and not (
            np.all(values == np.round(values)) and np.all((values >= 0) & (values <= 255))
        ):
            raise InvalidInput("UINT8 input values must be integers in [0, 255]")
        arr = values.astype(dtype)
    t = arr.astype(np.float32).reshape(shape)  # (N, C, H, W)
    if dtype == DTYPES["UINT8"]:
        return t / 255.0
    if not np.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise InvalidInput("FP32 input values must be finite and in [0, 1]")
    return t


def infer_response(path_id: str, labels: tuple[str, ...], probs: np.ndarray, req: InferRequest) -> tuple[bytes, dict]:
    """The response body and its headers: JSON, or a JSON header and binary tensors."""
    probs = probs[:, : len(labels)].astype(np.float32, copy=False)  # (N, K)
    top = [labels[i] for i in probs.argmax(1).tolist()]
    outputs, tail = [], []
    for name, binary in req.outputs.items():
        if name == PROBS:
            out = {"name": PROBS, "datatype": "FP32", "shape": list(probs.shape)}
            raw = probs.astype("<f4").tobytes() if binary else None
            data: list = probs.reshape(-1).tolist()
        else:
            out = {"name": LABEL, "datatype": "BYTES", "shape": [len(top)]}
            raw = b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in top)) if binary else None
            data = top
        if raw is None:
            out["data"] = data
        else:
            out["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        outputs.append(out)
    body = {"model_name": path_id, "model_version": "1", "outputs": outputs}
    if req.id is not None:
        body["id"] = req.id
    head = orjson.dumps(body)
    if not tail:
        return head, {"content-type": "application/json"}
    return head + b"".join(tail), {"content-type": "application/octet-stream", HEADER: str(len(head))}
