"""Inputs that hit a bug this suite found and that is not fixed yet: none today.

How a new finding is handled: a dedicated regression test in ``test_regressions.py``
marked ``xfail(strict=True)`` (it starts passing, and so failing as XPASS, when the fix
lands), and here a predicate on a drawn message that the properties leave out with
``hypothesis.assume`` so they keep testing everything else. When the fix lands, remove
the mark and the predicate. ``FUZZ_INCLUDE_KNOWN_BUGS=1`` draws the left-out inputs too.

Fixed, and drawn again: issue 10 finding 1 (a ``reply_to`` outside the inboxes), finding
2 (body + headers over ``max_payload``: reproduced on its own in ``test_regressions.py``;
the properties keep bodies below 310 kB for speed) and the suite's findings A (a vertical
tab or form feed in a subject), B (JSON nested past msgspec's recursion limit), C (a
malformed task that could not be dead-lettered), D (a task naming another session), E (a
stored ``Status`` header on a pulled message) and F (a near-``max_payload`` task).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tests.fuzz.budget import INCLUDE_KNOWN_BUGS
from tests.fuzz.traffic import AttackMsg

KNOWN_BUGS: tuple[Callable[[AttackMsg], bool], ...] = ()
"""One predicate per open finding: does this drawn message hit it?"""


def hits_known_bug(batch: Iterable[AttackMsg]) -> bool:
    if INCLUDE_KNOWN_BUGS:
        return False
    return any(known(m) for m in batch for known in KNOWN_BUGS)
