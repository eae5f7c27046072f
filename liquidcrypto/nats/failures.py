"""Failures of a long-running loop in a row: which are permanent, the back-off, and
logs that stay loud while a failure repeats without flooding.

A loop that retries for ever must not go quiet: the first failure is a warning, and as
long as it repeats it is an error again at most every ``REPEAT_LOG_INTERVAL`` seconds,
with the count and for how long. Some failures cannot mend by retrying (``is_permanent``):
the loop gives up and says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import nats.js.errors

from liquidcrypto.errors import ConsumerConflictError, StreamConflictError

log = logging.getLogger(__name__)

REPEAT_LOG_INTERVAL = 30.0
"""Seconds between two error-level logs of a failure that keeps repeating."""
REFUSED_GIVE_UP = 30.0
"""Seconds JetStream may keep refusing a request (a 4xx answer, not an outage) before
that counts as permanent: e.g. a consumer that cannot be created again."""
MAX_DELAY = 2.0
"""The longest back-off between two attempts."""

PROGRAMMING_ERRORS = (AttributeError, TypeError, NameError, ImportError, NotImplementedError, AssertionError)
"""Our own code failing so is a bug or an incompatible nats-py: retrying cannot help."""


def is_permanent(exc: BaseException) -> bool:
    """Whether binding or pulling failed in a way that retrying cannot mend: a consumer
    or stream in conflict with ours, or a programming error."""
    return isinstance(exc, (ConsumerConflictError, StreamConflictError, *PROGRAMMING_ERRORS))


def refused(exc: BaseException) -> bool:
    """JetStream answered and said no (as opposed to not answering, or being unavailable)."""
    if not isinstance(exc, nats.js.errors.APIError) or isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return False
    return (exc.code or 0) < 500


class Retries:
    """The failures in a row of one loop (``name`` in its logs)."""

    def __init__(self, name: str, permanent: Callable[[BaseException], bool] = is_permanent) -> None:
        self.name = name
        self._permanent = permanent
        self.count = 0
        self.last_error: BaseException | None = None
        """The failure being retried; ``None`` once an attempt succeeded."""
        self._first = 0.0
        self._logged = 0.0
        self._refused_since = 0.0

    def failed(self, exc: BaseException) -> float | None:
        """Record a failure and log it; the seconds to wait before retrying, or ``None``
        if it is permanent (not logged here: the caller gives up and says so)."""
        now = time.monotonic()
        self._refused_since = (self._refused_since or now) if refused(exc) else 0.0
        if self._permanent(exc) or (self._refused_since and now - self._refused_since >= REFUSED_GIVE_UP):
            return None
        self.count += 1
        self.last_error = exc
        delay = min(MAX_DELAY, 0.1 * 2.0 ** min(self.count, 10))
        if self.count == 1:
            self._first = self._logged = now
            log.warning("%s: failed (%r); retrying in %.1fs", self.name, exc, delay)
        elif now - self._logged >= REPEAT_LOG_INTERVAL:
            self._logged = now
            log.error(
                "%s: failed %d times in a row for %.0fs and is not working (last: %r); retrying in %.1fs",
                self.name,
                self.count,
                now - self._first,
                exc,
                delay,
            )
        else:
            log.debug("%s: failed again (%r)", self.name, exc)
        return delay

    def succeeded(self) -> None:
        """An attempt worked: logged if failures came before it."""
        if self.count:
            log.warning(
                "%s: working again after %d failure(s) over %.1fs",
                self.name,
                self.count,
                time.monotonic() - self._first,
            )
        self.count = 0
        self._refused_since = 0.0
        self.last_error = None
