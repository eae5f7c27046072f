"""The one module that touches nats-py internals: the real path on a live connection,
and the fallback when a nats-py release no longer has the attribute."""

from __future__ import annotations

import asyncio

import nats
import pytest

from liquidcrypto.nats import hooks
from liquidcrypto.nats.client import NatsClient, flush_barrier
from liquidcrypto.nats.embedded import NatsServer


async def test_server_id_of_a_live_connection(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        sid = hooks.server_id(nc)
        assert sid is not None and sid.startswith("N")
    finally:
        await nc.close()


async def test_client_reports_the_server_id_through_the_hook(client: NatsClient) -> None:
    assert client.server_id == hooks.server_id(client.nc)
    assert client.server_id is not None


def test_server_id_falls_back_to_none_without_the_attribute() -> None:
    class Bare:
        pass

    class Odd:
        _server_info = "not a mapping"

    class Empty:
        _server_info: dict[str, object] = {}

    assert hooks.server_id(Bare()) is None
    assert hooks.server_id(Odd()) is None
    assert hooks.server_id(Empty()) is None


async def test_flush_pending_waits_for_the_flusher_of_a_live_connection(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        await nc.publish("hook.x", b"1")
        assert nc.pending_data_size > 0  # queued for the flusher task, not written yet
        assert await hooks.flush_pending(nc, 2.0) is True
        assert nc.pending_data_size == 0  # the flusher wrote everything queued so far
    finally:
        await nc.close()


class _FlushOnly:
    """A connection-like object with a public ``flush`` and no private hook."""

    def __init__(self) -> None:
        self.flushes: list[float] = []

    async def flush(self, timeout: float = 2) -> None:
        self.flushes.append(timeout)


async def test_flush_pending_falls_back_to_nothing_without_the_attribute() -> None:
    assert await hooks.flush_pending(_FlushOnly(), 1.0) is False


async def test_flush_barrier_without_the_hook_is_a_plain_flush() -> None:
    conn = _FlushOnly()
    await flush_barrier(conn, 3.0)  # type: ignore[arg-type]
    assert conn.flushes == [3]


async def test_flush_pending_has_a_deadline() -> None:
    class Stuck:
        async def _flush_pending(self, force_flush: bool = False) -> None:
            await asyncio.Event().wait()

    with pytest.raises(TimeoutError):
        await hooks.flush_pending(Stuck(), 0.05)


async def test_forget_abandoned_pongs_keeps_the_queue_in_step() -> None:
    class WithPongs:
        def __init__(self) -> None:
            loop = asyncio.get_running_loop()
            self._pongs: list[asyncio.Future[bool]] = [loop.create_future() for _ in range(3)]

    conn = WithPongs()
    live = conn._pongs[2]
    conn._pongs[0].cancel()
    conn._pongs[1].cancel()
    assert hooks.forget_abandoned_pongs(conn) == 2
    assert len(conn._pongs) == 3  # one future per PING sent, in order
    assert not any(f.cancelled() for f in conn._pongs) and conn._pongs[2] is live
    for f in conn._pongs:
        f.set_result(True)  # what nats-py does per PONG: no InvalidStateError now


def test_forget_abandoned_pongs_falls_back_to_nothing_without_the_attribute() -> None:
    class Bare:
        pass

    class Odd:
        _pongs = "not a list"

    assert hooks.forget_abandoned_pongs(Bare()) == 0
    assert hooks.forget_abandoned_pongs(Odd()) == 0


def test_strict_message_parser_splits_only_on_space_and_tab(monkeypatch: pytest.MonkeyPatch) -> None:
    from nats.protocol import parser

    assert hooks.strict_message_parser()
    m = parser.MSG_RE.match(b"MSG a\x0bb 1 _INBOX.x 5\r\n")
    assert m is not None and m.group(1) == b"a\x0bb" and m.group(4) == b"_INBOX.x"
    h = parser.HMSG_RE.match(b"HMSG a\x0cb\t9 12 17\r\n")
    assert h is not None and (h.group(1), h.group(2), h.group(5), h.group(6)) == (b"a\x0cb", b"9", b"12", b"17")
    monkeypatch.delattr(parser, "MSG_RE")
    assert hooks.strict_message_parser() is False  # a nats-py without the pattern: left alone


async def test_read_loop_stopped_and_force_reconnect_on_a_live_connection(client: NatsClient) -> None:
    nc = client.nc
    assert hooks.read_loop_stopped(nc) is False
    before = client.reconnects
    assert await hooks.force_reconnect(nc) is True
    await client.wait_connected(15)
    assert client.reconnects == before + 1 and client.nc is nc
    assert hooks.read_loop_stopped(nc) is False


async def test_read_loop_stopped_and_force_reconnect_fall_back_without_the_attributes() -> None:
    class Bare:
        is_connected = True

    class Closable:
        closed = False

        async def close(self) -> None:
            self.closed = True

    assert hooks.read_loop_stopped(Bare()) is False
    done: asyncio.Task[None] = asyncio.ensure_future(asyncio.sleep(0))
    await done

    class DeadButDisconnected:
        _reading_task = done
        is_connected = False

    class Dead:
        _reading_task = done
        is_connected = True

    assert hooks.read_loop_stopped(DeadButDisconnected()) is False
    assert hooks.read_loop_stopped(Dead()) is True
    closable = Closable()
    assert await hooks.force_reconnect(closable) is False
    assert closable.closed
    assert await hooks.force_reconnect(Bare()) is False  # nothing to do it with: no error
