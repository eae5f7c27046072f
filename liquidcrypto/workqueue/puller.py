"""Pull requests sized to the free handler slots, with messages delivered by callback.

nats-py's ``fetch(n)`` waits for all ``n`` messages (or its timeout) once the first
has arrived, so a worker with free slots would sit on delivered tasks. ``Puller``
sends the JetStream pull request itself (``$JS.API.CONSUMER.MSG.NEXT``, ``batch`` =
free slots, short ``expires``) and hands each message over the moment it arrives. It
keeps count of what was requested and not yet delivered, so the worker never asks for
more than it can run: requested + running <= concurrency.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats.client import NatsClient

log = logging.getLogger(__name__)

PULL_EXPIRES = 1.0
# A request whose expiry status never came (lost in a reconnect) is forgotten after this.
GRACE = 2.0


class Puller:
    """Pull requests on one durable consumer, on one inbox subscription."""

    def __init__(
        self,
        client: NatsClient,
        stream: str,
        consumer: str,
        on_task: Callable[[Msg], None],
        on_status: Callable[[], None],
        *,
        expires: float = PULL_EXPIRES,
    ) -> None:
        self.client = client
        self._on_task = on_task
        self._on_status = on_status
        self.expires = expires
        self._next_subject = f"{client.js._prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: Subscription | None = None
        # FIFO of [still expected, forget-after deadline], one per pull request.
        self._requests: collections.deque[list[float]] = collections.deque()
        self.consumer_gone = False

    @property
    def outstanding(self) -> int:
        """Messages requested and not yet delivered or expired."""
        return int(sum(r[0] for r in self._requests))

    async def open(self) -> None:
        nc = self.client.nc
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        self._requests.clear()
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - closing must not raise
                log.debug("puller unsubscribe: %s", exc)

    def reset(self) -> None:
        """Forget the requests (the server lost them, e.g. it restarted)."""
        self._requests.clear()

    async def request(self, batch: int) -> None:
        """Ask for up to ``batch`` messages, delivered within ``expires`` seconds."""
        body = orjson.dumps({"batch": batch, "expires": int(self.expires * 1e9)})
        # Counted before the await, so concurrent callers never ask twice for one slot.
        entry = [float(batch), time.monotonic() + self.expires + GRACE]
        self._requests.append(entry)
        try:
            await self.client.nc.publish(self._next_subject, body, reply=self._inbox)
        except BaseException:
            if entry in self._requests:
                self._requests.remove(entry)
            raise

    def expire_stale(self) -> None:
        now = time.monotonic()
        while self._requests and self._requests[0][1] < now:
            self._requests.popleft()

    def seconds_to_next_deadline(self) -> float | None:
        if not self._requests:
            return None
        return max(0.0, self._requests[0][1] - time.monotonic())

    def _release(self, n: int) -> None:
        while n > 0 and self._requests:
            head = self._requests[0]
            take = min(n, int(head[0]))
            head[0] -= take
            n -= take
            if head[0] <= 0:
                self._requests.popleft()
                self._on_status()  # a request is complete: the owner may ask for more

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(hdr.STATUS) if msg.headers else None
        if not status:
            self._release(1)
            self._on_task(msg)
            return
        if status == "100":  # idle heartbeat
            return
        pending = (msg.headers or {}).get(hdr.PENDING_MESSAGES)
        if pending is not None:
            self._release(int(pending))
        elif self._requests:
            self._requests.popleft()
        desc = (msg.headers or {}).get(hdr.DESCRIPTION, "")
        if status == "409" or (status == "404" and "consumer" in desc.lower()):
            if "Deleted" in desc or "push" in desc or "not found" in desc.lower():
                self.consumer_gone = True
            if "Exceeded" in desc:
                log.warning("pull request refused: %s", desc)
            else:
                log.info("pull request ended: %s %s", status, desc)
        self._on_status()
