"""The ``liquidcrypto`` command.

::

    liquidcrypto dev                 embedded nats-server if none answers + the service
    liquidcrypto serve               the service only (degraded mode if NATS is down)
    liquidcrypto nats-server [--cluster N]
    liquidcrypto health [--url URL]
    liquidcrypto dlq ls | dlq requeue ID
    liquidcrypto bench a2a|work-queue|websocket [--quick]
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import signal
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import typer
from rich.console import Console
from rich.table import Table

from liquidcrypto.config import Settings
from liquidcrypto.errors import EmbeddedServerError, LiquidNatsError
from liquidcrypto.nats.embedded import NatsCluster, NatsServer, port_in_use

app = typer.Typer(help="NATS messaging for agents, work queues and live trades.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead letters of the orchestrator work queue.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
console = Console()
err = Console(stderr=True)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BENCHMARKS = {"a2a": "a2a", "work-queue": "work_queue", "websocket": "websocket_fanout"}


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def _settings(**overrides: Any) -> Settings:
    try:
        s = Settings.from_env()
    except ValueError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(2) from None
    return dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})


def nats_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a NATS server answers at ``url`` (it greets with an ``INFO`` line)."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host, port = parts.hostname or "localhost", parts.port or 4222
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"INFO")
    except OSError:
        return False


def _run_service(settings: Settings, log_level: str) -> None:
    import uvicorn

    from liquidcrypto.app import create_app, uvicorn_options

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        log_config=None,
        # WS_MAX_FRAME_BYTES as the protocol layer's limit (close 1009 before buffering),
        # WS_PING_INTERVAL/WS_PING_TIMEOUT keep-alive, compression off.
        **uvicorn_options(settings),
    )
    uvicorn.Server(config).run()


def start_embedded_for(settings: Settings) -> NatsServer | None:
    """Start a nats-server at the first ``NATS_URL`` address unless a NATS server answers there.

    Returns:
        the started server, or ``None`` when an existing one is used.

    Raises:
        EmbeddedServerError: the port is taken by something that is not NATS.
    """
    first = settings.nats_servers()[0]
    if nats_answers(first):
        logging.getLogger(__name__).info("using the NATS server answering at %s", first.split("@")[-1])
        return None
    parts = urlsplit(first if "://" in first else f"nats://{first}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    if host == "localhost":
        host = "127.0.0.1"
    http_port = 8222 if not port_in_use("127.0.0.1", 8222) else 0
    srv = NatsServer(settings.state_dir / "nats", host=host, port=port, http_port=http_port)
    srv.start()
    logging.getLogger(__name__).info(
        "started embedded nats-server at %s (monitoring %s, data %s)", srv.url, srv.monitor_url, srv.store_dir
    )
    return srv


@app.command()
def dev(
    port: Annotated[int | None, typer.Option(help="HTTP port (default PORT or 3000).")] = None,
    host: Annotated[str | None, typer.Option(help="HTTP host (default HOST or 127.0.0.1).")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the service, starting an embedded nats-server when none answers at NATS_URL."""
    _setup_logging(log_level)
    settings = _settings(port=port, host=host)
    try:
        embedded = start_embedded_for(settings)
    except EmbeddedServerError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    try:
        _run_service(settings, log_level)
    finally:
        if embedded is not None:
            embedded.stop()
            logging.getLogger(__name__).info("embedded nats-server stopped")


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="HTTP port (default PORT or 3000).")] = None,
    host: Annotated[str | None, typer.Option(help="HTTP host (default HOST or 127.0.0.1).")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the service only; it runs in degraded mode while NATS is down."""
    _setup_logging(log_level)
    _run_service(_settings(port=port, host=host), log_level)


@app.command("nats-server")
def nats_server(
    cluster: Annotated[int, typer.Option(help="Number of clustered nodes (1 = single server).")] = 1,
    port: Annotated[int, typer.Option(help="Client port of the first node (0 = free port).")] = 4222,
    store_dir: Annotated[Path | None, typer.Option(help="Data directory.")] = None,
) -> None:
    """Run a managed nats-server (or a local N-node cluster) until Ctrl-C."""
    _setup_logging("info")
    base = store_dir or _settings().state_dir / "nats"
    runner: NatsServer | NatsCluster
    try:
        if cluster <= 1:
            runner = NatsServer(base, port=port).start()
            console.print(f"nats-server ready at [bold]{runner.url}[/] (monitoring {runner.monitor_url})")
        else:
            ports = [port + i if port else 0 for i in range(cluster)]
            runner = NatsCluster(base, cluster, ports=ports).start()
            console.print(f"cluster of {cluster} ready: NATS_URL=[bold]{runner.url}[/] NATS_JS_REPLICAS=3")
    except EmbeddedServerError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    nodes = runner.nodes if isinstance(runner, NatsCluster) else [runner]
    try:
        while not stopping and all(n.running for n in nodes):
            time.sleep(0.2)
    finally:
        runner.stop()
    console.print("stopped")


@app.command()
def health(
    url: Annotated[str | None, typer.Option(help="Service base URL (default http://HOST:PORT).")] = None,
) -> None:
    """Ask a running service for its NATS health; exit 0 when healthy (HTTP 200: NATS and
    JetStream answer), 1 when not (503), 2 when the service does not answer."""
    s = _settings()
    base = url or f"http://{s.host}:{s.port}"
    try:
        resp = httpx.get(base.rstrip("/") + "/api/v1/nats/health", timeout=5)
    except httpx.HTTPError as exc:
        err.print(f"[red]service not reachable at {base}:[/] {exc}")
        raise typer.Exit(2) from None
    data = resp.json()
    table = Table(show_header=False)
    table.add_row("connected", "[green]yes[/]" if data.get("connected") else "[red]no[/]")
    table.add_row("server", str(data.get("server")))
    table.add_row("rtt (ms)", str(data.get("rtt")))
    js = data.get("jetstream") or {}
    table.add_row("jetstream", f"enabled={js.get('enabled')} streams={js.get('streams')}")
    console.print(table)
    raise typer.Exit(0 if resp.status_code == 200 else 1)


async def _with_client(coro_fn: Any) -> Any:
    from liquidcrypto.nats.client import NatsClient

    async with NatsClient(settings=Settings.from_env()) as client:
        await client.wait_connected(10)
        return await coro_fn(client)


@dlq_app.command("ls")
def dlq_ls(limit: Annotated[int, typer.Option(help="Show at most this many.")] = 100) -> None:
    """List dead-lettered orchestrator tasks."""
    from liquidcrypto.workqueue import queue as work_queue

    try:
        letters = asyncio.run(_with_client(lambda c: work_queue.list_dead_letters(c, limit=limit)))
    except LiquidNatsError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    table = Table("id", "task", "attempts", "last error", "failed at (UTC)")
    for d in letters:
        failed = datetime.fromtimestamp(d.failed_at / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(d.id, d.task_id, str(d.attempts), d.last_error, failed)
    console.print(table)
    console.print(f"{len(letters)} dead letter(s)")


@dlq_app.command("requeue")
def dlq_requeue(dead_letter_id: Annotated[str, typer.Argument(help="Dead letter id from `dlq ls`.")]) -> None:
    """Re-enqueue a dead-lettered task (with a fresh de-duplication id)."""
    from liquidcrypto.workqueue import queue as work_queue

    try:
        out = asyncio.run(_with_client(lambda c: work_queue.requeue_dead_letter(c, dead_letter_id)))
    except (LiquidNatsError, LookupError, ValueError) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(f"requeued {dead_letter_id}: {out}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="a2a, work-queue or websocket")],
) -> None:
    """Run a benchmark against raw nats-py in the same run (extra options pass through)."""
    module = BENCHMARKS.get(name.replace("_", "-")) or (name if name in BENCHMARKS.values() else None)
    if module is None:
        err.print(f"[red]unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}[/]")
        raise typer.Exit(2)
    mod = importlib.import_module(f"liquidcrypto.bench.{module}")
    raise typer.Exit(int(mod.main(list(ctx.args))))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
