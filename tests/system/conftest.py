"""System tests: real processes, live servers, a browser; every test here is marked ``slow``
(``-m "not slow"`` leaves them out of a quick run; CI runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
