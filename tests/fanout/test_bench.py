"""The fan-out benchmark runs (``--quick``) and prints its table with the three backends."""

from __future__ import annotations

import pytest

from liquidcrypto.bench.websocket_fanout import main


def test_quick_benchmark_prints_the_three_backends(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "WebSocket fan-out" in out
    for backend in ("in-process", "nats", "redis"):
        assert backend in out
    assert "of the in-process baseline" in out
