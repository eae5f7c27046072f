"""Every NATS header name the package reads or writes, one constant each."""

from __future__ import annotations

from typing import Final

# JetStream and NATS protocol headers (nats-py's ``nats.js.api.Header`` names some of them).
MSG_ID: Final = "Nats-Msg-Id"
"""De-duplication id: the stream drops a repeat within its ``duplicate_window``."""
STATUS: Final = "Status"
"""Status code of a pull request's control message (404 no messages, 408 expired...)."""
DESCRIPTION: Final = "Description"
PENDING_MESSAGES: Final = "Nats-Pending-Messages"
CONSUMER_STALLED: Final = "Nats-Consumer-Stalled"
"""On a push consumer's idle heartbeat: the flow-control subject the server waits an answer on."""
TTL: Final = "Nats-TTL"
"""Per-message time to live (``"3600s"``), on a stream with ``allow_msg_ttl`` (nats-server 2.11+)."""

# The work queue's own headers.
SPECIALIST: Final = "Lc-Specialist"
"""The task's specialist, so a worker can decline a task without decoding it."""
TASK_ID: Final = "Lc-Task-Id"
"""On a result or dead letter: the id of the task it belongs to."""
