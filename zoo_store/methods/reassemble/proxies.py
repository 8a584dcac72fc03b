"""Step 2's training-free scores of an assembled network (stitches fitted by least squares, nothing
trained), each a ``Proxy`` in ``PROXIES``; a spec's ``options.proxy`` picks one.

- ``naswot``: NASWOT's log-determinant (``naswot.py``). Over N images with U coded units and codes
  that split the images at random it is about N·ln(U/2): it mostly counts rectifier units.
- ``naswot-size``: the same kernel divided by U (the fraction of units on which two images agree)
  before the log-determinant, i.e. NASWOT − N·ln U: how distinct the codes are, not how many.
- ``ridge``: a linear probe of the features the head reads (the last block's, globally pooled) on
  labelled training images of the task: ridge regression to one-hot labels, scored by its exact
  leave-one-out accuracy.

``zoo bench --suite reassemble`` measures each one's Kendall's tau against trained accuracy on
validation data; ``DEFAULT_PROXY`` is the one that ranked best there (docs/methods/reassemble.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from zoo_store.methods.reassemble.naswot import RectifierCodes, logdet

RIDGE = 1e-2  # the ridge probe's penalty per image (its features are standardized)
Run = Callable[[Tensor], Tensor]  # images (B, C, H, W) -> the features the score reads (B, C', H', W')


@dataclass(frozen=True)
class ProbeData:
    """What the proxies see: a batch for NASWOT's codes, labelled images for the ridge probe."""

    batch: Tensor  # (N, C, H, W) normalized
    images: Tensor  # (M, C, H, W) normalized training images of the task
    labels: Tensor  # (M,) their label indices


@torch.no_grad()
def codes(run: Run, units: list[nn.Module], x: Tensor) -> tuple[Tensor | None, int]:
    """NASWOT's kernel (N, N) over ``units`` on ``x``, and how many units it coded (its diagonal)."""
    recorder = RectifierCodes(units)
    try:
        run(x)
    finally:
        recorder.close()
    k = recorder.kernel
    return k, 0 if k is None else round(float(k[0, 0]))


@torch.no_grad()
def pooled(run: Run, images: Tensor, chunk: int = 128) -> Tensor:
    """Globally pooled features (M, C) of ``images``, ``chunk`` at a time."""
    return torch.cat([run(images[i : i + chunk]).mean((2, 3)) for i in range(0, len(images), chunk)])


def size_corrected(kernel: Tensor | None, units: int, n: int) -> float:
    """log det(K / U) = NASWOT − N·ln U."""
    return logdet(kernel) - n * math.log(units) if units else float("-inf")


def ridge_loo_accuracy(feats: Tensor, labels: Tensor, penalty: float = RIDGE) -> float:
    """Leave-one-out accuracy of ridge regression from ``feats`` (M, D) to one-hot ``labels`` (M,),
    exact: with the hat matrix H, image i's held-out prediction is (ŷ_i − H_ii·y_i) / (1 − H_ii)."""
    x = feats.double()
    x = (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-8)  # standardized
    x = torch.cat([x, x.new_ones(len(x), 1)], 1)  # (M, D + 1): a bias column
    y = torch.nn.functional.one_hot(labels.long(), int(labels.max()) + 1).double()  # (M, L)
    gram = x.T @ x + penalty * len(x) * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    hat = x @ torch.linalg.solve(gram, x.T)  # (M, M)
    h = hat.diagonal().unsqueeze(1)  # (M, 1)
    loo = (hat @ y - h * y) / (1 - h)  # (M, L)
    return float((loo.argmax(1) == labels).double().mean())


def naswot(run: Run, units: list[nn.Module], probe: ProbeData) -> float:
    return logdet(codes(run, units, probe.batch)[0])


def naswot_size(run: Run, units: list[nn.Module], probe: ProbeData) -> float:
    kernel, count = codes(run, units, probe.batch)
    return size_corrected(kernel, count, len(probe.batch))


def ridge(run: Run, units: list[nn.Module], probe: ProbeData) -> float:
    return ridge_loo_accuracy(pooled(run, probe.images), probe.labels)


# a proxy: the score of the network ``run`` computes, whose rectifiers are ``units``, on ``probe``
Proxy = Callable[[Run, list[nn.Module], ProbeData], float]
ProxyName = Literal["naswot", "naswot-size", "ridge"]  # what options.proxy may name (the OpenAPI's enum)
PROXIES: dict[str, Proxy] = {"naswot": naswot, "naswot-size": naswot_size, "ridge": ridge}
assert set(get_args(ProxyName)) == set(PROXIES)
# the best mean Kendall tau on validation in zoo bench --suite reassemble (2026-12-07)
DEFAULT_PROXY: ProxyName = "ridge"
