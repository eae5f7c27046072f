"""The fuzz suite's budget: examples per property and Hypothesis settings.

The whole suite stays under about a minute on two cores. Under ``CI=true`` examples are
derandomized (the same inputs every run) and no example database is kept.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# FUZZ_NO_SHRINK=1 reports the first failing example as drawn (exploring is then fast).
NO_SHRINK = os.environ.get("FUZZ_NO_SHRINK", "") == "1"
# FUZZ_INCLUDE_KNOWN_BUGS=1 draws the inputs known_bugs.py leaves out (the properties then
# fail on today's code: a check that each exclusion hides a real bug, and, once the fixes
# have landed, that they hold for every input).
INCLUDE_KNOWN_BUGS = os.environ.get("FUZZ_INCLUDE_KNOWN_BUGS", "") == "1"
# FUZZ_EXAMPLES=N runs N examples per property instead of the CI budget (a longer local hunt).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def fuzz_settings(max_examples: int) -> settings:
    """The settings of a fuzz property: bounded examples, no deadline (real servers), and
    in CI derandomized with no example database, so every run tries the same inputs."""
    return settings(
        max_examples=EXAMPLES or max_examples,
        deadline=None,
        derandomize=IN_CI,
        database=None if IN_CI else settings().database,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        print_blob=True,
        phases=[p for p in Phase if not (NO_SHRINK and p in (Phase.shrink, Phase.explain))],
    )
