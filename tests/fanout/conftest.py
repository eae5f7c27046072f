"""Fixtures shared by the fan-out tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from liquidcrypto.nats.embedded import NatsServer


@pytest.fixture(scope="module")
def module_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One real nats-server for a whole test module (its apps and clients share it)."""
    srv = NatsServer(tmp_path_factory.mktemp("module-nats"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
