"""The A2A benchmark runs (quick mode) and prints its table."""

from __future__ import annotations

import pytest

from liquidcrypto.bench import a2a as bench


def test_benchmark_quick_mode_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "A2A bus vs raw nats-py" in out
    assert "core latency" in out and "JetStream" in out
