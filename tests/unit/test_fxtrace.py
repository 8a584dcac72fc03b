"""A torch.fx trace on one thread does not break forwards on others (issue 33: a refused resample
spec traced on a request thread failed predicts running at the same moment)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from zoo_store.archs import build_arch
from zoo_store.archs.fxtrace import trace
from zoo_store.archs.traced import node_tracer


def _failed_forwards_while(tracing: Callable[[torch.nn.Module], object], forwards_at_least: int = 40) -> tuple[int, int]:
    """(forwards that raised or answered wrong, forwards run) on a second thread while traces run one
    after another, until that thread has run ``forwards_at_least`` forwards (at most 1,000 traces)."""
    net, traced = build_arch("resnet_s", {"num_classes": 10}).eval(), build_arch("vgg_s", {"num_classes": 10})
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        want = net(x)
    done, counts = threading.Event(), [0, 0]

    def forwards() -> None:
        while not done.is_set():
            counts[1] += 1
            try:
                with torch.no_grad():
                    if not torch.equal(net(x), want):
                        counts[0] += 1
            except Exception:  # noqa: BLE001 - what a predict would have answered with a 500
                counts[0] += 1

    worker = threading.Thread(target=forwards)
    worker.start()
    try:
        for _ in range(1000):
            tracing(traced)
            if counts[1] >= forwards_at_least:
                break
    finally:
        done.set()
        worker.join()
    return counts[0], counts[1]


def test_a_plain_trace_breaks_forwards_on_other_threads() -> None:
    """The hazard itself, so the test below can fail: fx's patches reach every thread."""
    failed, ran = _failed_forwards_while(lambda net: node_tracer().trace(net))
    assert failed > 0, f"no forward of {ran} failed during plain traces: the test below proves nothing"


def test_a_confined_trace_leaves_forwards_on_other_threads_alone() -> None:
    failed, ran = _failed_forwards_while(lambda net: trace(node_tracer(), net))
    assert ran > 0 and failed == 0, f"{failed} of {ran} forwards failed during confined traces"
