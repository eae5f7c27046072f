"""The HTTP service: health status codes over real HTTP, during an outage and after it."""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from liquidcrypto import serving
from liquidcrypto.app import create_app, uvicorn_options
from liquidcrypto.config import Settings
from liquidcrypto.nats.embedded import NatsServer, free_port
from tests.helpers import cli, eventually, http_get_json, wait_http


def test_health_in_process_connected(nats_server: NatsServer) -> None:
    with TestClient(create_app(Settings(nats_url=nats_server.url))) as http:
        resp = http.get("/api/v1/nats/health")
        assert resp.status_code == 200
        body = resp.json()
        assert body["connected"] is True
        assert body["jetstream"] == {"enabled": True, "streams": 3}
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert "python_info" in metrics.text


def test_health_in_process_degraded(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(nats_url=f"nats://127.0.0.1:{free_port()}"))) as http:
        resp = http.get("/api/v1/nats/health")
        assert resp.status_code == 503
        assert resp.json() == {
            "connected": False,
            "server": None,
            "rtt": None,
            "jetstream": {"enabled": False, "streams": 0},
        }


async def test_service_answers_503_during_an_outage_and_recovers(tmp_path: Path, nats_server: NatsServer) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/nats/health"
    with cli(["serve"], {"NATS_URL": nats_server.url, "PORT": str(port)}, tmp_path) as svc:
        status, body = await wait_http(url, svc)
        assert status == 200 and body["connected"] is True

        nats_server.stop()

        async def outage_seen() -> bool:
            status, body = await http_get_json(url)
            return status == 503 and body["connected"] is False

        await eventually(outage_seen, timeout=30, what="503 during the outage")
        # The service keeps answering while NATS is down.
        for _ in range(3):
            assert (await http_get_json(url))[0] == 503

        nats_server.start()

        async def recovered() -> bool:
            status, body = await http_get_json(url)
            return status == 200 and body["jetstream"]["streams"] == 3

        await eventually(recovered, timeout=30, what="200 after NATS came back")
        assert svc.proc.poll() is None


async def test_service_starts_degraded_and_becomes_healthy(tmp_path: Path) -> None:
    srv = NatsServer(tmp_path / "late")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/nats/health"
    try:
        with cli(["serve"], {"NATS_URL": srv.url, "PORT": str(port)}, tmp_path) as svc:
            status, body = await wait_http(url, svc)
            assert status == 503 and body["connected"] is False
            assert "[Server] NATS not available - running in degraded mode" in svc.output
            srv.start()

            async def healthy() -> bool:
                return (await http_get_json(url))[0] == 200

            await eventually(healthy, timeout=30, what="healthy once NATS started")
    finally:
        srv.stop()


def test_metrics_show_the_connection(nats_server: NatsServer) -> None:
    with TestClient(create_app(Settings(nats_url=nats_server.url))) as http:
        text = http.get("/metrics").text
        assert "liquidcrypto_nats_connected 1.0" in text
        assert "liquidcrypto_nats_reconnects_total" in text
        assert "liquidcrypto_nats_slow_consumer_events_total" in text


def test_uvicorn_options_come_from_the_settings() -> None:
    s = Settings(ws_max_frame_bytes=4096, ws_ping_interval=5.0, ws_ping_timeout=7.0, ws_handshake_timeout=3.0)
    options = uvicorn_options(s)
    http, ws = options.pop("http"), options.pop("ws")
    assert options == {
        "ws_max_size": 4096,
        "ws_ping_interval": 5.0,
        "ws_ping_timeout": 7.0,
        "ws_per_message_deflate": False,
    }
    assert issubclass(http, serving.DeadlineHttpProtocol) and http.header_timeout == 3.0
    assert ws is serving.BoundedWebSocketProtocol


def test_ops_endpoints_are_open_without_metrics_token_and_the_page_is_hardened(nats_server: NatsServer) -> None:
    hostile = 'https://b.example"><script>alert(1)</script>'
    settings = Settings(nats_url=nats_server.url, dashboard_token_origins=(hostile,))
    with TestClient(create_app(settings)) as http:
        assert http.get("/metrics").status_code == 200
        assert http.get("/api/v1/ws/stats").status_code == 200
        page = http.get("/")
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "<script>alert(1)</script>" not in page.text
        escaped = "[&quot;https://b.example\\&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;&quot;]"
        assert f'<meta name="token-origins" content="{escaped}">' in page.text
