"""Support of ``test_hostile.py``: a raw WebSocket client that can send anything, and the
*witness*, a separate process that publishes trades at a steady rate and reads them back
through two honest ``/ws`` clients, checking every trade arrives once, in order.

The witness runs in its own process so that the attacks (run by the test process) cannot
slow the honest clients down on the client side: a latency it measures is the service's.

    python -m tests.fanout.hostile --nats URL --ws URL --token T [--rate 100] [--store 10000]

It stores ``--store`` padded BTCUSDT trades first (the history the replay flood asks
for), connects the two clients (one sends the token as ``Authorization: Bearer``, the
other as the ``bearer.`` subprotocol), subscribes both to BTCUSDT, prints ``{"ready": ...}``
and publishes ``{"n": i, "t": time}`` trades on BTCUSDT at ``--rate`` per second. For each
line ``check NAME`` on its stdin it waits (up to 15 s) until both clients have every trade
published so far and prints one JSON line: published, per client what it received, and
the latency of the trades received since the previous check.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets

from liquidcrypto.config import Settings
from liquidcrypto.fanout.manager import NatsWebSocketManager
from liquidcrypto.nats.client import NatsClient

SYMBOL = "BTCUSDT"
STORED_PAD = "x" * 520  # stored trades of ~600 bytes: 10,000 of them overflow a socket's buffers
CHECK_TIMEOUT = 15.0

# -- a raw WebSocket client -----------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING = 0x0, 0x1, 0x2, 0x8, 0x9


def ws_frame(payload: bytes, opcode: int = OP_TEXT, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    """One WebSocket frame as a client sends it (masked unless ``mask=False``)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def upgrade_request(host: str, port: int, headers: dict[str, str] | None = None, path: str = "/ws") -> bytes:
    """The HTTP request of a WebSocket handshake."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawWs:
    """A WebSocket client on a bare socket: sends whatever bytes it is given, reads only
    when asked (its receive buffer is tiny, so a client that does not read really stalls)."""

    def __init__(self, sock: socket.socket, buffered: bytes) -> None:
        self.sock = sock
        self.buffered = buffered  # what came after the handshake answer

    @staticmethod
    async def open_socket(host: str, port: int, rcvbuf: int | None = 4096) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        return sock

    @classmethod
    async def connect(cls, host: str, port: int, headers: dict[str, str] | None = None) -> RawWs:
        """Open a WebSocket (the handshake must succeed)."""
        loop = asyncio.get_running_loop()
        sock = await cls.open_socket(host, port)
        await loop.sock_sendall(sock, upgrade_request(host, port, headers))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
            assert chunk, f"closed during the handshake: {head[:200]!r}"
            head += chunk
        status, _, rest = head.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 101"), status[:200]
        return cls(sock, rest)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def read_until_closed(self, timeout: float = 10.0) -> bytes:
        """Everything the server sends until it closes the connection or sends a close frame
        (it then waits for the client's close frame, which this client never sends)."""
        loop = asyncio.get_running_loop()
        data = self.buffered
        deadline = time.monotonic() + timeout
        while close_code_of(data) is None:
            left = deadline - time.monotonic()
            assert left > 0, f"not closed by the server within {timeout} s (read {len(data)} bytes)"
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), left)
            except ConnectionResetError:
                return data
            except TimeoutError:
                raise AssertionError(f"not closed by the server within {timeout} s (read {len(data)} bytes)") from None
            if not chunk:
                return data
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each complete unmasked server frame in ``data``."""
    frames = []
    i = 0
    while i + 2 <= len(data):
        opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            (n,) = struct.unpack("!H", data[i : i + 2])
            i += 2
        elif n == 127:
            (n,) = struct.unpack("!Q", data[i : i + 8])
            i += 8
        if i + n > len(data):
            break
        frames.append((opcode, data[i : i + n]))
        i += n
    return frames


def close_code_of(data: bytes) -> int | None:
    """The code of the close frame in what the server sent, if any."""
    for opcode, payload in server_frames(data):
        if opcode == OP_CLOSE and len(payload) >= 2:
            code: int = struct.unpack("!H", payload[:2])[0]
            return code
    return None


# -- the witness ------------------------------------------------------------------------


@dataclass
class Honest:
    """What one honest client received."""

    name: str
    next_n: int = 0
    received: int = 0
    last_seq: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (expected n, got n)
    duplicates: int = 0
    seq_backwards: int = 0
    missed: int = 0
    errors: list[str] = field(default_factory=list)
    closed: str | None = None
    latencies: list[float] = field(default_factory=list)

    def on_message(self, raw: str | bytes) -> None:
        now = time.time()
        frame = orjson.loads(raw)
        if "missed" in frame:
            self.missed += frame["missed"]
        if frame.get("type") == "error":
            self.errors.append(frame.get("message", ""))
        if frame.get("type") != "trade":
            return
        n = frame["data"].get("n")
        if n is None:  # a stored trade (never sent live to this client)
            return
        if frame["seq"] <= self.last_seq:
            self.seq_backwards += 1
        self.last_seq = frame["seq"]
        if n < self.next_n:
            self.duplicates += 1
            return
        if n > self.next_n:
            self.gaps.append((self.next_n, n))
        self.next_n = n + 1
        self.received += 1
        self.latencies.append(now - frame["data"]["t"])

    def report(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        self.latencies = []
        return {
            "name": self.name,
            "received": self.received,
            "next_n": self.next_n,
            "gaps": self.gaps[:5],
            "duplicates": self.duplicates,
            "seq_backwards": self.seq_backwards,
            "missed": self.missed,
            "errors": self.errors[:5],
            "closed": self.closed,
            "p50_ms": round(percentile(lat, 0.5) * 1000, 1),
            "p99_ms": round(percentile(lat, 0.99) * 1000, 1),
            "max_ms": round(lat[-1] * 1000, 1) if lat else None,
        }


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of sorted ``values`` (0 when empty)."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, int(len(values) * q + 0.5) - 1))]


async def _read(conn: Any, honest: Honest) -> None:
    try:
        async for raw in conn:
            honest.on_message(raw)
    except websockets.ConnectionClosed as exc:
        honest.closed = repr(exc)
    else:
        honest.closed = "closed by the server"


async def witness(nats_url: str, ws_url: str, token: str, rate: float, store: int) -> None:
    client = NatsClient(nats_url, settings=Settings())
    await client.connect(wait=15)
    manager = NatsWebSocketManager(client, settings=Settings())
    await manager.init()
    for i in range(store):
        await manager.publish_trade_event(SYMBOL, {"i": i, "price": 95000.0, "volume": 1.5, "pad": STORED_PAD})
    await manager.flush(30)

    clients = [Honest("bearer-header"), Honest("bearer-subprotocol")]
    conns = [
        await websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}),
        await websockets.connect(ws_url, subprotocols=["liquidcrypto", f"bearer.{token}"]),  # type: ignore[list-item]
    ]
    for conn in conns:
        assert orjson.loads(await conn.recv())["type"] == "welcome"
        await conn.send(orjson.dumps({"action": "subscribe", "symbols": [SYMBOL]}).decode())
        assert orjson.loads(await conn.recv())["type"] == "subscribed"
    readers = [asyncio.ensure_future(_read(conn, h)) for conn, h in zip(conns, clients, strict=True)]
    published = 0

    async def produce() -> None:
        nonlocal published
        start = time.monotonic()
        while True:
            await manager.publish_trade_event(SYMBOL, {"n": published, "t": time.time(), "price": 95000.0})
            published += 1
            await asyncio.sleep(max(0.0, start + published / rate - time.monotonic()))

    producer = asyncio.ensure_future(produce())
    out = sys.stdout
    out.write(orjson.dumps({"ready": True, "pid": os.getpid()}).decode() + "\n")
    out.flush()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        while line := (await stdin.readline()).decode().strip():
            name = line.removeprefix("check ").strip()
            target = published
            deadline = time.monotonic() + CHECK_TIMEOUT
            while any(h.next_n < target and h.closed is None for h in clients) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            report = {"check": name, "published": target, "clients": [h.report() for h in clients]}
            out.write(orjson.dumps(report).decode() + "\n")
            out.flush()
    finally:
        producer.cancel()
        for r in readers:
            r.cancel()
        for conn in conns:
            await conn.close()
        await manager.close()
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats", required=True)
    parser.add_argument("--ws", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--store", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(witness(args.nats, args.ws, args.token, args.rate, args.store))


if __name__ == "__main__":
    main()
