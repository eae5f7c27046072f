"""One harness (nats-server, service, spy, attacker, service loop) per fuzz test module.

Hypothesis and pytest-asyncio's function-scoped loop and fixtures do not mix, so the
service runs on its own loop in a thread (``loop.LoopThread``) for the whole module,
and each example runs on it. Budget: the whole fuzz suite stays under about a minute
on two cores; under ``CI=true`` it is derandomized (the same examples every run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from liquidcrypto.nats.embedded import NatsServer
from tests.fuzz.harness import Harness
from tests.fuzz.loop import LogCapture, LoopThread


@contextlib.contextmanager
def running_harness(tmp_path_factory: pytest.TempPathFactory, *, trade_mode: bool = False) -> Iterator[Harness]:
    """A nats-server, the service loop and a started ``Harness``; all stopped after."""
    server = NatsServer(tmp_path_factory.mktemp("fuzz") / "nats")
    server.start()
    loop = LoopThread()
    logs = LogCapture()
    logs.install()
    h = Harness(server, loop, logs, trade_mode=trade_mode)
    try:
        loop.run(h.start(), timeout=60)
        yield h
    finally:
        try:
            loop.run(h.close(), timeout=30)
        finally:
            loop.close()
            logs.uninstall()
            server.stop()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running_harness(tmp_path_factory) as h:
        yield h


@pytest.fixture(scope="module")
def trade_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running_harness(tmp_path_factory, trade_mode=True) as h:
        yield h
