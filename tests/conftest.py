"""Fixtures: real nats-server processes (one node, a 3-node cluster) and a real redis-server,
each on free loopback ports in temp dirs, stopped in ``finally``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.aio.client
import pytest

from liquidcrypto import A2ABus
from liquidcrypto.config import Settings
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsCluster, NatsServer
from tests.helpers import redis_server

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh single-node nats-server with JetStream (file storage in tmp_path)."""
    srv = NatsServer(tmp_path / "nats")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A fresh 3-node nats-server cluster with JetStream."""
    cluster = NatsCluster(tmp_path / "cluster", 3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def client(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """A connected, provisioned client of ``nats_server``."""
    c = NatsClient(nats_server.url, settings=Settings())
    await c.connect(wait=15)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def bus(client: NatsClient) -> AsyncIterator[A2ABus]:
    """An A2A bus on ``client`` (closed at the end)."""
    b = A2ABus(client)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def make_client(nats_server: NatsServer) -> AsyncIterator[Callable[..., Awaitable[NatsClient]]]:
    """Factory for more connected clients of ``nats_server`` (closed at the end)."""
    made: list[NatsClient] = []

    async def make(url: str | None = None, **kwargs: Any) -> NatsClient:
        c = NatsClient(url or nats_server.url, settings=kwargs.pop("settings", Settings()), **kwargs)
        await c.connect(wait=15)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            await c.close()


@pytest.fixture
async def attacker(nats_server: NatsServer) -> AsyncIterator[nats.aio.client.Client]:
    """The untrusted party: any client of the account, a plain nats-py connection."""
    nc = await nats.connect(nats_server.url, name="attacker")
    try:
        yield nc
    finally:
        await nc.close()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real redis-server on a free port (fails, never skips, when redis-server is missing)."""
    with redis_server(tmp_path) as url:
        yield url
