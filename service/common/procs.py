"""Process plumbing for `zoo serve`: children that die with the supervisor, even when it is killed."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
SUPERVISOR_ENV = "ZOO_SUPERVISOR_PID"


def die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when ``parent`` (its parent) dies, by SIGKILL too. Elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the call above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def die_with_supervisor() -> None:
    """In a child of `zoo serve` (its pid in ZOO_SUPERVISOR_PID): die with it, also when it died
    while this child was still starting (this child is an orphan then). The variable is dropped
    here, so that no grandchild inherits it. In the supervisor itself, or outside `zoo serve`, nothing."""
    supervisor = int(os.environ.get(SUPERVISOR_ENV) or 0)
    if not supervisor or supervisor == os.getpid():
        return
    del os.environ[SUPERVISOR_ENV]
    die_with_parent(supervisor)


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` (Linux, from /proc) with its command line."""
    from pathlib import Path

    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # a zombie is dead already
            parents[int(stat.parent.name)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier}
        for p in frontier:
            with contextlib.suppress(OSError):
                found[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found
