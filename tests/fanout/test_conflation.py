"""Issue 12 item 4: a burst never loses trades silently.

Real uvicorn app, real nats-server, real ``websockets`` clients. With the default
``latest`` policy a client that falls behind is conflated, and every lost range is
announced by a ``gap`` frame it can recover with ``since_seq``; with ``"policy": "every"``
nothing is conflated or dropped, and a client that cannot keep up is closed with 1013
and a reason carrying the last seq it was sent.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from liquidcrypto.nats.embedded import NatsServer
from tests.fanout.support import WsClient, app_instances
from tests.fanout.test_e2e import publisher, stalled_socket

N_BURST = 2000
PAD_4K = "x" * 4096


async def read_burst(c: WsClient, symbol: str, n: int) -> tuple[dict[int, int], list[dict[str, Any]]]:
    """Read until the last trade of the burst: the trades received (seq -> i) and the gap frames."""
    got: dict[int, int] = {}
    gaps: list[dict[str, Any]] = []
    deadline = time.monotonic() + 120
    while True:
        frame = await c.recv(max(0.01, deadline - time.monotonic()))
        if frame["type"] == "gap":
            assert frame["symbol"] == symbol and frame["reason"] in ("conflated", "dropped"), frame
            assert frame["from_seq"] <= frame["to_seq"], frame
            gaps.append(frame)
        elif frame["type"] == "trade":
            got[frame["seq"]] = frame["data"]["i"]
            if frame["data"]["i"] == n - 1:
                return got, gaps


async def recover(c: WsClient, symbol: str, gaps: list[dict[str, Any]]) -> dict[int, int]:
    """Resume from the first gap with ``since_seq`` (a fresh subscription: history then live)."""
    await c.send({"action": "unsubscribe", "symbols": [symbol]})
    await c.recv_type("unsubscribed")
    await c.subscribe([symbol], since_seq=min(g["from_seq"] for g in gaps) - 1)
    replayed: dict[int, int] = {}
    deadline = time.monotonic() + 120
    while True:
        frame = await c.recv(max(0.01, deadline - time.monotonic()))
        if frame["type"] == "trade":
            replayed[frame["seq"]] = frame["data"]["i"]
        elif frame["type"] == "history":
            assert frame["complete"], frame
            return replayed


async def test_a_burst_to_two_fast_clients_is_complete_or_every_lost_range_is_announced(
    module_nats: NatsServer, tmp_path: Path
) -> None:
    # WS_CONFLATE_AT lowered from 256 to 8 so that the burst conflates in every run
    # (with 256 it did in 9 runs of 11); the queue, the policy and the burst are as reported.
    env = {"NATS_URL": module_nats.url, "WS_CONFLATE_AT": "8"}
    symbol = "XBURST"
    with app_instances(1, env, tmp_path) as (app,):
        clients = [await WsClient.connect(app.ws) for _ in range(2)]
        for c in clients:
            await c.subscribe([symbol])
        client, manager = await publisher(module_nats.url)
        try:
            pub = asyncio.ensure_future(_publish(manager, symbol, N_BURST))
            results = await asyncio.gather(*(read_burst(c, symbol, N_BURST) for c in clients))
            await pub
            lost_total = 0
            for c, (got, gaps) in zip(clients, results, strict=True):
                all_seqs = set(got)
                if gaps:
                    # Told exactly what is missing: the announced ranges hold no received
                    # trade, and received + announced-and-recovered is the whole burst.
                    replayed = await recover(c, symbol, gaps)
                    announced = {s for s in replayed if any(g["from_seq"] <= s <= g["to_seq"] for g in gaps)}
                    assert not announced & set(got)
                    lost_total += len(announced)
                    assert set(replayed) - set(got) == announced, "a trade was lost without a gap frame"
                    got = {**got, **replayed}
                    all_seqs = set(got)
                ordered = [got[s] for s in sorted(all_seqs)]
                assert ordered == list(range(N_BURST)), f"{len(ordered)} of {N_BURST}"
            stats = app.stats()
            totals = stats["clients_total"]
            assert totals["conflated"] + totals["dropped"] == lost_total, totals
            assert (totals["gaps"] > 0) == (lost_total > 0), totals
        finally:
            await manager.close()
            await client.close()
            for c in clients:
                await c.close()


async def _publish(manager: Any, symbol: str, n: int) -> None:
    for i in range(n):
        await manager.publish_trade_event(symbol, {"i": i, "pad": PAD_4K})
    await manager.flush(30)


async def test_policy_every_never_conflates_and_closes_a_slow_client_with_1013_and_its_last_seq(
    module_nats: NatsServer, tmp_path: Path
) -> None:
    env = {"NATS_URL": module_nats.url, "WS_QUEUE_SIZE": "64", "WS_CONFLATE_AT": "16", "WS_DISCONNECT_AFTER": "0"}
    symbol = "XEVERY"
    with app_instances(1, env, tmp_path) as (app,):
        slow = await WsClient.connect(app.ws, sock=stalled_socket(app.port), max_queue=1, compression=None)
        await slow.subscribe([symbol], policy="every")
        client, manager = await publisher(module_nats.url)
        try:
            pub = asyncio.ensure_future(_publish(manager, symbol, 3000))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await slow.recv(timeout=60)
            await pub
            rcvd = closed.value.rcvd
            assert rcvd is not None and rcvd.code == 1013, rcvd
            assert rcvd.reason.startswith("slow consumer; last_seq="), rcvd.reason
            last_seq = int(rcvd.reason.split("last_seq=")[1].split()[0])
            seqs = [f["seq"] for f in slow.frames if f["type"] == "trade"]
            # Nothing conflated nor dropped before the close, and the reason names the last sent.
            assert not any(f["type"] == "gap" or "missed" in f for f in slow.frames)
            assert seqs and seqs[-1] == last_seq
            ids = [f["data"]["i"] for f in slow.frames if f["type"] == "trade"]
            assert ids == list(range(len(ids)))
            stats = app.stats()["clients_total"]
            assert stats["conflated"] == stats["dropped"] == 0 and stats["slow_disconnects"] == 1, stats
        finally:
            await manager.close()
            await client.close()
            await slow.close()
