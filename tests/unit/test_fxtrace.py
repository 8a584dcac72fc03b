"""A torch.fx trace on one thread does not break forwards on others (issue 33: a refused resample
spec traced on a request thread failed predicts running at the same moment). Deterministic: the
traced module runs a forward on another thread from inside the trace, while fx's patches are in
place, and waits for it."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from zoo_store.archs import build_arch
from zoo_store.archs.fxtrace import trace
from zoo_store.archs.traced import node_tracer


class _Meanwhile(nn.Module):
    """Calls ``during()`` when it is traced (its forward runs on proxies, the tracer's patches on)."""

    def __init__(self, during: Callable[[], None]):
        super().__init__()
        self.during = during

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.during()
        return x * 2


def _forward_on_another_thread_during(tracing: Callable[[nn.Module], object]) -> str:
    """What a forward of another network, run on another thread in the middle of a trace, gave."""
    net, x = build_arch("resnet_s", {"num_classes": 10}).eval(), torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        want = net(x)
    outcome: list[str] = []

    def forward() -> None:
        try:
            with torch.no_grad():
                outcome.append("same" if torch.equal(net(x), want) else "different")
        except Exception as e:  # noqa: BLE001 - what a predict would have answered with a 500
            outcome.append(type(e).__name__)

    def during() -> None:
        other = threading.Thread(target=forward)
        other.start()
        other.join(60)

    tracing(nn.Sequential(_Meanwhile(during)))
    return outcome[0]


def test_a_plain_trace_breaks_a_forward_on_another_thread() -> None:
    """The hazard itself, so the test below can fail: fx's patches reach every thread."""
    assert _forward_on_another_thread_during(lambda net: node_tracer().trace(net)) != "same"


def test_a_confined_trace_leaves_a_forward_on_another_thread_alone() -> None:
    assert _forward_on_another_thread_during(lambda net: trace(node_tracer(), net)) == "same"
