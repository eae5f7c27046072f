"""Every Python example of the documentation runs as written against a real nats-server:
the README's front page and every page of ``docs/``. The convention (scripts, fragments,
``It prints`` sentences) is described in docs/development.md."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from liquidcrypto import close_nats, init_nats
from liquidcrypto.a2a.default import close_bus
from liquidcrypto.nats.embedded import NatsServer
from tests.helpers import DOC_PAGES, ROOT, DocBlock, doc_blocks, documented_variables, package_variables

BLOCKS = [block for page in DOC_PAGES for block in doc_blocks(page)]
SCRIPTS = [block for block in BLOCKS if block.is_script]
FRAGMENTS = [block for block in BLOCKS if not block.is_script]
# Read by scripts/dev and scripts/test, not by the package.
SCRIPT_VARIABLES = {"VENV"}


def test_the_pages_have_examples() -> None:
    per_page = Counter(block.page for block in BLOCKS)
    assert per_page["docs/a2a.md"] >= 8
    assert all(per_page[page] >= 1 for page in ("docs/client.md", "docs/workqueue.md", "docs/fanout.md"))
    # The front page: one script per component (client, A2A bus, work queue, WebSocket manager).
    assert sum(block.is_script for block in BLOCKS if block.page == "README.md") == 4


@pytest.mark.parametrize("block", SCRIPTS, ids=lambda block: block.name)
def test_script_runs_as_written(block: DocBlock, nats_server: NatsServer, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block.source)
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NATS_URL": nats_server.url, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, f"{block.name} exited with {out.returncode}:\n{out.stderr}"
    if block.prints is not None:
        assert out.stdout.strip() == block.prints, f"{block.name} printed {out.stdout!r}"


@pytest.mark.parametrize("block", FRAGMENTS, ids=lambda block: block.name)
async def test_fragment_runs_as_written(
    block: DocBlock, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATS_URL", nats_server.url)
    source = "async def __example__():\n" + textwrap.indent(block.source, "    ")
    namespace: dict[str, object] = {}
    exec(compile(source, block.name, "exec"), namespace)
    client = await init_nats()
    await client.wait_connected(15)
    try:
        await asyncio.wait_for(namespace["__example__"](), 20)  # type: ignore[operator]
    finally:
        await close_bus()
        await close_nats()


@pytest.mark.parametrize("page", DOC_PAGES)
def test_documented_variables_exist(page: str) -> None:
    assert sorted(documented_variables(page) - package_variables() - SCRIPT_VARIABLES) == []


def test_the_component_pages_document_their_settings() -> None:
    fanout = documented_variables("docs/fanout.md")
    assert {"WS_QUEUE_SIZE", "WS_PUBLISH_WINDOW", "REDIS_URL"} <= fanout
    assert {"A2A_AGENT_TTL", "A2A_HEARTBEAT_INTERVAL"} <= documented_variables("docs/a2a.md")
    assert "NATS_DEDUPE_WINDOW" in documented_variables("docs/workqueue.md")
