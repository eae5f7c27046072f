"""An untrusted party that reads ``$JS.API.>`` and writes to the service's pull inboxes.

The pull requests name their inbox as reply subject, so any client allowed to subscribe
there can publish forged deliveries and forged status messages (``409 Consumer Deleted``,
``Nats-Pending-Messages``...) to the worker, the durable and the results reader. The
server refuses a reply subject under ``$JS.ACK.`` from a client, so no forged message can
name a real ack subject. The properties (``harness`` module docstring) must hold.
"""

from __future__ import annotations

from hypothesis import given

from tests.fuzz import strategies as fz
from tests.fuzz.budget import fuzz_settings
from tests.fuzz.harness import Harness, run_example
from tests.fuzz.traffic import AttackMsg


def test_forged_messages_on_the_pull_inboxes_break_nothing(harness: Harness) -> None:
    inboxes = harness.loop.run(harness.pull_inboxes())

    @fuzz_settings(max_examples=40)
    @given(batch=fz.inbox_batches(inboxes))
    def prop(batch: list[AttackMsg]) -> None:
        run_example(harness, batch)

    prop()
    problems = harness.loop.run(harness.healthy_end_to_end())
    assert not problems, problems
