"""Inputs that hit a bug this suite found, or issue 10 names, and that is not fixed yet.

Each bug has a dedicated regression test in ``test_regressions.py`` marked
``xfail(strict=True)``: it starts passing (and so failing as XPASS) when the fix lands.
The properties leave these inputs out, so they pass on today's code and test everything
else; when a fix lands, remove its mark, its exclusion below or in ``strategies``, and
the properties cover those inputs again. ``FUZZ_INCLUDE_KNOWN_BUGS=1`` draws them all now.

Left out in ``strategies`` (they shape what is drawn):
- issue 10 finding 1, ``reply_to`` published to unchecked: only safe ``reply_to``
  values are drawn until a probe at start-up sees the bus refuse a foreign one
  (``Harness.reply_to_checked``; ``strategies.reply_targets``);
- findings B and C, JSON nested deeper than 200 levels (``strategies.MAX_OBJECT_NESTING``);
- finding C, a task subject token the package refuses (``strategies.task_token``);
- issue 10 finding 2, body + headers over ``max_payload``, and finding F, a malformed
  task whose dead letter lands just under ``max_payload`` (its header then pushes the
  worker's publish over, and the server closes the worker's connection): bodies stay
  below 310 kB, far from 1 MiB.

Left out here (predicates on a drawn message, applied with ``hypothesis.assume``):
- finding D, a task whose body names another session/sub-PRD than its subject.
"""

from __future__ import annotations

from collections.abc import Iterable

from liquidcrypto.workqueue.models import decode_task
from tests.fuzz.budget import INCLUDE_KNOWN_BUGS
from tests.fuzz.traffic import TASKS_PREFIX, AttackMsg


def forged_result_subject(msg: AttackMsg) -> bool:
    """Finding D: the worker publishes the result under the ids of the task's body, not
    those of the subject it arrived on."""
    if not msg.subject.startswith(TASKS_PREFIX):
        return False
    try:
        task = decode_task(msg.body)
    except Exception:  # noqa: BLE001 - malformed: dead-lettered under the subject's name
        return False
    return task.subject != msg.subject


def hits_known_bug(batch: Iterable[AttackMsg]) -> bool:
    if INCLUDE_KNOWN_BUGS:
        return False
    return any(forged_result_subject(m) for m in batch)
