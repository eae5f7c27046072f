"""The per-agent nats-server permissions of docs/security.md, run as written: agent ``a``
publishes its events, receives and answers tasks, registers itself, and is refused (a
permissions violation, nothing stored) when it publishes under ``agents.b.>``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError, NoKeysError

from liquidcrypto import A2ABus, Envelope
from liquidcrypto.config import Settings
from liquidcrypto.errors import NatsUnavailableError
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from tests.helpers import ROOT, eventually

PAGE = ROOT / "docs" / "security.md"


def documented_config() -> str:
    """The one ```` ```conf ```` block of docs/security.md."""
    blocks = re.findall(r"^```conf\n(.*?)^```\n", PAGE.read_text(), re.S | re.M)
    assert len(blocks) == 1, f"{PAGE} should hold exactly one conf block, found {len(blocks)}"
    return str(blocks[0])


@pytest.fixture
def secured_server(tmp_path: Path) -> Iterator[NatsServer]:
    srv = NatsServer(tmp_path / "nats", extra_config=documented_config())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def connect(server: NatsServer, user: str, password: str, **kwargs: Any) -> NatsClient:
    client = NatsClient(f"nats://{user}:{password}@{server.host}:{server.port}", settings=Settings(), **kwargs)
    await client.connect(wait=15)
    assert client.is_connected, client.last_error
    return client


async def test_agent_a_publishes_its_own_subjects_and_nothing_under_agent_b(secured_server: NatsServer) -> None:
    service = await connect(secured_server, "service", "service-secret")
    agent = await connect(secured_server, "agent-a", "agent-a-secret", provision=False)
    service_bus, agent_bus = A2ABus(service), A2ABus(agent)
    try:
        await service.require(streams.A2A_RESOURCES)  # the service creates the buckets
        seq = await agent_bus.publish_event("a", "progress", {"pct": 10})
        assert seq is not None

        with pytest.raises(NatsUnavailableError):
            await agent_bus.publish_event("b", "progress", {"forged": True}, timeout=1)
        assert agent.last_error is not None and "permissions violation" in agent.last_error.lower()
        assert "agents.b.events.progress" in agent.last_error
        info = await service.js.stream_info(streams.A2A_TASKS, subjects_filter="agents.b.>")
        assert not info.state.subjects, "a message under agents.b.> was stored"
        assert info.state.messages == 1  # agent a's event only

        # What else the example allows: the registry, durable and core tasks, replies.
        await agent_bus.register_agent({"id": "a", "skills": ["ping"]}, heartbeat=False)
        durable_got: list[Any] = []
        core_got: list[Any] = []

        def on_durable(task: Envelope) -> str:
            durable_got.append(task.data)
            return "pong"

        await agent_bus.subscribe_to_tasks("a.tasks.*", on_durable, durable="a")
        await agent_bus.subscribe_to_tasks("a.tasks.*", lambda task: core_got.append(task.data))
        assert await service_bus.request_agent("a", "ping", 1, timeout=5) == "pong"
        await eventually(lambda: durable_got == [1] and core_got == [1], what="durable and core delivery")
        assert agent.is_connected

        # The durable's handled marks: under its own name only (issue 12, item 2).
        marks = await service.js.key_value(streams.A2A_HANDLED)

        async def marked() -> list[str]:
            try:
                return [k for k in await marks.keys() if k.startswith("a.")]
            except NoKeysError:
                return []

        await eventually(marked, what="agent a's handled mark")
        await agent.nc.publish("$KV.A2A_HANDLED.b.1", b"forged")
        await eventually(
            # nats-py lower-cases the server's error text
            lambda: "$kv.a2a_handled.b.1" in (agent.last_error or "").lower(),
            what="a forged mark refused by the server",
        )
        with pytest.raises(KeyNotFoundError):
            await marks.get("b.1")
    finally:
        await agent_bus.close()
        await service_bus.close()
        await agent.close()
        await service.close()
