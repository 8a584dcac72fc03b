"""The OpenAPI contract, checked by a tool no one here wrote: schemathesis (--checks all, a fixed
seed, bounded) against a live `zoo serve` with an HTTP worker in front of the inference process.
Its per-operation allowances for refusals a schema cannot state are in schemathesis.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.scale import Server

ROOT = Path(__file__).resolve().parents[2]
COMMAND = ["run", "--checks", "all", "--max-examples", "30", "--seed", "1", "--workers", "2"]  # docs/openapi.md


def test_schemathesis_finds_no_failure(tmp_path: Path) -> None:
    server = Server(tmp_path, "mixed", workers=1)  # an empty zoo: nothing to train before it is ready
    try:
        st = Path(sys.executable).parent / "st"
        auth = ["-H", f"Authorization: Bearer {server.key}"]  # an admin's: every operation is reachable
        out = subprocess.run(
            [str(st), *COMMAND, *auth, f"{server.url}/openapi.json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
    finally:
        server.close()
    summary = out.stdout[-3000:]
    assert out.returncode == 0, summary
    assert " passed" in summary and "failure" not in summary, summary
