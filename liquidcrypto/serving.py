"""uvicorn's HTTP and WebSocket protocols, bounded for a public edge.

Two holes in uvicorn (0.54) that one client can use against an instance, each closed by
a subclass that ``app.uvicorn_options`` hands to uvicorn:

- **A request that never completes holds its connection for ever.** The httptools
  protocol starts no timer until a request is complete, so idle or trickling sockets
  (slowloris) pile up until the process runs out of file descriptors and every new
  ``/ws`` client and health check is refused. ``DeadlineHttpProtocol`` closes a
  connection whose request headers have not all arrived ``WS_HANDSHAKE_TIMEOUT`` seconds
  after it opened (or after the previous request ended).
- **Pings from a client that never reads grow memory without bound.** The sans-I/O
  WebSocket protocol answers each ping at once, and pauses reading only for data frames:
  a client sending pings and reading nothing fills the write buffer (measured: +187 MiB
  in 8 s) and stalls the event loop. ``BoundedWebSocketProtocol`` stops reading from a
  client whose write buffer is full, until it drains.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on receiving a request's headers."""

    header_timeout: float = 10.0  # set per server by ``protocols(settings)``
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # uvicorn types it as asyncio.Transport
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a keep-alive connection's next request

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol that stops reading while it cannot write."""

    def pause_writing(self) -> None:
        super().pause_writing()
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self.read_paused:
            self.transport.resume_reading()

    async def receive(self) -> Any:
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if self.writable.is_set():  # else resume_writing resumes reading
                self.transport.resume_reading()
        return message


def protocols(header_timeout: float) -> dict[str, Any]:
    """uvicorn ``Config`` options selecting the bounded protocols."""
    http = type("DeadlineHttpProtocol", (DeadlineHttpProtocol,), {"header_timeout": header_timeout})
    return {"http": http, "ws": BoundedWebSocketProtocol}
