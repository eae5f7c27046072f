"""Test helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from liquidcrypto import NatsWebSocketManager
from liquidcrypto.bench.websocket_fanout import redis_server as bench_redis_server
from liquidcrypto.fanout.session import ClientSession


async def eventually(
    check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> Any:
    """Poll ``check`` (sync or async) until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(interval)


class CliProcess:
    """A ``liquidcrypto`` command running as a real subprocess, its output in a file."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.log_path = cwd / f"cli-{args[0]}-{id(self)}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "WS_", "REDIS_"))}
        full_env.update(env)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "liquidcrypto", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=cwd,
            )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def cli(args: list[str], env: dict[str, str], cwd: Path) -> Iterator[CliProcess]:
    """Run ``python -m liquidcrypto *args``; SIGINT (then SIGKILL) in ``finally``."""
    p = CliProcess(args, env, cwd)
    try:
        yield p
    finally:
        p.stop()


async def http_get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    async with httpx.AsyncClient(timeout=timeout) as http:
        resp = await http.get(url)
        return resp.status_code, resp.json()


async def wait_http(url: str, proc: CliProcess | None = None, timeout: float = 20.0) -> tuple[int, Any]:
    """Poll ``url`` until it answers; fail with the process output if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.proc.returncode}:\n{proc.output}")
        try:
            return await http_get_json(url)
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer within {timeout} s:\n{proc.output if proc else ''}")
        await asyncio.sleep(0.05)


ROOT = Path(__file__).resolve().parent.parent
DOC_PAGES = ("README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```\n", re.S | re.M)
_PRINTS = re.compile(r"\s*It prints `([^`]*)`")


@dataclass(frozen=True)
class DocBlock:
    """One ```` ```python ```` block of a documentation page.

    A block that calls ``asyncio.run(`` is a *script*, run as its own process; any other
    block is a *fragment*, run as the body of an ``async`` function after ``init_nats()``.
    ``prints`` is what a script must print, taken from an ``It prints `...` `` sentence
    right after the block (None: not checked).
    """

    page: str
    number: int
    source: str
    prints: str | None

    @property
    def name(self) -> str:
        """How failures name the block: ``docs/a2a.md block 3`` (numbered from 1 per page)."""
        return f"{self.page} block {self.number}"

    @property
    def is_script(self) -> bool:
        return "asyncio.run(" in self.source


def doc_blocks(page: str) -> list[DocBlock]:
    """Every ```` ```python ```` block of ``page`` (a path relative to the repository root)."""
    text = (ROOT / page).read_text()
    blocks = []
    for number, match in enumerate(_PYTHON_BLOCK.finditer(text), start=1):
        prints = _PRINTS.match(text, match.end())
        blocks.append(DocBlock(page, number, match.group(1), prints.group(1) if prints else None))
    return blocks


def package_variables() -> set[str]:
    """The environment variables the package reads: the names ``liquidcrypto/config.py``
    quotes, plus any ``os.environ.get("...")`` elsewhere in the package."""
    package = ROOT / "liquidcrypto"
    names = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', (package / "config.py").read_text()))
    for module in package.rglob("*.py"):
        names.update(re.findall(r'environ(?:\.get\(|\[)"([A-Z][A-Z0-9_]+)"', module.read_text()))
    return names


def documented_variables(page: str = "docs/configuration.md") -> set[str]:
    """The environment variables in the first column of ``page``'s tables headed ``| Variable``."""
    names: set[str] = set()
    for table in re.findall(r"^\| Variable.*\n(?:\|.*\n)*", (ROOT / page).read_text(), re.M):
        names.update(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", table, re.M))
    return names


@contextlib.contextmanager
def redis_server(data_dir: Path, port: int | None = None) -> Iterator[str]:
    """Run a real redis-server (on ``port`` or a free one) and yield its URL; stop it after.
    Fails, never skips, when redis-server is missing."""
    with bench_redis_server(data_dir, port) as url:
        if url is None:
            pytest.fail("redis-server is not on PATH; install it (Debian: apt-get install redis-server)")
        yield url


@contextlib.asynccontextmanager
async def recording_session(
    manager: NatsWebSocketManager, name: str = "test"
) -> AsyncIterator[tuple[ClientSession, list[dict[str, Any]]]]:
    """A registered ``/ws`` client session of ``manager`` whose frames land, decoded, in a list."""
    frames: list[dict[str, Any]] = []

    async def send(text: str) -> None:
        frames.append(orjson.loads(text))

    session = ClientSession(send, manager.queue_policy, name=name)
    manager.register(session)
    writer = asyncio.ensure_future(session.run_writer())
    try:
        yield session, frames
    finally:
        writer.cancel()
        await manager.unregister(session)


def _all_threads_stopped(pid: int) -> bool:
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # the thread just ended
        if state not in ("T", "t"):
            return False
    return True


@contextlib.contextmanager
def frozen(pid: int, timeout: float = 5.0) -> Iterator[None]:
    """SIGSTOP a process and wait until every thread of it has stopped; SIGCONT after.

    ``kill`` returns before the stop takes effect: measured, a nats-server thread ran on
    for up to 9 ms in 13 of 300 tries, enough to acknowledge what a test sent meanwhile.
    """
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while not _all_threads_stopped(pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"process {pid} did not stop within {timeout} s")
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
