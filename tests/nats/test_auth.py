"""Authentication against nats-servers started with the matching auth config; no secret leaks."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import nkeys
import pytest

from liquidcrypto.config import Settings
from liquidcrypto.nats.client import ConnectionState, NatsClient
from liquidcrypto.nats.embedded import NatsServer, free_port
from tests.helpers import cli, eventually, http_get_json, wait_http

PASSWORD = "s3cr3t-Pa55"
TOKEN = "t0ken-abc-123"


def auth_server(tmp_path: Path, extra: str) -> NatsServer:
    return NatsServer(tmp_path / "auth", extra_config=extra).start()


async def connected_or_error(c: NatsClient) -> NatsClient:
    await c.connect()
    return c


async def test_user_password_in_url(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    srv = auth_server(tmp_path, f'authorization {{ user: "app", password: "{PASSWORD}" }}')
    try:
        with caplog.at_level(logging.DEBUG):
            async with NatsClient(f"nats://app:{PASSWORD}@127.0.0.1:{srv.port}", settings=Settings()) as c:
                await c.wait_connected(10)
                health = await c.health()
                assert health["connected"] is True
                assert PASSWORD not in repr(health)
                assert "***@" in c.display_url
        assert PASSWORD not in caplog.text
    finally:
        srv.stop()


async def test_user_password_from_env_settings(tmp_path: Path) -> None:
    srv = auth_server(tmp_path, f'authorization {{ user: "app", password: "{PASSWORD}" }}')
    try:
        s = Settings.from_env({"NATS_URL": srv.url, "NATS_USER": "app", "NATS_PASSWORD": PASSWORD})
        async with NatsClient(settings=s) as c:
            await c.wait_connected(10)
            assert c.is_connected
    finally:
        srv.stop()


async def test_token(tmp_path: Path) -> None:
    srv = auth_server(tmp_path, f'authorization {{ token: "{TOKEN}" }}')
    try:
        async with NatsClient(settings=Settings.from_env({"NATS_URL": srv.url, "NATS_TOKEN": TOKEN})) as c:
            await c.wait_connected(10)
            assert (await c.health())["jetstream"]["streams"] == 3
    finally:
        srv.stop()


async def test_nkey_seed_string_and_file(tmp_path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    srv = auth_server(tmp_path, f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}')
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    try:
        for value in (seed.decode(), str(seed_file)):
            async with NatsClient(settings=Settings.from_env({"NATS_URL": srv.url, "NATS_NKEY_SEED": value})) as c:
                await c.wait_connected(10)
                assert c.is_connected
    finally:
        srv.stop()


def make_tls_files(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    files = {k: d / f"{k}.pem" for k in ("ca", "ca-key", "cert", "key")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(files["ca-key"]),
        "-out",
        str(files["ca"]),
    )
    csr = d / "server.csr"
    run(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(files["key"]), "-out", str(csr)
    )
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(files["ca"]),
        "-CAkey",
        str(files["ca-key"]),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(files["cert"]),
    )
    return files


async def test_tls_with_ca_and_client_certificate(tmp_path: Path) -> None:
    f = make_tls_files(tmp_path / "tls")
    # The server verifies clients too, so the same cert serves as the client certificate.
    srv = auth_server(
        tmp_path,
        f'tls {{ cert_file: "{f["cert"]}", key_file: "{f["key"]}", ca_file: "{f["ca"]}", verify: true }}',
    )
    try:
        env = {
            "NATS_URL": f"tls://127.0.0.1:{srv.port}",
            "NATS_TLS_CA": str(f["ca"]),
            "NATS_TLS_CERT": str(f["cert"]),
            "NATS_TLS_KEY": str(f["key"]),
        }
        async with NatsClient(settings=Settings.from_env(env)) as c:
            await c.wait_connected(10)
            assert (await c.health())["connected"] is True
        # Without the client certificate the server refuses the connection.
        env.pop("NATS_TLS_CERT")
        env.pop("NATS_TLS_KEY")
        c = NatsClient(settings=Settings.from_env(env))
        try:
            await c.connect()
            assert c.state is ConnectionState.DEGRADED
        finally:
            await c.close()
    finally:
        srv.stop()


async def test_wrong_password_means_degraded_with_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = auth_server(tmp_path, f'authorization {{ user: "app", password: "{PASSWORD}" }}')
    c = NatsClient(f"nats://app:wrong-pass@127.0.0.1:{srv.port}", settings=Settings())
    try:
        with caplog.at_level(logging.WARNING):
            await c.connect()
        assert c.state is ConnectionState.DEGRADED
        # The server answers -ERR 'Authorization Violation' and closes; an attempt can see
        # the reset before the error line, so the background retries are polled for it.
        await eventually(lambda: "Authorization" in (c.last_error or ""), timeout=20, what="auth error")
        assert c.state is ConnectionState.DEGRADED
        assert "wrong-pass" not in caplog.text
        assert (await c.health())["connected"] is False
    finally:
        await c.close()
        srv.stop()


async def test_service_never_shows_credentials(tmp_path: Path) -> None:
    srv = auth_server(tmp_path, f'authorization {{ user: "app", password: "{PASSWORD}" }}')
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/nats/health"
    try:
        env = {"NATS_URL": f"nats://app:{PASSWORD}@127.0.0.1:{srv.port}", "PORT": str(port)}
        with cli(["serve", "--log-level", "debug"], env, tmp_path) as svc:
            status, body = await wait_http(url, svc)
            assert status == 200
            srv.stop()

            async def down() -> bool:
                return (await http_get_json(url))[0] == 503

            await eventually(down, timeout=30, what="503 while the auth server is down")
            svc.stop()
            assert PASSWORD not in svc.output
            assert PASSWORD not in repr(body)
    finally:
        srv.stop()


async def test_creds_file_in_operator_mode(tmp_path: Path) -> None:
    from tests.nats.natsjwt import operator_setup

    config, creds = operator_setup(tmp_path)
    srv = auth_server(tmp_path, config)
    try:
        async with NatsClient(settings=Settings.from_env({"NATS_URL": srv.url, "NATS_CREDS": str(creds)})) as c:
            await c.wait_connected(15)
            assert (await c.health())["jetstream"] == {"enabled": True, "streams": 3}
        # Without the creds the operator-mode server refuses us.
        c = NatsClient(settings=Settings.from_env({"NATS_URL": srv.url}))
        try:
            await c.connect()
            assert c.state is ConnectionState.DEGRADED
        finally:
            await c.close()
    finally:
        srv.stop()
