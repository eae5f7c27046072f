"""The per-client queue: graded back-pressure (conflate, drop oldest, disconnect), the
"missed" count, duplicate suppression and the history hand-over. Pure logic: the socket
is a coroutine writing into a list, gated by an event to simulate a stalled reader."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from liquidcrypto.errors import InvalidPayloadError
from liquidcrypto.fanout import protocol
from liquidcrypto.fanout.session import ClientSession, QueuePolicy, SymbolState


class Socket:
    def __init__(self) -> None:
        self.frames: list[dict[str, object]] = []
        self.open = asyncio.Event()
        self.open.set()

    async def send(self, text: str) -> None:
        await self.open.wait()
        self.frames.append(orjson.loads(text))


def trade(symbol: str, seq: int) -> str:
    return protocol.trade_frame(protocol.trade_frame_head(symbol), orjson.dumps({"i": seq}).decode(), seq)


def session_with(policy: QueuePolicy, *symbols: str, conflate: bool = True) -> tuple[ClientSession, Socket]:
    sock = Socket()
    s = ClientSession(sock.send, policy)
    for sym in symbols:
        s.symbols[sym] = SymbolState(conflate=conflate)
    return s, sock


async def drain(s: ClientSession, sock: Socket, expect: int) -> None:
    writer = asyncio.ensure_future(s.run_writer())
    try:
        for _ in range(1000):
            if len(sock.frames) >= expect and s.queued == 0:
                break
            await asyncio.sleep(0)
    finally:
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer


async def test_fast_client_gets_everything_in_order() -> None:
    s, sock = session_with(QueuePolicy(queue_size=8, conflate_at=4, disconnect_after=0), "A")
    writer = asyncio.ensure_future(s.run_writer())
    for seq in range(1, 101):
        s.offer_trade("A", seq, trade("A", seq))
        await asyncio.sleep(0)
    await drain(s, sock, 100)
    writer.cancel()
    assert [f["seq"] for f in sock.frames] == list(range(1, 101))
    assert s.dropped == s.conflated == 0 and "missed" not in sock.frames[-1]


async def test_drop_oldest_counts_and_tells_the_client_in_its_next_frame() -> None:
    s, sock = session_with(QueuePolicy(queue_size=10, conflate_at=0, disconnect_after=0), "A")
    for seq in range(1, 26):
        s.offer_trade("A", seq, trade("A", seq))
    assert s.queued == 10 and s.dropped == 15
    await drain(s, sock, 11)
    # First the gap frame naming the dropped range, with the count; then the trades.
    gap = {"type": "gap", "symbol": "A", "from_seq": 1, "to_seq": 15, "reason": "dropped", "missed": 15}
    assert sock.frames[0] == gap
    assert [f["seq"] for f in sock.frames[1:]] == list(range(16, 26))
    assert all("missed" not in f for f in sock.frames[1:])
    assert s.stats()["gaps"] == 1


async def test_batch_mode_sends_the_backlog_as_newline_separated_frames_in_one_message() -> None:
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    s = ClientSession(send, QueuePolicy(queue_size=10, conflate_at=0, disconnect_after=0), batch=True)
    s.symbols["A"] = SymbolState()
    for seq in range(1, 13):  # 2 dropped: the first frame of the batch says so
        s.offer_trade("A", seq, trade("A", seq))
    writer = asyncio.ensure_future(s.run_writer())
    for _ in range(100):
        if s.queued == 0 and sent:
            break
        await asyncio.sleep(0)
    s.offer_trade("A", 13, trade("A", 13))  # alone in the queue: a message of one frame
    for _ in range(100):
        if len(sent) == 2:
            break
        await asyncio.sleep(0)
    writer.cancel()
    frames = [[orjson.loads(line) for line in message.split("\n")] for message in sent]
    assert frames[0][0] == {"type": "gap", "symbol": "A", "from_seq": 1, "to_seq": 2, "reason": "dropped", "missed": 2}
    assert [[f["seq"] for f in m] for m in [frames[0][1:], frames[1]]] == [list(range(3, 13)), [13]]
    assert all("missed" not in f for f in frames[0][1:])
    assert s.sent == 12


@pytest.mark.parametrize(("delay", "messages"), [(0.0, 2), (0.3, 1)])
async def test_write_delay_collects_frames_arriving_after_the_first(delay: float, messages: int) -> None:
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    policy = QueuePolicy(queue_size=10, conflate_at=0, disconnect_after=0, write_delay=delay)
    s = ClientSession(send, policy, batch=True)
    s.symbols["A"] = SymbolState()
    writer = asyncio.ensure_future(s.run_writer())
    await asyncio.sleep(0.01)
    s.offer_trade("A", 1, trade("A", 1))
    await asyncio.sleep(0.05)  # within the delay, well after an immediate send
    s.offer_trade("A", 2, trade("A", 2))
    for _ in range(200):
        if s.sent == 2:
            break
        await asyncio.sleep(0.01)
    writer.cancel()
    assert s.sent == 2 and len(sent) == messages
    with pytest.raises(ValueError, match="write_delay"):
        QueuePolicy(write_delay=2)


async def test_conflation_keeps_the_latest_trade_per_symbol() -> None:
    s, sock = session_with(QueuePolicy(queue_size=100, conflate_at=2, disconnect_after=0), "A", "B")
    for seq in range(1, 41):
        sym = "A" if seq % 2 else "B"
        s.offer_trade(sym, seq, trade(sym, seq))
    # Two queued, then each new trade replaced the queued one of its symbol.
    assert s.queued == 2 and s.conflated == 38 and s.dropped == 0
    await drain(s, sock, 4)
    # Each symbol's conflated range is announced just before its trade that replaced them.
    assert sock.frames == [
        {"type": "gap", "symbol": "A", "from_seq": 1, "to_seq": 37, "reason": "conflated", "missed": 38},
        orjson.loads(trade("A", 39)),
        {"type": "gap", "symbol": "B", "from_seq": 2, "to_seq": 38, "reason": "conflated"},
        orjson.loads(trade("B", 40)),
    ]


async def test_a_dropped_range_with_no_later_trade_queued_is_announced_when_the_writer_catches_up() -> None:
    s, sock = session_with(QueuePolicy(queue_size=2, conflate_at=0, disconnect_after=0), "A", "B")
    for sym, seq in (("A", 1), ("B", 2), ("B", 3), ("B", 4)):
        s.offer_trade(sym, seq, trade(sym, seq))
    await drain(s, sock, 4)
    assert [(f["type"], f.get("seq"), f.get("from_seq"), f.get("to_seq")) for f in sock.frames] == [
        ("gap", None, 2, 2),  # B 2 dropped: announced before B 3
        ("trade", 3, None, None),
        ("trade", 4, None, None),
        ("gap", None, 1, 1),  # A 1 dropped, no trade of A follows: announced once caught up
    ]
    assert sock.frames[-1]["symbol"] == "A" and sock.frames[-1]["reason"] == "dropped"


async def test_conflated_then_dropped_is_one_range() -> None:
    s, sock = session_with(QueuePolicy(queue_size=3, conflate_at=2, disconnect_after=0), "A", "B")
    for sym, seq in (("A", 1), ("B", 2), ("A", 3), ("A", 4)):  # A 1 -> 3 -> 4: 1 and 3 conflated
        s.offer_trade(sym, seq, trade(sym, seq))
    s.offer('{"type":"pong"}')  # queue [A4, B2, pong]
    s.offer('{"type":"pong"}')  # full: A 4 dropped, carrying its conflated 1..3
    await drain(s, sock, 4)
    gaps = [f for f in sock.frames if f["type"] == "gap"]
    assert gaps == [{"type": "gap", "symbol": "A", "from_seq": 1, "to_seq": 4, "reason": "dropped"}]
    assert s.conflated == 2 and s.dropped == 1


async def test_policy_every_never_conflates_and_closes_instead_of_dropping() -> None:
    s, sock = session_with(QueuePolicy(queue_size=4, conflate_at=2, disconnect_after=0), "A", conflate=False)
    for seq in range(1, 3):
        s.offer_trade("A", seq, trade("A", seq))
    await drain(s, sock, 2)
    for seq in range(3, 7):
        s.offer_trade("A", seq, trade("A", seq))
    assert not s.kicked.is_set() and s.conflated == s.dropped == 0
    s.offer_trade("A", 7, trade("A", 7))
    assert s.kicked.is_set() and s.close_code == 1013
    assert s.close_reason == "slow consumer; last_seq=2 (A)"
    assert s.dropped == 0 and s.queued == 0


async def test_no_conflation_when_the_subscription_forbids_it() -> None:
    s, _ = session_with(QueuePolicy(queue_size=100, conflate_at=2, disconnect_after=0), "A", conflate=False)
    for seq in range(1, 51):
        s.offer_trade("A", seq, trade("A", seq))
    assert s.queued == 50 and s.conflated == 0


async def test_disconnect_past_the_last_threshold_with_1013() -> None:
    s, _ = session_with(QueuePolicy(queue_size=10, conflate_at=0, disconnect_after=20), "A")
    for seq in range(1, 30):
        s.offer_trade("A", seq, trade("A", seq))
    assert not s.kicked.is_set()  # 19 dropped so far
    s.offer_trade("A", 30, trade("A", 30))
    assert s.kicked.is_set() and s.close_code == 1013 and "too slow" in s.close_reason
    assert s.queued == 0  # a closed client holds no memory


async def test_progress_resets_the_disconnect_counter() -> None:
    s, sock = session_with(QueuePolicy(queue_size=4, conflate_at=0, disconnect_after=10), "A")
    seq = 0
    for _ in range(5):
        for _ in range(12):  # 8 drops each round, under the threshold of 10
            seq += 1
            s.offer_trade("A", seq, trade("A", seq))
        await drain(s, sock, len(sock.frames) + 4)
    assert not s.kicked.is_set() and s.dropped == 40


async def test_duplicates_and_old_sequences_are_not_sent_again() -> None:
    s, sock = session_with(QueuePolicy(queue_size=100, conflate_at=0, disconnect_after=0), "A")
    for seq in (1, 2, 2, 3, 1, 4):
        s.offer_trade("A", seq, trade("A", seq))
    await drain(s, sock, 4)
    assert [f["seq"] for f in sock.frames] == [1, 2, 3, 4] and s.duplicates == 2


async def test_history_hand_over_holds_live_then_skips_what_history_sent() -> None:
    s, sock = session_with(QueuePolicy(queue_size=100, conflate_at=50, disconnect_after=0), "A")
    s.begin_replay("A")
    for seq in (8, 9, 10, 11):  # live arrives while history is being read
        s.offer_trade("A", seq, trade("A", seq))
    for seq in range(3, 10):  # history up to the last stored sequence (9)
        await s.put_history("A", seq, trade("A", seq))
    await s.end_replay("A")
    await drain(s, sock, 9)
    assert [f["seq"] for f in sock.frames] == list(range(3, 12))


async def test_history_waits_for_room_instead_of_dropping() -> None:
    s, sock = session_with(QueuePolicy(queue_size=8, conflate_at=4, disconnect_after=0), "A")
    sock.open.clear()
    writer = asyncio.ensure_future(s.run_writer())

    async def replay() -> None:
        for seq in range(1, 41):
            await s.put_history("A", seq, trade("A", seq))

    task = asyncio.ensure_future(replay())
    for _ in range(50):
        await asyncio.sleep(0)
    assert not task.done() and s.dropped == 0 and s.queued <= 4
    sock.open.set()
    await asyncio.wait_for(task, 5)
    await drain(s, sock, 40)
    writer.cancel()
    assert [f["seq"] for f in sock.frames] == list(range(1, 41)) and s.dropped == s.conflated == 0


def test_policy_rejects_an_empty_queue() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        QueuePolicy(queue_size=0)


def test_subscribe_policy_and_the_older_conflate_flag() -> None:
    def policy(extra: str) -> str:
        frame = protocol.parse_client_frame('{"action":"subscribe","symbols":["A"]' + extra + "}", max_symbols=3)
        assert isinstance(frame, protocol.Subscribe)
        return frame.policy

    assert policy("") == "latest"
    assert policy(',"policy":"every"') == "every"
    assert policy(',"conflate":false') == "every"
    assert policy(',"conflate":true,"policy":"latest"') == "latest"
    with pytest.raises(InvalidPayloadError, match="'sometimes'"):
        policy(',"policy":"sometimes"')
    with pytest.raises(InvalidPayloadError, match="contradicts"):
        policy(',"conflate":true,"policy":"every"')


def test_client_frames_are_validated() -> None:
    parse = protocol.parse_client_frame
    assert parse('{"action":"subscribe","symbols":["BTCUSDT"],"last":5}', max_symbols=3) == protocol.Subscribe(
        symbols=("BTCUSDT",), last=5
    )
    assert parse(b'{"action":"ping"}', max_symbols=3) == protocol.Ping()
    for bad, match in [
        ("not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"action":"dance"}', "unknown action"),
        ('{"action":"subscribe","symbols":[]}', "non-empty"),
        ('{"action":"subscribe","symbols":["BTC.USD"]}', "BTC.USD"),
        ('{"action":"subscribe","symbols":["A","B","C","D"]}', "limit of 3"),
        ('{"action":"subscribe","symbols":["A"],"since_seq":-1}', "since_seq"),
        ('{"action":"subscribe","symbols":["A"],"since_seq":1,"last":2}', "not both"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse(bad, max_symbols=3)


def test_trade_frame_embeds_the_published_json_unchanged() -> None:
    data = '{"price":95000.5,"volume":1.5,"tags":["a"],"nested":{"x":null}}'
    frame = orjson.loads(protocol.trade_frame(protocol.trade_frame_head('we"ird'), data, 42))
    assert frame == {"type": "trade", "symbol": 'we"ird', "data": orjson.loads(data), "seq": 42}
    assert orjson.loads(protocol.with_missed(protocol.frame("pong"), 3)) == {"type": "pong", "missed": 3}


async def test_wait_room_waits_until_a_page_fits_below_the_soft_limit() -> None:
    s, sock = session_with(QueuePolicy(queue_size=20, conflate_at=10, disconnect_after=0), "A")
    assert await s.wait_room(100) == 10  # capped at the soft limit; an empty queue has room for it
    sock.open.clear()
    writer = asyncio.ensure_future(s.run_writer())
    for seq in range(1, 11):
        await s.put_history("A", seq, trade("A", seq))
    room = asyncio.ensure_future(s.wait_room(4))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not room.done()  # the client does not read: nothing to fetch
    sock.open.set()
    assert await asyncio.wait_for(room, 5) >= 4
    writer.cancel()


async def test_pending_replays_are_tracked_and_a_kick_releases_every_waiter() -> None:
    s, _ = session_with(QueuePolicy(queue_size=4, conflate_at=2, disconnect_after=0), "A", "B")
    await asyncio.wait_for(s.wait_replays(), 1)  # none pending
    s.replays_started(["A", "B"])
    assert s.replay_pending("A") and s.replay_pending("B")
    waiting = asyncio.ensure_future(s.wait_replays())
    s.replay_finished("A")
    await asyncio.sleep(0)
    assert not waiting.done() and not s.replay_pending("A")
    s.replay_finished("B")
    await asyncio.wait_for(waiting, 1)
    s.replays_started(["A"])
    s.offer("{}")
    s.offer("{}")  # full to its soft limit, and no writer
    room = asyncio.ensure_future(s.wait_room(2))
    waiting = asyncio.ensure_future(s.wait_replays())
    await asyncio.sleep(0)
    s.kick(1001, "bye")
    assert await asyncio.wait_for(room, 1) == 0
    await asyncio.wait_for(waiting, 1)
