"""The ``liquidcrypto`` command as a user runs it: real subprocesses, real servers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from liquidcrypto.config import Settings
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer, free_port, port_in_use
from tests.helpers import cli, eventually, wait_http


async def test_dev_starts_embedded_nats_and_service_then_stops_both(tmp_path: Path) -> None:
    nats_port, http_port = free_port(), free_port()
    env = {"NATS_URL": f"nats://127.0.0.1:{nats_port}", "PORT": str(http_port)}
    with cli(["dev"], env, tmp_path) as dev:
        status, body = await wait_http(f"http://127.0.0.1:{http_port}/api/v1/nats/health", dev)
        assert status == 200
        assert body["connected"] is True
        assert body["jetstream"] == {"enabled": True, "streams": 3}
        assert isinstance(body["rtt"], float)
        assert "started embedded nats-server" in dev.output
        assert (tmp_path / ".liquidcrypto" / "nats" / "jetstream").is_dir()
        assert dev.stop() in (0, 130)  # 130: uvicorn re-raises SIGINT after a clean shutdown
        assert "embedded nats-server stopped" in dev.output
    assert not port_in_use("127.0.0.1", nats_port), "embedded nats-server stopped with the service"
    assert not port_in_use("127.0.0.1", http_port)


async def test_dev_uses_a_running_nats_server(tmp_path: Path, nats_server: NatsServer) -> None:
    http_port = free_port()
    with cli(["dev"], {"NATS_URL": nats_server.url, "PORT": str(http_port)}, tmp_path) as dev:
        status, _ = await wait_http(f"http://127.0.0.1:{http_port}/api/v1/nats/health", dev)
        assert status == 200
        assert "using the NATS server" in dev.output
        assert "started embedded" not in dev.output
    assert nats_server.running


async def test_dev_reports_a_port_taken_by_something_else(tmp_path: Path) -> None:
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "liquidcrypto", "dev"],
            env={"PATH": "/usr/bin:/bin", "NATS_URL": f"nats://127.0.0.1:{port}", "PORT": str(free_port())},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert f"client port 127.0.0.1:{port} is already in use" in proc.stderr + proc.stdout


async def test_health_command_exit_codes(tmp_path: Path, nats_server: NatsServer) -> None:
    http_port = free_port()
    base = f"http://127.0.0.1:{http_port}"
    run = [sys.executable, "-m", "liquidcrypto", "health", "--url", base]
    down = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert down.returncode == 2 and "not reachable" in down.stderr
    with cli(["serve"], {"NATS_URL": nats_server.url, "PORT": str(http_port)}, tmp_path) as svc:
        await wait_http(base + "/api/v1/nats/health", svc)
        ok = subprocess.run(run, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "streams=3" in ok.stdout
        nats_server.stop()

        def unhealthy() -> bool:
            return subprocess.run(run, capture_output=True, timeout=30).returncode == 1

        await eventually(unhealthy, timeout=30, what="health exit 1 during outage")


async def test_nats_server_command_runs_a_three_node_cluster(tmp_path: Path) -> None:
    with cli(
        ["nats-server", "--cluster", "3", "--port", "0", "--store-dir", str(tmp_path / "c")], {}, tmp_path
    ) as proc:

        def ready_line() -> re.Match[str] | None:
            return re.search(r"NATS_URL=(\S+)", proc.output)

        match = await eventually(ready_line, timeout=60, what="cluster ready line")
        url = match.group(1)
        assert url.count("nats://") == 3
        async with NatsClient(url, settings=Settings(js_replicas=3)) as c:
            await c.wait_connected(20)
            info = await c.js.stream_info("A2A_TASKS")
            assert info.config.num_replicas == 3
        assert proc.stop() == 0
    assert "stopped" in proc.output


async def test_dlq_ls_and_requeue(tmp_path: Path, client: NatsClient, nats_server: NatsServer) -> None:
    from liquidcrypto.workqueue.queue import WorkQueue

    wq = WorkQueue(client)
    await wq.enqueue_orchestrator_task({"sessionId": "s-dlq", "subPrdId": "poison", "specialist": "x", "payload": {}})

    def always_fails(task: object) -> None:
        raise RuntimeError("kaboom")

    stop = await wq.start_orchestrator_worker(always_fails, max_deliver=1, backoff=[0.05])
    try:
        results = await wq.collect_results("s-dlq", 1, timeout=30)
        assert results[0].success is False
    finally:
        await stop()
    env = {**os.environ, "NATS_URL": nats_server.url}
    ls = subprocess.run(
        [sys.executable, "-m", "liquidcrypto", "dlq", "ls"], env=env, capture_output=True, text=True, timeout=60
    )
    assert ls.returncode == 0, ls.stderr
    assert "s-dlq.poison" in ls.stdout and "kaboom" in ls.stdout
    assert "1 dead letter(s)" in ls.stdout
    letter_id = re.search(r"│\s*(\d+)\s*│\s*s-dlq\.poison", ls.stdout)
    assert letter_id, ls.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "liquidcrypto", "dlq", "requeue", "99999"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 1
    again = subprocess.run(
        [sys.executable, "-m", "liquidcrypto", "dlq", "requeue", letter_id.group(1)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert "requeued" in again.stdout
    stop = await wq.start_orchestrator_worker(lambda task: {"success": True, "result": "fixed"})
    try:
        results = await wq.collect_results("s-dlq", 1, timeout=30)
        assert results[0].success is True and results[0].result == "fixed"
    finally:
        await stop()


async def test_serve_does_not_negotiate_per_message_deflate(tmp_path: Path, nats_server: NatsServer) -> None:
    import websockets

    port = free_port()
    with cli(["serve"], {"NATS_URL": nats_server.url, "PORT": str(port)}, tmp_path) as svc:
        await wait_http(f"http://127.0.0.1:{port}/api/v1/nats/health", svc)
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:  # offers deflate by default
            assert ws.protocol.extensions == []


async def test_health_command_fails_while_jetstream_does_not_answer(tmp_path: Path) -> None:
    """NATS answers, JetStream does not (disabled here): HTTP 503 and exit 1, not "connected"."""
    server = NatsServer(tmp_path / "nojs", extra_config="jetstream: disabled\n")
    server.start()
    http_port = free_port()
    base = f"http://127.0.0.1:{http_port}"
    try:
        with cli(["serve"], {"NATS_URL": server.url, "PORT": str(http_port)}, tmp_path) as svc:
            status, body = await wait_http(base + "/api/v1/nats/health", svc)
            assert status == 503 and body["connected"] is True and body["jetstream"]["enabled"] is False
            run = [sys.executable, "-m", "liquidcrypto", "health", "--url", base]
            result = subprocess.run(run, capture_output=True, text=True, timeout=30)
            assert result.returncode == 1, result.stdout + result.stderr
            assert "enabled=False" in result.stdout
    finally:
        server.stop()
