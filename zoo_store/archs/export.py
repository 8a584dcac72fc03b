"""A path's network as one standalone file, for runtimes that know nothing of this project: ONNX
(opset 18, for ONNX Runtime, TensorRT, Triton...) or a ``torch.export`` program (``.pt2``, loaded with
``torch.export.load`` alone). The file computes what the path's ``/v1`` predict answers: it takes the
Open Inference Protocol's ``input`` (N x C x H x W, float in [0, 1]), normalizes it with the card's
mean and std, runs the materialized network and returns ``probabilities`` (N x K, softmax). The batch
axis is dynamic. The labels, the input spec and the path id ride in the file's metadata (ONNX
``metadata_props``; the ``.pt2`` archive's ``extra/zoo.json``).

What is exported is the module the service serves, as it is: a clone's or a reassembly's parts and
stitches, a reprogram path's depthwise kernels (not folded into the convolutions before them), a
resample path's smaller dense network.
"""

from __future__ import annotations

import io
import json
import re
from typing import Literal

import torch
from torch import Tensor, nn

from zoo_store.core.cards import InputSpec
from zoo_store.core.errors import InvalidInput

Format = Literal["onnx", "pt2"]
FORMATS: tuple[Format, ...] = ("onnx", "pt2")
INPUT, OUTPUT = "input", "probabilities"  # the names of zoo_store's Open Inference Protocol metadata
OPSET = 18
META_FILE = "zoo.json"  # the .pt2's extra file holding the labels and input spec
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OPERATOR = re.compile(r"\baten(?:::|\.)[A-Za-z_][\w.]*")


class Served(nn.Module):
    """What a predict computes: [0, 1] input -> normalized -> the path's network -> softmax."""

    def __init__(self, net: nn.Module, spec: InputSpec):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) in [0, 1] -> (B, K)
        return self.net((x - self.mean) / self.std).softmax(-1)


def metadata(path_id: str, labels: tuple[str, ...] | list[str], spec: InputSpec) -> dict[str, str]:
    return {
        "zoo.path_id": path_id,
        "zoo.labels": json.dumps(list(labels)),
        "zoo.input": spec.model_dump_json(),
    }


def export_path(
    net: nn.Module, spec: InputSpec, labels: tuple[str, ...] | list[str], path_id: str, fmt: Format, family: str
) -> bytes:
    """The served network of a path as ``fmt`` bytes. ``family``: the base architecture(s), named
    when an exporter cannot express an operator (``InvalidInput``, a 422)."""
    served = Served(net, spec).eval()
    example = torch.rand(2, spec.channels, spec.size, spec.size)  # (B, C, H, W); B=2: not specialized to 1
    dims = ({0: torch.export.Dim("batch", min=1, max=65536)},)
    meta = metadata(path_id, labels, spec)
    try:
        with torch.no_grad():
            if fmt == "onnx":
                return _onnx(served, example, dims, meta)
            program = torch.export.export(served, (example,), dynamic_shapes=dims)
            buf = io.BytesIO()
            torch.export.save(program, buf, extra_files={META_FILE: json.dumps(meta)})
            return buf.getvalue()
    except InvalidInput:
        raise
    except Exception as e:  # noqa: BLE001 - the exporters raise many kinds; each is the user's answer
        raise InvalidInput(_refusal(fmt, family, e)) from e


def _onnx(served: nn.Module, example: Tensor, dims: tuple, meta: dict[str, str]) -> bytes:
    try:
        import onnx  # noqa: F401 - the exporter needs onnx and onnxscript: the ``export`` extra
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise InvalidInput(f"ONNX export needs the export extra on the server: pip install 'zoo[export]' ({e})") from e
    program = torch.onnx.export(
        served,
        (example,),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=dims,
        opset_version=OPSET,
        verbose=False,
    )
    model = program.model_proto
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def _refusal(fmt: Format, family: str, e: Exception) -> str:
    """The exporter's reason, naming the operator it could not express where it names one."""
    text = _ANSI.sub("", str(e)).strip()
    reason = text.splitlines()[0][:300] if text else type(e).__name__
    if op := _OPERATOR.search(text):
        return f"the {fmt} exporter cannot express operator {op.group(0)} of the {family} family: {reason}"
    return f"the {fmt} exporter cannot export this {family} network ({type(e).__name__}): {reason}"
