"""Mixed-path batches for CLR: one forward of the frozen base serves samples of many paths.

Per base, the bank keeps every resident path's tensors stacked in *slots*: for each CLR layer a
table ``(S, C, 1, k, k)`` of depthwise kernels, and for the head ``(S, K_max, D)`` weights and
``(S, K_max)`` biases (paths with fewer labels padded and masked). A batch carries one slot index
per sample; each CLR layer gathers the samples' kernels and applies them in one grouped
convolution over ``(1, B*C, H, W)`` with ``B*C`` groups, which computes exactly what each path's
own depthwise conv computes on its sample. The head is a gathered batched matmul.

Paths with their own BatchNorm (config ``bn``) share the same batches. In eval mode a BatchNorm is a
per-channel affine, ``x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
``shift = bias - running_mean * scale``, so the bank keeps, for every BatchNorm of the base, tables
``(S, C)`` of both, and a flag per slot. Only when a batch holds a sample of such a path,
``_SlotNorms`` intercepts the body's ``F.batch_norm`` calls (a BatchNorm module's or, in traced timm
networks, the inlined call) and gives those samples their slot's affine; the other samples keep the
base's own ``F.batch_norm`` result, so what a path without BatchNorm gets never depends on its
neighbours or on which paths are resident.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from zoo_store.archs import TapNet
from zoo_store.archs.surgery import replace_module, shared_copy, tensor_bytes
from zoo_store.methods.bank import PathBank
from zoo_store.methods.reprogram.config import ReprogramConfig
from zoo_store.methods.reprogram.layers import batch_norm_args, bn_targets, clr_targets


class _SlotCLR(nn.Module):
    """The CLR layer after one conv: each sample convolved with its own slot's kernels."""

    def __init__(self, bank: ReprogramBank, name: str):
        super().__init__()
        self.bank_ref = [bank]  # a list, so the bank is not registered as a submodule
        self.name = name

    def forward(self, h: Tensor) -> Tensor:
        bank = self.bank_ref[0]
        b, c, height, width = h.shape  # (B, C, H, W)
        k = bank.kernel
        w = bank.kernels[self.name].index_select(0, bank.batch_slots)  # (B, C, 1, k, k)
        out = F.conv2d(h.reshape(1, b * c, height, width), w.reshape(b * c, 1, k, k), padding=k // 2, groups=b * c)
        return out.view(b, c, height, width)  # (B, C, H, W)


class _SlotNorms(TorchFunctionMode):
    """While active: each eval-mode ``F.batch_norm`` of a base BatchNorm gives the samples whose slot
    has its own BatchNorm that slot's affine; the rest keep the base's result."""

    def __init__(self, bank: ReprogramBank, own: Tensor):
        super().__init__()
        self.bank = bank
        self.own = own.view(-1, 1, 1, 1)  # (B, 1, 1, 1) True where the sample's path has its own BatchNorm

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.batch_norm:
            name = self.bank.norm_names.get(id(batch_norm_args(args, kwargs)["running_mean"]))
            if name is not None:
                x = args[0] if args else kwargs["input"]  # (B, C, H, W)
                slots = self.bank.batch_slots
                scale = self.bank.norm_scale[name].index_select(0, slots)[:, :, None, None]  # (B, C, 1, 1)
                shift = self.bank.norm_shift[name].index_select(0, slots)[:, :, None, None]  # (B, C, 1, 1)
                out = torch.where(self.own, torch.addcmul(shift, x, scale), out)  # (B, C, H, W)
        return out


class ReprogramBank(PathBank):
    """The slots of every resident reprogram path of one base (and one kernel size)."""

    def __init__(self, base: TapNet, kernel: int):
        self.kernel = kernel
        self.targets = clr_targets(base)  # [(conv path, channels)]
        self.device = base.head_layer.weight.device
        self.feature_dim = base.feature_dim
        body = shared_copy(base)
        for path, _ in self.targets:
            replace_module(body, path, nn.Sequential(body.get_submodule(path), _SlotCLR(self, path)))
        self.body = body.eval()
        self.norm_targets = bn_targets(base)  # [(BatchNorm path, channels)]
        self.norm_eps = {p: base.get_submodule(p).eps for p, _ in self.norm_targets}
        self.norm_names = {id(base.get_submodule(p).running_mean): p for p, _ in self.norm_targets}
        self.capacity = 0
        self.used = 0  # slots below this have been written (rows above it were never touched)
        self.kernels = {p: self._empty(0, c, 1, kernel, kernel) for p, c in self.targets}  # (S, C, 1, k, k)
        self.norm_scale = {p: self._empty(0, c) for p, c in self.norm_targets}  # (S, C)
        self.norm_shift = {p: self._empty(0, c) for p, c in self.norm_targets}  # (S, C)
        self.own_norms = torch.zeros(0, dtype=torch.bool, device=self.device)  # (S,) slots with their own BatchNorm
        self.head_w = self._empty(0, 0, self.feature_dim)  # (S, K_max, D)
        self.head_b = self._empty(0, 0)  # (S, K_max)
        self.widths = torch.zeros(0, dtype=torch.long, device=self.device)  # (S,) each slot's label count
        self.batch_slots = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) set for one forward

    def _empty(self, *shape: int) -> Tensor:
        return torch.empty(*shape, dtype=torch.float32, device=self.device)

    @property
    def max_classes(self) -> int:
        return self.head_w.shape[1]

    def slot_bytes(self, config: dict) -> int:
        cfg = ReprogramConfig.model_validate(config)
        width = max(cfg.num_classes, self.max_classes)
        kernels = sum(c * self.kernel * self.kernel for _, c in self.targets)
        norms = 2 * sum(c for _, c in self.norm_targets)
        return 4 * (kernels + norms + width * (self.feature_dim + 1))

    def nbytes(self) -> int:
        tables = [
            *self.kernels.values(),
            *self.norm_scale.values(),
            *self.norm_shift.values(),
            self.head_w,
            self.head_b,
        ]
        return tensor_bytes(tables)

    def grow(self, capacity: int) -> None:
        """More slots; the new rows stay untouched (on the CPU, their pages are not committed until used)."""
        self.kernels = {p: _grown(t, capacity, self.used) for p, t in self.kernels.items()}
        self.norm_scale = {p: _grown(t, capacity, self.used) for p, t in self.norm_scale.items()}
        self.norm_shift = {p: _grown(t, capacity, self.used) for p, t in self.norm_shift.items()}
        self.head_w, self.head_b = _grown(self.head_w, capacity, self.used), _grown(self.head_b, capacity, self.used)
        widths = torch.zeros(capacity, dtype=torch.long, device=self.device)
        widths[: self.capacity] = self.widths
        own = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        own[: self.capacity] = self.own_norms
        self.widths, self.own_norms, self.capacity = widths, own, capacity

    @torch.no_grad()
    def load(self, slot: int, config: dict, tensors: dict[str, Tensor]) -> None:
        cfg = ReprogramConfig.model_validate(config)
        num_classes = cfg.num_classes
        if num_classes > self.max_classes:
            self._widen(num_classes)
        for path, table in self.kernels.items():
            table[slot].copy_(tensors[f"clr.{path}"])  # (C, 1, k, k)
        if cfg.bn:  # the rows of a slot without its own BatchNorm are never read
            for path, _ in self.norm_targets:
                t = {n: tensors[f"bn.{path}.{n}"] for n in ("weight", "bias", "running_mean", "running_var")}
                scale = t["weight"] * torch.rsqrt(t["running_var"] + self.norm_eps[path])  # (C,)
                self.norm_scale[path][slot].copy_(scale)
                self.norm_shift[path][slot].copy_(t["bias"] - t["running_mean"] * scale)  # (C,)
        self.own_norms[slot] = cfg.bn
        self.head_w[slot].zero_()[:num_classes].copy_(tensors["head.weight"])  # (K, D)
        self.head_b[slot].zero_()[:num_classes].copy_(tensors["head.bias"])  # (K,)
        self.widths[slot] = num_classes
        self.used = max(self.used, slot + 1)

    def _widen(self, num_classes: int) -> None:
        """Pad every slot's head to ``num_classes`` rows (the extra rows are masked per slot)."""
        n, k = self.used, self.max_classes
        w, b = self._empty(self.capacity, num_classes, self.feature_dim), self._empty(self.capacity, num_classes)
        w[:n, :k], b[:n, :k] = self.head_w[:n], self.head_b[:n]
        self.head_w, self.head_b = w, b

    def forward(self, x: Tensor, slots: Tensor) -> Tensor:
        """x: (B, C, H, W) normalized, slots: (B,) -> logits (B, K_max), -inf past each slot's labels."""
        self.batch_slots = slots
        own = self.own_norms.index_select(0, slots)  # (B,)
        norms = _SlotNorms(self, own) if self.norm_targets and bool(own.any()) else contextlib.nullcontext()
        try:
            with norms:
                z = self.body.embed(x)  # (B, D)
        finally:
            self.batch_slots = self.batch_slots[:0]
        w, b = self.head_w.index_select(0, slots), self.head_b.index_select(0, slots)  # (B, K, D), (B, K)
        logits = torch.baddbmm(b.unsqueeze(2), w, z.unsqueeze(2)).squeeze(2)  # (B, K)
        cols = torch.arange(self.max_classes, device=x.device)  # (K,)
        return logits.masked_fill(cols >= self.widths.index_select(0, slots).unsqueeze(1), float("-inf"))


def _grown(t: Tensor, capacity: int, used: int) -> Tensor:
    """A table of ``capacity`` slots holding the first ``used`` rows of ``t``."""
    new = torch.empty(capacity, *t.shape[1:], dtype=t.dtype, device=t.device)
    new[:used] = t[:used]
    return new
