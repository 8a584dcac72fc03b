"""torch.fx tracing that leaves other threads alone.

While a ``torch.fx`` tracer runs, it patches ``nn.Module.__call__`` and ``__getattr__`` (and the
functions it wraps in module globals) for the whole process: a forward pass running on another
thread at that moment would run through the tracer and fail. The inference process traces on
request threads (a spec's architecture checked, a traced base built) while its batcher runs
forwards, so ``trace`` confines those patches to the tracing thread: every other thread calls what
was there before. Traces take one lock among themselves; a forward never takes it.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import fx, nn
from torch.fx._symbolic_trace import _Patcher

_LOCK = threading.Lock()  # one trace at a time: the patcher's methods are swapped while it runs


def trace(tracer: fx.Tracer, model: nn.Module) -> fx.Graph:
    """``tracer.trace(model)``, its patches seen by this thread only."""
    with _LOCK, _confined_to(threading.get_ident()):
        return tracer.trace(model)


def _for_owner(owner: int, patched: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    def confined(*args: Any, **kwargs: Any) -> Any:
        return (patched if threading.get_ident() == owner else original)(*args, **kwargs)

    return confined


@contextmanager
def _confined_to(owner: int) -> Iterator[None]:
    patch, patch_method = _Patcher.patch, _Patcher.patch_method

    def confined_patch(self: _Patcher, frame: dict[str, Any], name: str, new_fn: Callable, deduplicate: bool = True):
        original = frame[name] if name in frame else getattr(builtins, name, None)
        return patch(self, frame, name, _for_owner(owner, new_fn, original), deduplicate)

    def confined_patch_method(self: _Patcher, cls: type, name: str, new_fn: Callable, deduplicate: bool = True):
        return patch_method(self, cls, name, _for_owner(owner, new_fn, getattr(cls, name)), deduplicate)

    _Patcher.patch, _Patcher.patch_method = confined_patch, confined_patch_method
    try:
        yield
    finally:
        _Patcher.patch, _Patcher.patch_method = patch, patch_method
