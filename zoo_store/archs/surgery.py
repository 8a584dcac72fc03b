"""Structural edits on copies of resident networks that keep sharing the resident weights."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def shared_copy(net: M) -> M:
    """A new module tree whose parameters and buffers ARE the original's (nothing copied).

    Every module object and its child/parameter/buffer dicts are new, so edits to the copy's
    structure (inserting layers, switching modes) leave the original untouched.
    """
    new = copy.copy(net)
    new._parameters = dict(net._parameters)
    new._buffers = dict(net._buffers)
    for name, value in vars(net).items():  # hook registries too: a hook on the copy must not reach the original
        if "hooks" in name and isinstance(value, dict):
            setattr(new, name, type(value)(value))
    new._modules = {name: None if m is None else shared_copy(m) for name, m in net._modules.items()}
    return new


def on_meta(net: M) -> M:
    """A shared copy whose parameters and buffers are meta tensors of the same shapes (the original
    untouched): for shape propagation without memory or compute."""
    new = shared_copy(net)
    for m in new.modules():
        m._parameters = {
            k: None if v is None else nn.Parameter(v.to("meta"), v.requires_grad) for k, v in m._parameters.items()
        }
        m._buffers = {k: None if v is None else v.to("meta") for k, v in m._buffers.items()}
    return new


def conv_paths(net: nn.Module, min_kernel: int = 2) -> list[tuple[str, nn.Conv2d]]:
    """Dotted paths of every Conv2d whose kernel is at least ``min_kernel`` on a side."""
    return [
        (name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) >= min_kernel
    ]


def replace_module(net: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    setattr(parent, child, new)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct tensors given (a tensor given twice counted once)."""
    distinct = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in distinct.values())


def state_bytes(module: nn.Module) -> int:
    """Bytes of the distinct tensors in a module's state (shared tensors counted once)."""
    return tensor_bytes([*module.parameters(), *module.buffers()])
