"""The README's walkthrough ("## Using it"), run as written: its bash blocks in order against a
fresh `zoo serve` (a temporary data dir and ports; `ZOO_DEMO_SAMPLES=1000`, which the README offers
for a quick try), each command's `shows:` checked against what it printed. The README cannot drift
from the code."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.scale import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Command:
    code: str  # one shell command (a heredoc or continued lines included)
    comment: str  # its comment, continuation comment lines included

    @property
    def shows(self) -> list[str] | None:
        """The pieces of output the comment promises, in order (``…`` stands for anything)."""
        m = re.search(r"shows: (.*)$", self.comment.strip())
        return m.group(1).split("…") if m else None


def _split(line: str) -> tuple[str, str]:
    """(command, comment): a comment starts with two spaces or more, then '# '."""
    m = re.search(r"\s{2,}# ", line)
    return (line[: m.start()].rstrip(), line[m.end() :]) if m else (line.rstrip(), "")


def walkthrough(readme: str) -> list[Command]:
    section = readme.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    commands: list[Command] = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL):
        lines, i = block.splitlines(), 0
        while i < len(lines):
            if lines[i].lstrip().startswith("#"):  # a comment line continues the command above's comment
                commands[-1].comment += " " + lines[i].lstrip()[1:].strip()
                i += 1
                continue
            code, comment = _split(lines[i])
            parts = [code]
            if m := re.search(r"<<'?(\w+)'?", code):  # a heredoc: up to its end marker
                while lines[i] != m.group(1):
                    i += 1
                    parts.append(lines[i])
            while parts[-1].endswith("\\"):  # continued lines
                i += 1
                code, more = _split(lines[i])
                parts.append(code)
                comment = f"{comment} {more}".strip()
            commands.append(Command("\n".join(parts), comment))
            i += 1
    return commands


def test_the_walkthrough_is_parsed_as_written() -> None:
    cmds = walkthrough((ROOT / "README.md").read_text())
    heredoc = next(c for c in cmds if c.code.startswith("cat > spec.json"))
    assert heredoc.code.endswith("\nJSON") and '"method": "reprogram"' in heredoc.code
    compose = next(c for c in cmds if "compose spec.json" in c.code)
    assert compose.shows == ["path p_", "  accuracy ", "%"]
    assert sum(c.shows is not None for c in cmds) >= 8


def _script(cmds: list[Command], work: Path, first: int, second: int, scratch: Path) -> str:
    out = [f"set -u -o pipefail\ncd {ROOT}"]
    for i, c in enumerate(cmds):
        code = c.code.replace("8000", str(first)).replace("8001", str(second)).replace("/tmp/zoo-walk", str(scratch))
        out.append(f"{{ {code}\n}} > {work}/out{i} 2>&1 || {{ echo 'README command {i} failed'; exit 1; }}")
    return "\n".join(out) + "\n"


def test_the_readme_walkthrough_runs(tmp_path: Path) -> None:
    zoo = ROOT / ".venv" / "bin" / "zoo"
    assert zoo.exists(), f"the walkthrough runs {zoo}: install as the README says"
    cmds = walkthrough((ROOT / "README.md").read_text())
    first, second = free_port(), free_port()
    env = {
        **os.environ,
        "ZOO_DATA_DIR": str(tmp_path / "data"),
        "ZOO_DEMO_SAMPLES": "1000",
        "ZOO_URL": f"http://127.0.0.1:{first}",
    }
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [str(zoo), "serve", "--port", str(first), "--no-access-log"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_ready(first, server, tmp_path / "serve.log")
        said = (tmp_path / "serve.log").read_text()
        assert f"an admin API key was written to {tmp_path / 'data' / 'admin.key'}" in said, said[
            -2000:
        ]  # fresh: says where
        (tmp_path / "script.sh").write_text(_script(cmds, tmp_path, first, second, tmp_path / "walk"))
        shell = subprocess.Popen(
            ["bash", str(tmp_path / "script.sh")],
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            said, _ = shell.communicate(timeout=600)
        finally:
            _stop(shell)
        for i, c in enumerate(cmds):
            out = (tmp_path / f"out{i}").read_text() if (tmp_path / f"out{i}").exists() else "(not run)"
            assert f"README command {i} failed" not in said.splitlines(), f"`{c.code}` failed:\n{out[-3000:]}"
            if c.shows is not None:
                assert _in_order(c.shows, out), f"`{c.code}` should show {'…'.join(c.shows)!r}, printed:\n{out[-3000:]}"
        assert shell.returncode == 0, said
    finally:
        _stop(server)


def _in_order(pieces: list[str], text: str) -> bool:
    at = 0
    for p in pieces:
        at = text.find(p, at)
        if at < 0:
            return False
        at += len(p)
    return True


def _wait_ready(port: int, server: subprocess.Popen, log: Path) -> None:
    import time

    end = time.monotonic() + 600  # the demo zoo trains first
    while time.monotonic() < end:
        if server.poll() is not None:
            pytest.fail(f"zoo serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"zoo serve was not ready in 600 s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """The process and everything it started (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
