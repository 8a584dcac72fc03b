"""NASWOT (Mellor et al. 2021), the training-free score of step 2: the log-determinant of the kernel
``K = C Cᵀ + (1 − C)(1 − C)ᵀ`` over the binary codes ``C`` of every rectifier unit (``rectifiers``) on a batch of
images.
Networks whose units split the images into more distinct activation patterns score higher."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RectifierCodes:
    """Accumulates the NASWOT kernel (N, N) from forward hooks on every rectifier of a module tree.
    Hook only structural copies: a hook on a resident module would reach every request."""

    def __init__(self, modules: list[nn.Module]):
        self.kernel: Tensor | None = None
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, _m: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        c = (out.detach() > 0).flatten(1).double()  # (N, units)
        k = c @ c.T + (1 - c) @ (1 - c).T  # (N, N): units on which two images agree
        self.kernel = k if self.kernel is None else self.kernel + k

    def close(self) -> None:
        for h in self.handles:
            h.remove()


RECTIFIERS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish)  # output > 0 exactly when the input is > 0


def rectifiers(module: nn.Module) -> list[nn.Module]:
    """The units NASWOT codes: every rectifier, its code the sign of its input (ReLU's, and that of
    the smooth rectifiers GELU, SiLU and Hardswish, which are positive exactly where ReLU is)."""
    return [m for m in module.modules() if isinstance(m, RECTIFIERS)]


def logdet(kernel: Tensor | None) -> float:
    if kernel is None:
        return float("-inf")
    sign, value = torch.linalg.slogdet(kernel)
    return float(value) if sign > 0 else float("-inf")
