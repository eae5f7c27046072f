"""Benchmark: WebSocket trade fan-out, three backends side by side.

* **in-process** — the baseline: one app process whose publisher hands each trade
  straight to the fan-out (no broker): the physical limit of one Python process.
* **nats** — two app processes (uvicorn) on one nats-server; trades published through
  ``publish_trade_event`` (JetStream, bounded ack window) from the benchmark process.
* **redis** — the same two app processes with ``WS_BACKEND=redis``.

For each backend and client count, clients (``websockets``, no compression, spread over
two worker processes and over the instances) subscribe to one symbol; trades are
offered at a fixed rate for a few seconds. Reported: frames delivered per second over
all clients (counted until the last frame arrived), the share of what was offered,
publish -> receive latency p50/p99 (each trade carries its ``time.time()``), frames the
apps conflated or dropped for clients that fell behind (their ``/api/v1/ws/stats``), and
app memory per connected client (RSS growth / clients).

Targets (issue 5): nats >= 70 % of the in-process baseline's delivered frames/s;
p99 < 50 ms at 100 clients x 1,000 trades/s; a stalled client costs bounded memory
(the stalled-client row: RSS growth of an app while one client never reads).

By default the clients ask for newline-batched messages (``/ws?batch=1``) and the apps
run with ``WS_WRITE_DELAY=0.005``, the configuration for high-rate clients;
``--no-batch --write-delay 0`` measures plain one-frame-per-message clients.

``python benchmarks/websocket_fanout.py [--quick] [--clients 100,1000] [--rate 1000] [--seconds 4]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import httpx
import orjson
from rich.console import Console
from rich.table import Table

from liquidcrypto.bench.websocket_clients import run_loop
from liquidcrypto.config import Settings
from liquidcrypto.fanout.backend import OnBroadcast, OnTrade
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer, free_port

SYMBOL = "BENCH"
WORKERS = 2
PAD = "x" * 64


# -- the in-process baseline ------------------------------------------------------


class MemoryBackend:
    """No broker: ``publish`` calls the fan-out directly (the baseline)."""

    name = "in-process"
    supports_history = False

    def __init__(self) -> None:
        self._on_trade: OnTrade | None = None
        self._seq = itertools.count(1)
        self._feeds: set[str] = set()

    async def start(self, on_trade: OnTrade, on_broadcast: OnBroadcast) -> None:
        self._on_trade = on_trade

    async def stop(self) -> None:
        self._feeds.clear()

    async def publish(self, symbol: str, payload: bytes) -> None:
        assert self._on_trade is not None
        if symbol in self._feeds:
            self._on_trade(symbol, next(self._seq), payload)

    async def flush(self, timeout: float = 10.0) -> None:
        return None

    async def broadcast(self, payload: bytes) -> None:
        return None

    async def open_feed(self, symbol: str) -> None:
        self._feeds.add(symbol)

    async def close_feed(self, symbol: str) -> None:
        self._feeds.discard(symbol)

    async def history(
        self, symbol: str, *, since_seq: int | None, last: int | None, limit: int
    ) -> tuple[list[tuple[int, bytes]], bool]:
        return [], False

    def stats(self) -> dict[str, int]:
        return {}


async def paced_publish(
    publish: Callable[[str, Any], Awaitable[None]], rate: float, seconds: float, pad: str = PAD
) -> int:
    """Publish ``rate`` trades/s for ``seconds``; each carries its publish time ``t``."""
    start = time.monotonic()
    sent = 0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= seconds:
            return sent
        due = int(rate * elapsed) + 1
        while sent < due:
            await publish(SYMBOL, {"price": 95000.5 + sent % 100, "volume": 1.5, "t": time.time(), "pad": pad})
            sent += 1
        await asyncio.sleep(0.002)


def baseline_app() -> Any:
    """The baseline ASGI app: ``/ws`` + stats + ``POST /bench/publish`` inside the process."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute

    from liquidcrypto.app import tune_gc
    from liquidcrypto.fanout.endpoint import websocket_endpoint
    from liquidcrypto.fanout.manager import NatsWebSocketManager

    settings = Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        manager = NatsWebSocketManager(settings=settings, transport=MemoryBackend())
        await manager.init()
        app.state.ws_manager = manager
        tune_gc(settings.gc_gen0_threshold)  # as the real app does
        try:
            yield
        finally:
            await manager.close()

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(request.app.state.ws_manager.stats())

    async def publish(request: Request) -> JSONResponse:
        body = await request.json()
        manager = request.app.state.ws_manager
        sent = await paced_publish(manager.publish_trade_event, body["rate"], body["seconds"])
        return JSONResponse({"sent": sent})

    routes = [
        Route("/api/v1/ws/stats", stats),
        Route("/bench/publish", publish, methods=["POST"]),
        WebSocketRoute("/ws", websocket_endpoint),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


# -- processes ------------------------------------------------------------------------


@dataclass
class App:
    port: int
    proc: subprocess.Popen[bytes]
    log: IO[bytes]

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


def start_app(target: str, env: dict[str, str], log: Path) -> App:
    port = free_port()
    out = open(log, "ab")  # noqa: SIM115 - closed by stop_app
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            target,
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--ws-per-message-deflate",
            "false",
        ],
        env={**os.environ, **env},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/ws/stats", timeout=1).status_code == 200:
                return App(port, proc, out)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            out.close()
            raise RuntimeError(f"app {target} did not start; see {log}")
        time.sleep(0.05)


