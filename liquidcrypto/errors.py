"""The project's errors, one hierarchy.

::

    LiquidNatsError
    ├── BackendUnavailableError       the message transport cannot take a message now
    │   ├── NatsUnavailableError      NATS is down or the publish buffer is full (``sent``)
    │   │   └── PublishOutcomeUnknownError(TimeoutError)  sent, no answer: retry with the same id
    │   └── RedisUnavailableError     Redis (the WebSocket ``redis`` backend) is down
    ├── InvalidSubjectError(ValueError)   a token or pattern that cannot be a subject
    ├── InvalidPayloadError(ValueError)   data that cannot be encoded / decoded as JSON
    ├── PayloadTooLargeError(ValueError)  body + headers over the server's max_payload
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
    """NATS cannot take the message now (disconnected, degraded, or buffer full).

    Attributes:
        sent: ``False`` (this class): the message never left this client, or the server
            refused it (no stream), so nothing was or will be stored and a retry cannot
            duplicate it. ``PublishOutcomeUnknownError`` has ``sent = True``.
    """

    sent: bool = False


class PublishOutcomeUnknownError(NatsUnavailableError, TimeoutError):
    """A JetStream publish was sent but no acknowledgement came in time.

    The stream may have stored it, or may store it later (it can sit in the client's
    reconnect buffer): retry with the same ``Nats-Msg-Id`` and the stream drops the
    repeat within its de-duplication window.

    Attributes:
        subject: the subject published to.
        msg_id: its ``Nats-Msg-Id`` (``None``: none was sent, a retry cannot be de-duplicated).
        timeout: seconds waited for the acknowledgement.
    """

    sent = True

    def __init__(self, subject: str, msg_id: str | None, timeout: float, *, hint: str = "") -> None:
        """
        Args:
            hint: how the caller passes the id again (``id=...``), appended to the message.
        """
        self.subject = subject
        self.msg_id = msg_id
        self.timeout = timeout
        advice = (
            f"retry with the same id {msg_id!r} (its Nats-Msg-Id: the stream stores the same Nats-Msg-Id once)"
            if msg_id is not None
            else "it had no Nats-Msg-Id, so a retry may store it twice"
        )
        super().__init__(
            f"JetStream publish to {subject!r} sent, but no acknowledgement within {timeout:g} s: "
            f"outcome unknown (it may be stored, now or later); {advice}" + (f"; {hint}" if hint else "")
        )


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


class PayloadTooLargeError(LiquidNatsError, ValueError):
    """A message whose body plus headers, as encoded on the wire, exceed the server's
    ``max_payload``; refused before anything is sent (the server would close the connection).

    Attributes:
        subject: the subject it was for.
        size: body + headers in bytes.
        body: the body's size in bytes.
        headers: the encoded headers' size in bytes (0 without headers).
        limit: the server's ``max_payload``.
    """

    def __init__(self, subject: str, body: int, headers: int, limit: int) -> None:
        self.subject = subject
        self.body = body
        self.headers = headers
        self.size = body + headers
        self.limit = limit
        super().__init__(
            f"message of {self.size:,} bytes (body {body:,} + headers {headers:,}) exceeds the server's "
            f"max_payload of {limit:,} bytes on subject {subject!r}"
        )


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
