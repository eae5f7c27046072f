"""Agent registry: agent cards in the JetStream key-value bucket ``A2A_AGENTS``, kept live
by heartbeats.

Each registered agent has one key (its id). A heartbeat rewrites the key and publishes an
envelope on ``agents.{agent_id}.heartbeat``. Liveness is judged from the *server's*
timestamp of the key's last write, so the clocks of the agents do not matter: an agent
whose last write is older than the TTL (``A2A_AGENT_TTL``, default 30 s) is offline.
Keys of agents silent for a day expire from the bucket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from liquidcrypto import codec
from liquidcrypto.a2a.kv import kv_key, open_bucket
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient

log = logging.getLogger(__name__)

AGENTS_BUCKET = streams.A2A_AGENTS


class AgentCard(codec.Model, frozen=True, kw_only=True, dict=True):
    """What an agent tells others about itself (a small A2A agent card).

    Keys beyond the fields below (an A2A card's ``url``, ``capabilities``...) are kept
    when the card is read (``from_dict``, ``decode``), written after the fields
    (``to_dict``, ``encode``), and readable as attributes (``card.url``) or as the dict
    ``card.extra``. Keyword construction takes the fields only.
    """

    id: str
    name: str = ""
    version: str = "0"
    description: str = ""
    skills: list[str] = msgspec.field(default_factory=list)
    """The task types the agent handles."""
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def extra(self) -> dict[str, Any]:
        """The card's keys beyond its fields, as given (a copy)."""
        return dict(self.__dict__.get("_extra", {}))

    if not TYPE_CHECKING:  # the checker keeps rejecting unknown attributes

        def __getattr__(self, name: str) -> Any:
            try:
                return self.__dict__["_extra"][name]
            except KeyError:
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """A card from a mapping, keeping its extra keys (see the class).

        Raises:
            InvalidPayloadError: a field is missing or of the wrong type.
        """
        card = super().from_dict(data)
        extra = {k: v for k, v in data.items() if k not in cls.__struct_fields__}
        if extra:
            msgspec.structs.force_setattr(card, "_extra", extra)
        return card

    @classmethod
    def try_decode(cls, raw: bytes) -> Self | None:
        """Never: the typed pass would drop the extra keys, so ``decode`` reads a dict."""
        return None

    def to_dict(self, *, exclude: Collection[str] = ()) -> dict[str, Any]:
        """The fields, then the extra keys (see the class)."""
        out = super().to_dict(exclude=exclude)
        out.update((k, v) for k, v in self.extra.items() if k not in exclude)
        return out

    def encode(self) -> bytes:
        """``to_dict()`` as JSON bytes."""
        return codec.encode(self.to_dict())


class AgentInfo(codec.Model, frozen=True, kw_only=True):
    """A registered agent as ``list_agents()`` reports it."""

    card: AgentCard
    last_heartbeat: datetime
    online: bool
    status: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return self.card.id


class _Stored(codec.Model, frozen=True, kw_only=True):
    """The value of an agent's key: its card (as a dict, extra keys included) and status."""

    card: dict[str, Any]
    status: dict[str, Any] | None = None


def _store(card: AgentCard, status: dict[str, Any] | None) -> bytes:
    return _Stored(card=card.to_dict(), status=status).encode()


def _load(raw: bytes | None) -> tuple[AgentCard, dict[str, Any] | None]:
    """The card and status in a key's value.

    Raises:
        InvalidPayloadError: the value is not a stored card.
    """
    stored = _Stored.decode(raw or b"")
    return AgentCard.from_dict(stored.card), stored.status


Beat = Callable[[str, dict[str, Any] | None], Awaitable[None]]


class AgentRegistry:
    """Cards in the bucket plus one owned heartbeat task per locally registered agent."""

    def __init__(
        self,
        client: NatsClient,
        *,
        ttl: float,
        interval: float,
        beat: Beat,
        closed: Callable[[], bool] = lambda: False,
    ) -> None:
        """
        Args:
            client: the client whose JetStream holds the bucket.
            ttl: seconds without a heartbeat after which an agent is offline.
            interval: seconds between heartbeats of the agents registered here.
            beat: publishes the heartbeat message of an agent (the bus's).
            closed: whether the connection was closed for good (heartbeat loops then end).
        """
        self._client = client
        self.ttl = ttl
        self.interval = interval
        self._beat = beat
        self._closed = closed
        self._kv: KeyValue | None = None
        self._cards: dict[str, AgentCard] = {}
        self._status: dict[str, dict[str, Any] | None] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_bucket(self._client, AGENTS_BUCKET)
        return self._kv

    async def register(self, card: AgentCard, *, heartbeat: bool = True) -> AgentCard:
        """Store ``card`` and (by default) keep it live with periodic heartbeats."""
        kv_key(card.id, "agent_id")
        self._cards[card.id] = card
        await self.heartbeat(card.id)
        if heartbeat and card.id not in self._tasks:
            task = asyncio.create_task(self._heartbeat_loop(card.id), name=f"a2a-heartbeat-{card.id}")
            self._tasks[card.id] = task
        log.info("registered agent %s (skills %s)", card.id, ",".join(card.skills) or "-")
        return card

    async def heartbeat(self, agent_id: str, status: dict[str, Any] | None = None) -> None:
        """Refresh the agent's key and publish ``agents.{agent_id}.heartbeat``.

        Raises:
            KeyError: the agent is registered neither here nor in the bucket.
        """
        key = kv_key(agent_id, "agent_id")
        if status is not None:
            self._status[agent_id] = status
        card = self._cards.get(agent_id)
        kv = await self.bucket()
        if card is None:
            try:
                card, _ = _load((await kv.get(key)).value)
            except nats.js.errors.KeyNotFoundError:
                raise KeyError(f"agent {agent_id!r} is not registered") from None
        await kv.put(key, _store(card, self._status.get(agent_id)))
        await self._beat(agent_id, self._status.get(agent_id))

    async def _heartbeat_loop(self, agent_id: str) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._closed():
                log.info("heartbeats of agent %s stop: the NATS client was closed", agent_id)
                self._tasks.pop(agent_id, None)
                return
            try:
                await self.heartbeat(agent_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried next interval
                log.warning("heartbeat of agent %s failed: %s", agent_id, exc)

    async def deregister(self, agent_id: str) -> None:
        """Stop heart-beating and remove the agent's card."""
        key = kv_key(agent_id, "agent_id")
        await self._stop_loop(agent_id)
        self._cards.pop(agent_id, None)
        self._status.pop(agent_id, None)
        kv = await self.bucket()
        await kv.delete(key)
        log.info("deregistered agent %s", agent_id)

    async def list(self, include_offline: bool = False) -> list[AgentInfo]:
        """The registered agents (only the live ones unless ``include_offline``), by id."""
        kv = await self.bucket()
        watcher = await kv.watchall()
        now = datetime.now(UTC)
        out: list[AgentInfo] = []
        try:
            while True:
                entry = await watcher.updates(timeout=5)  # type: ignore[no-untyped-call]
                if entry is None:
                    break
                if entry.operation is not None or not entry.value:
                    continue  # a deregistered agent's delete marker
                try:
                    card, status = _load(entry.value)
                except ValueError as exc:
                    log.warning("skipping unreadable card %s in %s: %s", entry.key, AGENTS_BUCKET, exc)
                else:
                    seen = _as_datetime(entry.created) or now
                    online = (now - seen).total_seconds() <= self.ttl
                    if online or include_offline:
                        out.append(AgentInfo(card=card, last_heartbeat=seen, online=online, status=status))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return sorted(out, key=lambda a: a.card.id)

    async def _stop_loop(self, agent_id: str) -> None:
        task = self._tasks.pop(agent_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        """Stop every heartbeat task (cards stay until they expire as offline)."""
        for agent_id in list(self._tasks):
            await self._stop_loop(agent_id)


def _as_datetime(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None
