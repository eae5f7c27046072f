"""Every Python block of the README's A2A section runs as written against a real nats-server, and the
benchmark's quick mode runs and prints its table."""

from __future__ import annotations

import asyncio
import re
import textwrap

import pytest

from liquidcrypto import close_nats, init_nats
from liquidcrypto.a2a.default import close_bus
from liquidcrypto.bench import a2a as bench
from liquidcrypto.nats.embedded import NatsServer
from tests.helpers import readme_section

DOC_TEXT = readme_section("A2A Bus")
BLOCKS = re.findall(r"```python\n(.*?)```", DOC_TEXT, flags=re.S)


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("index", range(len(BLOCKS)))
async def test_doc_example_runs(
    index: int, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NATS_URL", nats_server.url)
    source = "async def __example__():\n" + textwrap.indent(BLOCKS[index], "    ")
    namespace: dict[str, object] = {}
    exec(compile(source, f"the README's A2A section block {index}", "exec"), namespace)
    client = await init_nats()
    await client.wait_connected(15)
    try:
        await asyncio.wait_for(namespace["__example__"](), 20)  # type: ignore[operator]
    finally:
        await close_bus()
        await close_nats()


def test_benchmark_quick_mode_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "A2A bus vs raw nats-py" in out
    assert "core latency" in out and "JetStream" in out
