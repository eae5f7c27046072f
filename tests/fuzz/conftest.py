"""One harness (nats-server, service, spy, attacker, service loop) per fuzz test module.

Hypothesis and pytest-asyncio's function-scoped loop and fixtures do not mix, so the
service runs on its own loop in a thread (``loop.LoopThread``) for the whole module,
and each example runs on it. Budget: the whole fuzz suite stays under about a minute
on two cores; under ``CI=true`` it is derandomized (the same examples every run).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from liquidcrypto.nats.embedded import NatsServer
from tests.fuzz.harness import Harness
from tests.fuzz.loop import LogCapture, LoopThread


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    server = NatsServer(tmp_path_factory.mktemp("fuzz") / "nats")
    server.start()
    loop = LoopThread()
    logs = LogCapture()
    logs.install()
    h = Harness(server, loop, logs)
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
