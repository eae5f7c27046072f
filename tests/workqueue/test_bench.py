"""The work-queue benchmark runs (quick mode) and prints its table."""

from __future__ import annotations

import pytest

from liquidcrypto.bench.work_queue import main


@pytest.mark.slow
def test_benchmark_quick_prints_both_figures_and_the_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--concurrency", "1,4"]) == 0
    out = capsys.readouterr().out
    assert "liquidcrypto tasks/s" in out and "raw nats-py tasks/s" in out and "ratio" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("│        1", "│        4"))]
    assert len(rows) == 2 and all("%" in r for r in rows)
