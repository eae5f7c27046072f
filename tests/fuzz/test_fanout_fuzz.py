"""An untrusted party on ``trades.>`` and ``ws.broadcast`` (the browsers' feed).

Besides the properties every fuzz module checks (``harness`` module docstring): every
trade stored on the watched symbol reaches the ``subscribe_to_trade_events`` handler
once, in order, decoded, and what is not JSON is skipped; ``TRADE_EVENTS`` grows by
exactly what was published.
"""

from __future__ import annotations

from hypothesis import given

from tests.fuzz import strategies as fz
from tests.fuzz.budget import fuzz_settings
from tests.fuzz.harness import Harness, run_example
from tests.fuzz.traffic import AttackMsg


def test_random_trade_traffic_reaches_handlers_intact(trade_harness: Harness) -> None:
    @fuzz_settings(max_examples=60)
    @given(batch=fz.trade_batches())
    def prop(batch: list[AttackMsg]) -> None:
        run_example(trade_harness, batch)

    prop()
    problems = trade_harness.loop.run(trade_harness.healthy_end_to_end())
    assert not problems, problems
