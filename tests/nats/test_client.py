"""The NATS client against real nats-server processes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from liquidcrypto.config import Settings
from liquidcrypto.errors import (
    InvalidPayloadError,
    InvalidSubjectError,
    NatsUnavailableError,
    RequestTimeoutError,
)
from liquidcrypto.nats.client import DEGRADED_LINE, ConnectionState, NatsClient
from liquidcrypto.nats.embedded import NatsServer, free_port
from liquidcrypto.nats.options import redact_url
from tests.helpers import eventually

MakeClient = Callable[..., Awaitable[NatsClient]]


async def test_connect_and_health_shape(client: NatsClient, nats_server: NatsServer) -> None:
    health = await client.health()
    assert set(health) == {"connected", "server", "rtt", "jetstream"}
    assert health["connected"] is True
    assert isinstance(health["server"], str) and health["server"].startswith("N")
    assert isinstance(health["rtt"], float) and 0 < health["rtt"] < 1000
    assert health["jetstream"] == {"enabled": True, "streams": 3}
    assert client.state is ConnectionState.CONNECTED


async def test_streams_are_provisioned_exactly(client: NatsClient) -> None:
    a2a = (await client.js.stream_info("A2A_TASKS")).config
    assert a2a.subjects == ["agents.>", "system.>"]
    assert a2a.retention == RetentionPolicy.LIMITS
    assert a2a.max_age == 3600
    orch = (await client.js.stream_info("ORCHESTRATOR_TASKS")).config
    assert orch.subjects == ["orchestrator.tasks.>", "orchestrator.results.>"]
    assert orch.retention == RetentionPolicy.WORK_QUEUE
    assert orch.duplicate_window >= 3600
    trades = (await client.js.stream_info("TRADE_EVENTS")).config
    assert trades.subjects == ["trades.>", "ws.broadcast"]
    assert trades.retention == RetentionPolicy.LIMITS
    assert trades.max_age == 300
    for cfg in (a2a, orch, trades):
        assert cfg.storage == StorageType.FILE
        assert cfg.num_replicas == 1


async def test_provisioning_is_idempotent_and_repairs_drift(client: NatsClient) -> None:
    info = await client.js.stream_info("TRADE_EVENTS")
    await client.js.update_stream(dataclasses.replace(info.config, subjects=["trades.>"]))
    before = (await client.js.stream_info("A2A_TASKS")).state
    assert await client.provision() == []
    assert (await client.js.stream_info("TRADE_EVENTS")).config.subjects == ["trades.>", "ws.broadcast"]
    assert (await client.js.stream_info("A2A_TASKS")).state.messages == before.messages


async def test_stream_is_recreated_on_reconnect_after_deletion(client: NatsClient, nats_server: NatsServer) -> None:
    await client.js.delete_stream("A2A_TASKS")
    assert (await client.health())["jetstream"]["streams"] == 2
    nats_server.restart()

    async def three_streams() -> bool:
        return (await client.health())["jetstream"]["streams"] == 3

    await eventually(three_streams, timeout=15, what="A2A_TASKS recreated after reconnect")
    assert client.reconnects >= 1


async def test_existing_stream_with_other_retention_is_not_changed(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with NatsClient(nats_server.url, settings=Settings(), provision=False) as raw:
        await raw.wait_connected(10)
        await raw.js.add_stream(
            StreamConfig(name="TRADE_EVENTS", subjects=["trades.>", "ws.broadcast"], retention=RetentionPolicy.INTEREST)
        )
    with caplog.at_level(logging.ERROR):
        c = NatsClient(nats_server.url, settings=Settings())
        await c.connect(wait=15)
    try:
        assert c.is_connected
        assert len(c.stream_conflicts) == 1
        assert "TRADE_EVENTS" in str(c.stream_conflicts[0])
        assert "retention" in caplog.text
        assert (await c.js.stream_info("TRADE_EVENTS")).config.retention == RetentionPolicy.INTEREST
        assert (await c.js.stream_info("A2A_TASKS")).config.retention == RetentionPolicy.LIMITS
    finally:
        await c.close()


async def test_degraded_start_then_recovery_without_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    srv = NatsServer(tmp_path / "late")
    c = NatsClient(srv.url, settings=Settings())
    received: asyncio.Queue[object] = asyncio.Queue()
    try:
        with caplog.at_level(logging.WARNING):
            await asyncio.wait_for(c.connect(), timeout=5)  # returns promptly, does not raise
        assert c.state is ConnectionState.DEGRADED
        assert caplog.text.count(DEGRADED_LINE) == 1
        assert (await c.health()) == {
            "connected": False,
            "server": None,
            "rtt": None,
            "jetstream": {"enabled": False, "streams": 0},
        }
        with pytest.raises(NatsUnavailableError):
            await c.publish("demo.subject", {"x": 1})
        # A subscription made while degraded is established once NATS appears.
        sub = await c.subscribe("demo.>", received.put)
        assert not sub.active
        srv.start()
        await c.wait_connected(10)
        health = await c.health()
        assert health["connected"] is True
        assert health["jetstream"]["streams"] == 3
        assert sub.active
        await c.publish("demo.subject", {"x": 2})
        assert await asyncio.wait_for(received.get(), 5) == {"x": 2}
        assert caplog.text.count(DEGRADED_LINE) == 1
    finally:
        await c.close()
        srv.stop()


async def test_connect_wait_raises_when_nats_never_comes(tmp_path: Path) -> None:
    c = NatsClient(f"nats://127.0.0.1:{free_port()}", settings=Settings())
    try:
        with pytest.raises(NatsUnavailableError, match="not connected within"):
            await c.connect(wait=0.5)
    finally:
        await c.close()


async def test_publish_subscribe_round_trip_with_wildcards(client: NatsClient) -> None:
    star: asyncio.Queue[object] = asyncio.Queue()
    full: asyncio.Queue[object] = asyncio.Queue()
    await client.subscribe("demo.*.tick", star.put)

    async def async_handler(data: object) -> None:
        await full.put(data)

    await client.subscribe("demo.>", async_handler)
    await client.publish("demo.a.tick", {"n": 1, "s": "é"})
    await client.publish("demo.a.b.tick", [1, 2])
    assert await asyncio.wait_for(star.get(), 5) == {"n": 1, "s": "é"}
    got = {repr(await asyncio.wait_for(full.get(), 5)) for _ in range(2)}
    assert got == {repr({"n": 1, "s": "é"}), repr([1, 2])}
    assert star.empty()


async def test_request_reply_and_timeout(client: NatsClient) -> None:
    await client.subscribe("math.double", lambda d: {"result": d["x"] * 2})
    assert await client.request("math.double", {"x": 21}) == {"result": 42}
    with pytest.raises(RequestTimeoutError) as info:
        await client.request("nobody.listens", {}, timeout=0.3)
    assert isinstance(info.value, TimeoutError)
    assert "nobody.listens" in str(info.value)


async def test_queue_group_delivers_each_message_to_one_member(client: NatsClient, make_client: MakeClient) -> None:
    others = [await make_client() for _ in range(2)]
    seen: list[list[int]] = [[], [], []]
    for i, c in enumerate([client, *others]):
        await c.subscribe("jobs.run", seen[i].append, queue="workers")
    await asyncio.gather(*(c.flush() for c in [client, *others]))
    publisher = await make_client()
    for n in range(300):
        await publisher.publish("jobs.run", n)
    await eventually(lambda: sum(map(len, seen)) == 300, what="300 deliveries")
    assert sorted(n for s in seen for n in s) == list(range(300))
    assert all(seen), "every member of the group received work"


async def test_flush_makes_a_new_subscription_receive_the_next_publish(
    client: NatsClient, make_client: MakeClient
) -> None:
    # nats-py's own flush() can return before the server saw the SUB (see flush_barrier).
    publisher = await make_client()
    received: list[int] = []
    for n in range(200):
        await client.subscribe(f"barrier.{n}", received.append)
        await client.flush()
        await publisher.publish(f"barrier.{n}", n)
    await eventually(lambda: len(received) == 200, what="200 deliveries", timeout=10)
    assert sorted(received) == list(range(200))


async def test_bad_subjects_are_refused_before_sending(client: NatsClient) -> None:
    for bad in ["", "a..b", "a.*", "with space"]:
        with pytest.raises(InvalidSubjectError):
            await client.publish(bad, {})
    with pytest.raises(ValueError, match="queue group"):
        await client.subscribe("a.b", print, queue="bad queue")
    with pytest.raises(ValueError, match=re.escape("'a.>.b'")):
        await client.subscribe("a.>.b", print)


async def test_unencodable_payload_raises(client: NatsClient) -> None:
    with pytest.raises(InvalidPayloadError, match="object"):
        await client.publish("demo.x", object())


async def test_bad_json_and_handler_errors_do_not_stop_a_subscription(
    client: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    received: list[object] = []

    def handler(data: object) -> None:
        if data == "boom":
            raise RuntimeError("handler failed")
        received.append(data)

    await client.subscribe("feed", handler)
    with caplog.at_level(logging.WARNING):
        await client.nc.publish("feed", b"{not json")
        await client.publish("feed", "boom")
        await client.publish("feed", {"ok": True})
        await eventually(lambda: received == [{"ok": True}], what="good message after bad ones")
    assert "not valid JSON" in caplog.text
    assert "handler for feed failed" in caplog.text


async def test_unsubscribe_stops_delivery(client: NatsClient) -> None:
    got: list[object] = []
    sub = await client.subscribe("u.x", got.append)
    await client.publish("u.x", 1)
    await eventually(lambda: got == [1])
    await sub.unsubscribe()
    await sub.unsubscribe()  # idempotent
    await client.publish("u.x", 2)
    await client.flush()
    probe: list[object] = []
    await client.subscribe("u.x", probe.append)
    await client.publish("u.x", 3)
    await eventually(lambda: probe == [3])
    assert got == [1]


async def test_jetstream_publish_dedupes_by_msg_id(client: NatsClient) -> None:
    first = await client.js_publish("agents.a.tasks.t", {"v": 1}, msg_id="task-1")
    again = await client.js_publish("agents.a.tasks.t", {"v": 1}, msg_id="task-1")
    assert first.stream == "A2A_TASKS"
    assert again.seq == first.seq and again.duplicate
    with pytest.raises(NatsUnavailableError, match="no JetStream stream"):
        await client.js_publish("not.captured", {}, timeout=1)


async def test_publish_while_reconnecting_is_buffered(client: NatsClient, nats_server: NatsServer) -> None:
    got: asyncio.Queue[object] = asyncio.Queue()
    await client.subscribe("buf.x", got.put)
    nats_server.stop()
    await eventually(lambda: not client.is_connected, what="disconnect noticed")
    await client.publish("buf.x", {"during": "outage"})  # buffered, not raised
    nats_server.start()
    await client.wait_connected(15)
    assert await asyncio.wait_for(got.get(), 10) == {"during": "outage"}


async def test_closed_client_refuses_use(nats_server: NatsServer) -> None:
    c = NatsClient(nats_server.url, settings=Settings())
    await c.connect(wait=10)
    await c.close()
    await c.close()
    assert c.state is ConnectionState.CLOSED
    with pytest.raises(NatsUnavailableError):
        await c.publish("x.y", 1)


def test_redact_url_hides_credentials() -> None:
    assert redact_url("nats://user:pw@host:4222") == "nats://***@host:4222"
    assert redact_url("nats://tok@host") == "nats://***@host"
    assert redact_url("nats://host:4222") == "nats://host:4222"


async def test_module_level_functions_use_the_default_client(nats_server: NatsServer) -> None:
    from liquidcrypto import nats as lnats

    assert lnats.is_nats_connected() is False
    assert (await lnats.get_nats_health())["connected"] is False
    c = await lnats.init_nats(nats_server.url, settings=Settings())
    try:
        await c.wait_connected(10)
        assert lnats.is_nats_connected()
        assert await lnats.init_nats() is c
        got: asyncio.Queue[object] = asyncio.Queue()
        await lnats.subscribe("mod.x", got.put)
        await lnats.subscribe("mod.echo", lambda d: d)
        await lnats.publish("mod.x", {"a": 1})
        assert await asyncio.wait_for(got.get(), 5) == {"a": 1}
        assert await lnats.request("mod.echo", [1]) == [1]
        assert (await lnats.get_nats_health())["connected"] is True
    finally:
        await lnats.close_nats()
    assert lnats.is_nats_connected() is False


async def test_close_nats_closes_components_built_on_the_default_client(nats_server: NatsServer) -> None:
    from liquidcrypto import nats as lnats
    from liquidcrypto.a2a import default

    c = await lnats.init_nats(nats_server.url, settings=Settings())
    await c.wait_connected(10)
    bus = default.get_bus()
    await lnats.close_nats()
    assert bus._closed
    assert c.state is ConnectionState.CLOSED


async def test_establishing_a_subscription_twice_concurrently_makes_one(client: NatsClient) -> None:
    from liquidcrypto.nats.subscription import Subscription, json_callback

    got: list[object] = []
    sub = Subscription(lambda s: None, "once.x", json_callback("once.x", got.append), None, 1000, 1 << 20)
    before = len(client.nc._subs)
    # A reconnect pass and a subscribe() racing on the same subscription.
    await asyncio.gather(sub._establish(client.nc), sub._establish(client.nc))
    assert len(client.nc._subs) == before + 1
    await client.publish("once.x", 1)
    await eventually(lambda: got == [1], what="one delivery")
    await client.publish("once.x", 2)
    await eventually(lambda: got == [1, 2], what="second delivery, once")
    await sub.unsubscribe()


# -- subscribe_stream: JetStream push consumers through the client ---------------------


async def test_subscribe_stream_delivers_and_deletes_its_consumer_on_unsubscribe(client: NatsClient) -> None:
    from nats.aio.msg import Msg
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    await client.js_publish("trades.SS1", {"i": 0})
    got: list[tuple[int, bytes]] = []

    async def on_msg(msg: Msg) -> None:
        got.append((msg.metadata.sequence.stream, msg.data))

    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0)
    sub = await client.subscribe_stream("TRADE_EVENTS", "trades.SS1", on_msg, config=config)
    assert sub.info.num_pending == 1 and sub.subject == "trades.SS1"
    consumers = await client.js.consumers_info("TRADE_EVENTS")
    assert [c.name for c in consumers] == [sub.consumer]
    assert consumers[0].config.filter_subject == "trades.SS1"
    await client.js_publish("trades.SS1", {"i": 1})
    await client.js_publish("trades.OTHER", {"i": 2})
    await eventually(lambda: len(got) == 2, what="both trades of SS1")
    assert [data for _, data in got] == [b'{"i":0}', b'{"i":1}']
    assert (await sub.consumer_info()).delivered.stream_seq == got[-1][0]
    await sub.unsubscribe()
    # nats-py's unsubscribe would leave it until its inactive_threshold (60 s here).
    assert await client.js.consumers_info("TRADE_EVENTS") == []
    assert sub.closed
    await sub.unsubscribe()  # idempotent
    await client.js_publish("trades.SS1", {"i": 3})
    await client.flush()
    assert len(got) == 2


async def test_subscribe_stream_answers_flow_control_only_on_flow_control_subjects(client: NatsClient) -> None:
    from nats.aio.msg import Msg
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    got: list[bytes] = []

    async def on_msg(msg: Msg) -> None:
        got.append(msg.data)

    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.NONE, flow_control=True, idle_heartbeat=5.0
    )
    sub = await client.subscribe_stream("TRADE_EVENTS", "trades.FC1", on_msg, config=config)
    lured: list[str] = []

    async def on_lure(msg: Msg) -> None:
        lured.append(msg.subject)

    await client.subscribe_msgs("lure.>", on_lure)
    # Anyone who learns the inbox can send a "heartbeat"; it must not make us publish.
    inbox = sub.info.config.deliver_subject
    await client.nc.publish(inbox, b"", headers={"Status": "100", "Nats-Consumer-Stalled": "lure.x"})
    await client.nc.publish(inbox, b"", headers={"Status": "100"}, reply="lure.y")
    await client.js_publish("trades.FC1", {"i": 1})
    await eventually(lambda: got == [b'{"i":1}'], what="the trade, and nothing else")
    await client.flush()
    await client.publish("lure.end", "end")
    await eventually(lambda: lured, what="the probe")
    assert lured == ["lure.end"]
    await sub.unsubscribe()


async def test_subscribe_stream_validates_and_needs_a_connection(client: NatsClient) -> None:
    from nats.js.api import ConsumerConfig

    async def ignore(msg: object) -> None:
        return None

    with pytest.raises(InvalidSubjectError):
        await client.subscribe_stream("TRADE_EVENTS", "trades..x", ignore, config=ConsumerConfig())
    with pytest.raises(NatsUnavailableError, match="NO_SUCH_STREAM"):
        await client.subscribe_stream("NO_SUCH_STREAM", "trades.x", ignore, config=ConsumerConfig())
    assert await client.js.consumers_info("TRADE_EVENTS") == []
    degraded = NatsClient(f"nats://127.0.0.1:{free_port()}", settings=Settings())
    try:
        await degraded.connect()
        with pytest.raises(NatsUnavailableError, match="not connected"):
            await degraded.subscribe_stream("TRADE_EVENTS", "trades.x", ignore, config=ConsumerConfig())
    finally:
        await degraded.close()
