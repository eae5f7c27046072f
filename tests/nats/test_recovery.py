"""The client recovers from what used to leave it dead or duplicated (issue 10, findings 2,
3 and 5), against real nats-server processes: a connection the server closed, an
over-size message, a JetStream publish during an outage, and reconnections in quick
succession."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from liquidcrypto import NatsWebSocketManager
from liquidcrypto.config import Settings
from liquidcrypto.errors import NatsUnavailableError, PayloadTooLargeError, PublishOutcomeUnknownError
from liquidcrypto.nats.client import ConnectionState, NatsClient
from liquidcrypto.nats.embedded import NatsServer
from tests.helpers import eventually, frozen


async def _stream_messages(client: NatsClient, stream: str) -> int:
    return int((await client.js.stream_info(stream)).state.messages)


# -- finding 2(a): a connection the server closed is reopened ---------------------------


async def test_a_connection_the_server_closed_is_reopened(client: NatsClient, nats_server: NatsServer) -> None:
    got: asyncio.Queue[Any] = asyncio.Queue()
    await client.subscribe("closed.x", got.put)
    reconnections: list[int] = []

    async def on_connect(c: NatsClient) -> None:
        reconnections.append(1)

    client.on_connect(on_connect)
    first = client.nc
    # Body under max_payload, body + headers over it: nats-py sends it, the server answers
    # -ERR 'Maximum Payload Violation' and closes the connection; nats-py reports *closed*.
    body = b"x" * (first.max_payload - 8)
    await first.publish("closed.big", body, headers={"Nats-Msg-Id": "over-by-headers"})
    await eventually(lambda: first.is_closed, what="the server closing the connection")
    await eventually(lambda: client.is_connected, timeout=15, what="a fresh connection")
    assert client.nc is not first
    assert client.state is ConnectionState.CONNECTED
    assert (await client.health())["connected"] is True
    assert reconnections, "on_connect callbacks ran as on a reconnect"
    # The subscription made on the first connection lives on the new one, once.
    await client.publish("closed.x", {"after": "close"})
    assert await asyncio.wait_for(got.get(), 5) == {"after": "close"}
    await client.flush()
    assert got.empty()
    ack = await client.js_publish("agents.a.tasks.t", {"n": 1}, msg_id="after-close")
    assert ack.stream == "A2A_TASKS"


async def test_health_is_false_while_a_closed_connection_is_replaced(
    client: NatsClient, nats_server: NatsServer
) -> None:
    first = client.nc
    nats_server.stop()
    await first.close()  # as if nats-py had given up: closed, not by NatsClient.close()
    assert not client.is_connected
    assert (await client.health())["connected"] is False
    with pytest.raises(NatsUnavailableError):
        await client.publish("x.y", 1)
    nats_server.start()
    await eventually(lambda: client.is_connected, timeout=15, what="a fresh connection")
    assert (await client.health())["connected"] is True
    await client.close()
    assert client.state is ConnectionState.CLOSED


async def test_callbacks_given_as_options_run_after_the_clients_own(nats_server: NatsServer) -> None:
    events: list[str] = []

    async def disconnected_cb() -> None:
        events.append("disconnected")

    async def reconnected_cb() -> None:
        events.append("reconnected")

    async def closed_cb() -> None:
        events.append("closed")

    c = NatsClient(
        nats_server.url,
        settings=Settings(),
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        closed_cb=closed_cb,
    )
    await c.connect(wait=15)
    try:
        await asyncio.to_thread(nats_server.restart)
        await eventually(lambda: "reconnected" in events, timeout=15, what="the caller's reconnected_cb")
        await c.wait_connected(15)
        assert c.reconnects == 1 and events[:2] == ["disconnected", "reconnected"]
    finally:
        await c.close()
    assert events[-1] == "closed"
    assert c.fresh_connects == 0  # our own close() is the end


# -- finding 2(b): body + headers checked against max_payload before sending -----------


async def test_over_size_publishes_are_refused_before_sending(client: NatsClient) -> None:
    limit = client.nc.max_payload
    body = b"x" * (limit - 8)
    headers = {"Nats-Msg-Id": "too-big"}
    first = client.nc
    attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: client.publish_raw("big.core", body, headers),
        lambda: client.js_publish_raw("agents.a.tasks.big", body, headers),
        lambda: client.js_publish_async_raw("agents.a.tasks.big", body, headers),
        lambda: client.js_publish("agents.a.tasks.big", "x" * (limit - 8), msg_id="too-big-2"),
        lambda: client.publish("big.core", "x" * limit),
        lambda: client.request("big.core", "x" * limit, timeout=0.5),
    ]
    for attempt in attempts:
        with pytest.raises(PayloadTooLargeError) as info:
            await attempt()
        assert isinstance(info.value, ValueError)
        assert info.value.limit == limit
        assert info.value.size > limit
        assert f"max_payload of {limit:,} bytes" in str(info.value)
    with pytest.raises(PayloadTooLargeError, match=r"body 1,048,568 \+ headers \d+\)"):
        await client.publish_raw("big.core", b"x" * (1_048_576 - 8), headers)
    # Nothing reached the server: the same connection is healthy and works.
    assert client.nc is first and not first.is_closed
    assert (await client.health())["connected"] is True
    got: asyncio.Queue[Any] = asyncio.Queue()
    await client.subscribe("big.after", got.put)
    await client.publish("big.after", {"ok": True})
    assert await asyncio.wait_for(got.get(), 5) == {"ok": True}
    # Exactly at the limit is allowed: body + "NATS/1.0\r\n" + "Nats-Msg-Id: too-big\r\n" + "\r\n".
    with pytest.raises(PayloadTooLargeError, match=f"max_payload of {limit:,}"):
        await client.publish_raw("big.edge", b"x" * (limit - 33), headers)
    await client.publish_raw("big.edge", b"x" * (limit - 34), headers)
    await client.flush()
    assert client.nc is first and client.is_connected


# -- finding 3: no phantom JetStream writes -----------------------------------------------


async def test_js_publish_while_disconnected_is_not_sent_and_a_retry_stores_once(
    client: NatsClient, nats_server: NatsServer
) -> None:
    before = await _stream_messages(client, "A2A_TASKS")
    nats_server.stop()
    await eventually(lambda: not client.is_connected, what="disconnect noticed")
    with pytest.raises(NatsUnavailableError, match="not sent") as info:
        await client.js_publish("agents.a.tasks.t", {"n": 1}, msg_id="retry-me", timeout=1)
    assert info.value.sent is False
    assert not isinstance(info.value, PublishOutcomeUnknownError)
    with pytest.raises(NatsUnavailableError, match="not sent"):
        await client.js_publish_async_raw("agents.a.tasks.t", b"{}", {"Nats-Msg-Id": "retry-me-async"})
    # A request is not buffered either: it would reach its responder after we gave up.
    with pytest.raises(NatsUnavailableError, match="not sent"):
        await client.request("svc.echo", {"n": 1}, timeout=1)
    nats_server.start()
    await client.wait_connected(15)
    await client.flush()
    # Nothing of the failed publish was buffered and stored behind the caller's back.
    assert await _stream_messages(client, "A2A_TASKS") == before
    ack = await client.js_publish("agents.a.tasks.t", {"n": 1}, msg_id="retry-me")
    assert not ack.duplicate
    again = await client.js_publish("agents.a.tasks.t", {"n": 1}, msg_id="retry-me")
    assert again.duplicate and again.seq == ack.seq
    assert await _stream_messages(client, "A2A_TASKS") == before + 1


async def test_js_publish_timeout_after_sending_says_outcome_unknown(
    client: NatsClient, nats_server: NatsServer
) -> None:
    before = await _stream_messages(client, "A2A_TASKS")
    assert nats_server.proc is not None
    unknown = pytest.raises(PublishOutcomeUnknownError, match="same Nats-Msg-Id")
    with frozen(nats_server.proc.pid), unknown as info:
        await client.js_publish("agents.a.tasks.t", {"n": 2}, msg_id="unknown-1", timeout=0.5)
    assert info.value.sent is True
    assert isinstance(info.value, NatsUnavailableError) and isinstance(info.value, TimeoutError)
    assert info.value.msg_id == "unknown-1"
    await client.wait_connected(15)
    # It was sent: the stream stores it; the retry with the same id is a duplicate.
    await eventually(lambda: _count_is(client, "A2A_TASKS", before + 1), timeout=15, what="the sent message stored")
    again = await client.js_publish("agents.a.tasks.t", {"n": 2}, msg_id="unknown-1")
    assert again.duplicate
    assert await _stream_messages(client, "A2A_TASKS") == before + 1


async def _count_is(client: NatsClient, stream: str, n: int) -> bool:
    try:
        return await _stream_messages(client, stream) == n
    except Exception:  # noqa: BLE001 - still reconnecting
        return False


# -- finding 5: one re-establishment at a time ------------------------------------------


async def test_two_quick_reconnections_leave_each_handler_one_subscription(
    nats_server: NatsServer,
) -> None:
    client = NatsClient(nats_server.url, settings=Settings())
    await client.connect(wait=15)
    # A slow on_connect step (registered before the fan-out's): the first re-establishment
    # is still in it when the second reconnection happens, and it lets the first go on at
    # the moment the second one starts, so the two would run side by side.
    gate = asyncio.Event()
    gate_calls: list[int] = []

    async def slow_step(c: NatsClient) -> None:
        gate_calls.append(1)
        if len(gate_calls) == 1:
            await gate.wait()
        else:
            gate.set()

    client.on_connect(slow_step)
    manager = NatsWebSocketManager(client)
    await manager.init()
    plain: list[Any] = []
    stream: list[bytes] = []
    feed: list[Any] = []
    try:
        sub = await client.subscribe("dup.x", plain.append)

        async def on_stream(msg: Msg) -> None:
            stream.append(msg.data)

        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.NONE, inactive_threshold=60.0)
        stream_sub = await client.subscribe_stream("TRADE_EVENTS", "trades.DUPS", on_stream, config=config)
        unsub_feed = await manager.subscribe_to_trade_events("DUP", feed.append)

        await asyncio.to_thread(nats_server.restart)
        await eventually(lambda: gate_calls, timeout=15, what="the first re-establishment in its slow step")
        await asyncio.to_thread(nats_server.restart)
        await eventually(lambda: len(gate_calls) >= 2, timeout=15, what="the second re-establishment")
        await client.wait_connected(15)

        for i in range(5):
            await client.publish("dup.x", i)
            await eventually(lambda i=i: _try_js(client, "trades.DUPS", i), timeout=10, what=f"stored {i}")
            await manager.publish_trade_event("DUP", {"i": i})
        await manager.flush()
        await eventually(lambda: len(plain) >= 5 and len(feed) >= 5, timeout=15, what="every message")
        await eventually(lambda: len(stream) >= 5, timeout=15, what="every stream message")
        await _settle(client)
        assert plain == list(range(5))
        assert feed == [{"i": i} for i in range(5)]
        assert stream == [b"%d" % i for i in range(5)]

        # After unsubscribing, nothing arrives: no subscription was left behind.
        await sub.unsubscribe()
        await stream_sub.unsubscribe()
        await unsub_feed()
        probe: list[Any] = []
        unsub_probe = await manager.subscribe_to_trade_events("DUP", probe.append)
        await client.publish("dup.x", 99)
        await client.js_publish("trades.DUPS", 99)
        await manager.publish_trade_event("DUP", {"i": 99})
        await manager.flush()
        await eventually(lambda: probe == [{"i": 99}], timeout=10, what="the probe trade")
        await _settle(client)
        assert plain == list(range(5))
        assert feed == [{"i": i} for i in range(5)]
        assert stream == [b"%d" % i for i in range(5)]
        await unsub_probe()
    finally:
        await manager.close()
        await client.close()


async def _try_js(client: NatsClient, subject: str, i: int) -> bool:
    try:
        await client.js_publish(subject, i, msg_id=f"dups-{i}")
    except NatsUnavailableError:
        return False
    return True


async def _settle(client: NatsClient) -> None:
    """Two round trips: anything the server had for us has been handed to the callbacks."""
    for _ in range(2):
        await client.flush()
        await asyncio.sleep(0)


async def test_a_cancelled_subscribe_leaves_no_subscription_behind(
    client: NatsClient, nats_server: NatsServer, make_client: Callable[..., Awaitable[NatsClient]]
) -> None:
    # A subscribe cancelled while it waits for the server's confirmation (a re-establishment
    # round replaced by a newer one, a caller's timeout) returned nothing to unsubscribe:
    # its handler must not go on receiving.
    publisher = await make_client()
    got: list[Any] = []
    tracked = len(client._subscriptions)
    assert nats_server.proc is not None
    with frozen(nats_server.proc.pid):
        task = asyncio.ensure_future(client.subscribe("cancelled.x", got.append))
        await eventually(lambda: len(client._subscriptions) > tracked, what="the subscription made")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(client._subscriptions) == tracked
    probe: list[Any] = []
    await client.subscribe("cancelled.x", probe.append)
    await publisher.publish("cancelled.x", 1)
    await eventually(lambda: probe == [1], what="the probe")
    await _settle(client)
    assert got == []


async def test_a_health_check_that_timed_out_leaves_the_connection_reading(
    client: NatsClient, nats_server: NatsServer, make_client: Callable[..., Awaitable[NatsClient]]
) -> None:
    # nats-py keeps the future of a timed-out flush; the late PONG used to stop its read
    # loop, and nothing arrived until missed pings forced a reconnect (~30 s).
    publisher = await make_client()
    got: asyncio.Queue[Any] = asyncio.Queue()
    await client.subscribe("pong.x", got.put)
    assert nats_server.proc is not None
    with frozen(nats_server.proc.pid):
        assert (await client.health())["connected"] is False  # its round trip timed out
    await eventually(lambda: not client.nc._pongs, what="the late PONG read")
    await publisher.publish("pong.x", 1)
    assert await asyncio.wait_for(got.get(), 5) == 1
    assert client.reconnects == 0 and client.is_connected
