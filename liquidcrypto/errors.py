"""The project's errors, one hierarchy.

::

    LiquidNatsError
    ├── BackendUnavailableError       the message transport cannot take a message now
    │   ├── NatsUnavailableError      NATS is down or the publish buffer is full
    │   └── RedisUnavailableError     Redis (the WebSocket ``redis`` backend) is down
    ├── InvalidSubjectError(ValueError)   a token or pattern that cannot be a subject
    ├── InvalidPayloadError(ValueError)   data that cannot be encoded / decoded as JSON
    ├── InvalidTaskError(ValueError)      a task or result of the wrong shape
    ├── RequestTimeoutError(TimeoutError) no reply within the timeout
    ├── IllegalTransitionError(ValueError) a task-state change the lifecycle forbids
    ├── StreamConflictError           an existing stream differs in a way we must not change
    ├── ConsumerConflictError         a work-queue consumer would overlap another one
    ├── DeadLetterNotFoundError(LookupError) no dead letter with that id
    └── EmbeddedServerError           the managed nats-server would not start

Where a stdlib meaning fits, the error also derives from it so callers can catch either.
"""

from __future__ import annotations


class LiquidNatsError(Exception):
    """Base class of every error raised by liquidcrypto."""


class BackendUnavailableError(LiquidNatsError):
    """The transport (NATS, or Redis for the WebSocket ``redis`` backend) cannot take it now."""


class NatsUnavailableError(BackendUnavailableError):
    """NATS cannot take the message now (disconnected, degraded, or buffer full)."""


class RedisUnavailableError(BackendUnavailableError):
    """Redis cannot take the message now (the WebSocket ``redis`` backend)."""


class InvalidSubjectError(LiquidNatsError, ValueError):
    """A subject token or pattern is not valid.

    Attributes:
        value: the offending value.
        what: what the value was meant to be (``agent_id``, ``symbol``...).
    """

    def __init__(self, what: str, value: object, reason: str) -> None:
        self.what = what
        self.value = value
        super().__init__(f"invalid {what} {value!r}: {reason}")


class InvalidPayloadError(LiquidNatsError, ValueError):
    """A value that cannot be encoded to, or decoded from, JSON."""


class InvalidTaskError(LiquidNatsError, ValueError):
    """A task or result that does not have the required shape."""


class RequestTimeoutError(LiquidNatsError, TimeoutError):
    """No reply arrived within the timeout.

    Attributes:
        subject: the subject the request went to.
        timeout: the timeout in seconds.
    """

    def __init__(self, subject: str, timeout: float) -> None:
        self.subject = subject
        self.timeout = timeout
        super().__init__(f"no reply on {subject!r} within {timeout:g} s")


class IllegalTransitionError(LiquidNatsError, ValueError):
    """A task state change that the task lifecycle forbids."""


class StreamConflictError(LiquidNatsError):
    """An existing JetStream stream has a retention we refuse to change silently."""


class ConsumerConflictError(LiquidNatsError):
    """A consumer on a work-queue stream would overlap another consumer's filter.

    Work-queue streams allow one consumer per subject: e.g. two ``collect_results`` of
    the same session at the same time.
    """


class DeadLetterNotFoundError(LiquidNatsError, LookupError):
    """No dead letter has the given id (never existed, or already requeued)."""


class EmbeddedServerError(LiquidNatsError):
    """The managed nats-server process failed to start or stop."""