def stop_app(app: App) -> None:
    app.proc.terminate()
    try:
        app.proc.wait(10)
    except subprocess.TimeoutExpired:
        app.proc.kill()
        app.proc.wait(5)
    app.log.close()


@contextmanager
def apps(target: str, count: int, env: dict[str, str], log: Path) -> Iterator[list[App]]:
    started: list[App] = []
    try:
        for _ in range(count):
            started.append(start_app(target, env, log))
        yield started
    finally:
        for a in started:
            stop_app(a)


@contextmanager
def redis_server(tmp: Path, port: int | None = None) -> Iterator[str | None]:
    """Run redis-server from ``PATH`` (on ``port`` or a free one) in ``tmp`` and yield its
    URL, or ``None`` when it is not installed; stopped on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = port or free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


# -- the cases -------------------------------------------------------------------------


@dataclass
class Result:
    backend: str
    clients: int
    offered: float
    delivered_per_s: float
    delivered_share: float
    p50_ms: float
    p99_ms: float
    missed: int
    mem_per_client: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run_case(
    backend: str,
    instances: list[App],
    clients: int,
    rate: float,
    seconds: float,
    publish: Callable[[float, float], Awaitable[int]],
    batch: bool = True,
) -> Result:
    rss0 = sum(a.rss() for a in instances)
    lost0 = await lost_frames(instances)
    urls = [a.ws for a in instances]
    per = [clients // WORKERS + (i < clients % WORKERS) for i in range(WORKERS)]
    workers = []
    code = "from liquidcrypto.bench.websocket_clients import worker_main; worker_main()"
    for n in per:
        spec = orjson.dumps({"urls": urls, "count": n, "batch": batch}).decode()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            spec,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,
        )
        workers.append(proc)
    for proc in workers:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        if line.strip() != b"ready":
            raise RuntimeError(f"client worker failed: {line!r}")
    rss1 = sum(a.rss() for a in instances)
    t0 = time.time()
    sent = await publish(rate, seconds)
    # Let what is queued drain (bounded), then count what arrived until the last frame.
    await asyncio.sleep(min(3.0, max(0.5, seconds / 2)))
    reports = []
    for proc in workers:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"stop\n")
        await proc.stdin.drain()
        reports.append(orjson.loads(await asyncio.wait_for(proc.stdout.readline(), 60)))
        await proc.wait()
    received = sum(r["received"] for r in reports)
    elapsed = max([r["last"] for r in reports] + [t0 + seconds]) - t0
    lat = [x for r in reports for x in r["latencies"]]
    return Result(
        backend=backend,
        clients=clients,
        offered=sent / seconds,
        delivered_per_s=received / elapsed,
        delivered_share=received / max(1, sent * clients),
        p50_ms=percentile(lat, 0.5) * 1000,
        p99_ms=percentile(lat, 0.99) * 1000,
        missed=await lost_frames(instances) - lost0,
        mem_per_client=(rss1 - rss0) / max(1, clients),
    )


async def lost_frames(instances: list[App]) -> int:
    """Trades conflated or dropped for slow clients so far, over ``instances``."""
    total = 0
    async with httpx.AsyncClient() as http:
        for a in instances:
            stats = (await http.get(f"http://127.0.0.1:{a.port}/api/v1/ws/stats", timeout=10)).json()
            total += stats["clients_total"]["dropped"] + stats["clients_total"]["conflated"]
    return int(total)


async def stalled_client_memory(app: App, publish: Callable[[str, Any], Awaitable[None]], seconds: float) -> str:
    """RSS growth of ``app`` while one subscribed client never reads (2 KiB trades)."""
    import websockets

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", app.port))
    sock.setblocking(False)
    ws = await websockets.connect(app.ws, sock=sock, compression=None, max_queue=1)
    await ws.send(orjson.dumps({"action": "subscribe", "symbols": [SYMBOL]}).decode())
    rss0 = app.rss()
    sent = await paced_publish(publish, 5000, seconds, pad="x" * 2048)
    await asyncio.sleep(0.5)
    grown = app.rss() - rss0
    async with httpx.AsyncClient() as http:
        stats = (await http.get(f"http://127.0.0.1:{app.port}/api/v1/ws/stats", timeout=5)).json()["clients_total"]
    ws.transport.abort()
    return (
        f"stalled client: {sent:,} trades of 2 KiB ({sent * 2 / 1024:.0f} MiB) published, app RSS grew "
        f"{grown / 1e6:.1f} MB, "
        f"queued {stats['queued']} (limit {Settings.from_env().ws_queue_size}), dropped {stats['dropped']:,}, "
        f"conflated {stats['conflated']:,}"
    )


async def run(args: argparse.Namespace) -> tuple[list[Result], list[str]]:
    results: list[Result] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lc-ws-bench-") as tmpdir:
        tmp = Path(tmpdir)
        log = tmp / "apps.log"
        base_env = {
            "WS_MAX_CLIENTS": "100000",
            "WS_QUEUE_SIZE": str(args.queue),
            "WS_WRITE_DELAY": str(args.write_delay),
        }

        if "in-process" in args.backends:
            with apps("liquidcrypto.bench.websocket_fanout:baseline_app", 1, base_env, log) as (app,):

                async def publish_inside(rate: float, seconds: float) -> int:
                    async with httpx.AsyncClient(timeout=seconds + 60) as http:
                        r = await http.post(
                            f"http://127.0.0.1:{app.port}/bench/publish", json={"rate": rate, "seconds": seconds}
                        )
                        return int(r.json()["sent"])

                for n in args.clients:
                    results.append(
                        await run_case("in-process", [app], n, args.rate, args.seconds, publish_inside, args.batch)
                    )

        srv = NatsServer(tmp / "nats")
        srv.start()
        try:
            with redis_server(tmp) as redis_url:
                for backend in ("nats", "redis"):
                    if backend not in args.backends:
                        continue
                    if backend == "redis" and redis_url is None:
                        notes.append("redis: skipped (redis-server not on PATH)")
                        continue
                    env = {**base_env, "NATS_URL": srv.url, "WS_BACKEND": backend, "REDIS_URL": redis_url or ""}
                    from liquidcrypto.fanout.manager import NatsWebSocketManager

                    client = NatsClient(srv.url, settings=Settings())
                    await client.connect(wait=15)
                    settings = replace(Settings(), ws_backend=backend, redis_url=redis_url or "")
                    manager = NatsWebSocketManager(client, settings=settings)
                    await manager.init()

                    async def publish_via(rate: float, seconds: float, m: Any = manager) -> int:
                        sent = await paced_publish(m.publish_trade_event, rate, seconds)
                        await m.flush()
                        return sent

                    try:
                        with apps("liquidcrypto.app:create_app", 2, env, log) as instances:
                            for n in args.clients:
                                results.append(
                                    await run_case(
                                        backend, instances, n, args.rate, args.seconds, publish_via, args.batch
                                    )
                                )
                            if backend == "nats" and not args.quick:
                                notes.append(
                                    await stalled_client_memory(instances[0], manager.publish_trade_event, args.seconds)
                                )
                    finally:
                        await manager.close()
                        await client.close()
        finally:
            srv.stop()
    return results, notes


def print_table(
    results: list[Result], notes: list[str], console: Console, batch: bool = True, write_delay: float = 0.0
) -> None:
    mode = (
        f"clients on /ws?batch=1, WS_WRITE_DELAY={write_delay * 1000:g} ms"
        if batch
        else "clients on /ws, one frame per message"
    )
    table = Table(title=f"WebSocket fan-out: trades published -> frames received by every client ({mode})")
    for col in (
        "backend",
        "clients",
        "offered trades/s",
        "delivered frames/s",
        "delivered",
        "p50 ms",
        "p99 ms",
        "missed",
        "RSS/client",
    ):
        table.add_column(col, justify="left" if col == "backend" else "right")
    base = {r.clients: r.delivered_per_s for r in results if r.backend == "in-process"}
    for r in results:
        table.add_row(
            r.backend,
            f"{r.clients:,}",
            f"{r.offered:,.0f}",
            f"{r.delivered_per_s:,.0f}",
            f"{r.delivered_share:.0%}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.missed:,}",
            f"{r.mem_per_client / 1024:.1f} KiB",
        )
    console.print(table)
    for r in results:
        if r.backend != "in-process" and base.get(r.clients):
            console.print(
                f"{r.backend} at {r.clients:,} clients: {r.delivered_per_s / base[r.clients]:.0%} of the "
                f"in-process baseline's delivered frames/s" + (" (target: >= 70%)" if r.backend == "nats" else "")
            )
    for note in notes:
        console.print(note)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; 0 when it ran (targets are reported, not enforced)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--clients", default="100,1000", help="comma-separated client counts")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered trades per second")
    parser.add_argument("--seconds", type=float, default=4.0, help="publishing time per case")
    parser.add_argument("--queue", type=int, default=1024, help="WS_QUEUE_SIZE of the apps")
    parser.add_argument("--backends", default="in-process,nats,redis")
    parser.add_argument(
        "--batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clients ask for newline-batched messages (/ws?batch=1); --no-batch: one frame per message",
    )
    parser.add_argument(
        "--write-delay",
        type=float,
        default=0.005,
        help="WS_WRITE_DELAY of the apps: seconds a batching client's writer collects frames (0: none)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.rate, args.seconds = "10", 200.0, 1.0
    args.clients = [int(c) for c in str(args.clients).split(",")]
    args.backends = [b.strip() for b in args.backends.split(",")]
    results, notes = run_loop(run(args))
    print_table(results, notes, Console(width=150), args.batch, args.write_delay)
    return 0
