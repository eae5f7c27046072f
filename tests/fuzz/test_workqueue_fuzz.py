"""An untrusted party on ``orchestrator.>``: random tasks and results, raw junk, headers.

The properties (``harness`` module docstring) hold after every example: no unexpected
exception, no publish outside the expected subjects, every task is consumed (handled or
dead-lettered) and every result of the watched session delivered, the service stays
healthy and keeps handling well-formed tasks.
"""

from __future__ import annotations

from hypothesis import assume, given

from tests.fuzz import strategies as fz
from tests.fuzz.budget import fuzz_settings
from tests.fuzz.harness import Harness, run_example
from tests.fuzz.known_bugs import hits_known_bug
from tests.fuzz.traffic import AttackMsg


def test_random_work_queue_traffic_breaks_nothing(harness: Harness) -> None:
    @fuzz_settings(max_examples=100)
    @given(batch=fz.work_queue_batches())
    def prop(batch: list[AttackMsg]) -> None:
        assume(not hits_known_bug(batch))  # see known_bugs: each has its regression test
        run_example(harness, batch)

    prop()
    problems = harness.loop.run(harness.healthy_end_to_end())
    assert not problems, problems
