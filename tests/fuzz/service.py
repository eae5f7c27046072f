"""The service under attack: every consumer of untrusted traffic the package has, on one client.

- an ``A2ABus`` with a core task subscription in a queue group (``agents.fz.tasks.*``),
  a durable task subscription (``agents.fzd.tasks.>``), ``subscribe_to_events`` on
  ``*.events.>`` and on ``system.events.>``; the task handlers return a value, so a
  task that asks for a reply gets one;
- a ``WorkQueue`` worker on ``orchestrator.tasks.>`` and ``subscribe_to_results`` on
  the session ``fuzz-s``;
- a ``NatsWebSocketManager`` with a ``subscribe_to_trade_events`` handler on
  ``BTCUSDT``: it must receive nothing, since no trade is published during an example
  (unless ``expect_trades``: the trade property publishes them).

Every handler records the ids it saw per channel (``seen``), which the harness uses as
its barrier: a sentinel message published after the attacker's, on the attacker's own
connection, reaches each handler after everything the attacker sent before it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from liquidcrypto import A2ABus, Envelope, NatsWebSocketManager, OrchestratorTask, TaskResult, WorkQueue
from liquidcrypto.a2a.durable import DurableSubscription
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.workqueue.results import ResultSubscription

SESSION = "fuzz-s"
CORE_AGENT = "fz"
DURABLE_AGENT = "fzd"
DURABLE = "fuzz-durable"
QUEUE = "fuzz-workers"
SYMBOL = "BTCUSDT"
CHANNELS = ("core", "durable", "events", "system", "work", "results")


class Service:
    """The consumers listed in the module docstring, on ``client``."""

    def __init__(self, client: NatsClient, *, expect_trades: bool = False) -> None:
        self.client = client
        self.expect_trades = expect_trades
        self.bus = A2ABus(client)
        self.wq = WorkQueue(client)
        self.manager = NatsWebSocketManager(client)
        self.seen: defaultdict[str, set[str]] = defaultdict(set)
        self.trades: list[Any] = []
        self.durable: DurableSubscription | None = None
        self.results: ResultSubscription | None = None

    async def start(self) -> None:
        bus = self.bus
        await bus.subscribe_to_tasks(f"{CORE_AGENT}.tasks.*", self._core_task, queue=QUEUE)
        durable = await bus.subscribe_to_tasks(f"{DURABLE_AGENT}.tasks.>", self._durable_task, durable=DURABLE)
        assert isinstance(durable, DurableSubscription)
        self.durable = durable
        await bus.subscribe_to_events("*.events.>", self._event)
        await bus.subscribe_to_events("system.events.>", self._system)
        await self.wq.start_orchestrator_worker(self._work)
        self.results = await self.wq.subscribe_to_results(SESSION, self._result)
        await self.manager.init()
        await self.manager.subscribe_to_trade_events([SYMBOL], self._trade)

    async def close(self) -> None:
        """Stop every consumer (together: each waits for its open pull requests to expire)."""
        results = self.results.unsubscribe() if self.results is not None else asyncio.sleep(0)
        await asyncio.gather(self.manager.close(), results, self.wq.close(), self.bus.close())

    def problems(self) -> list[str]:
        """What is not running any more (each consumer must outlive any input)."""
        out = []
        if self.durable is None or self.durable.closed or not self.durable._pull.running:
            out.append("the durable task subscription stopped")
        if self.results is None or not self.results.active:
            out.append("the results subscription stopped")
        workers = self.wq._workers
        if len(workers) != 1 or not workers[0]._pull.running:
            out.append("the orchestrator worker stopped")
        if self.trades and not self.expect_trades:
            out.append(f"the trade handler received {len(self.trades)} trade(s): {self.trades[:3]!r}")
        return out

    # -- handlers: plain, well-behaved application code --------------------------

    async def _core_task(self, task: Envelope) -> dict[str, Any]:
        self.seen["core"].add(task.id)
        return {"echo": task.type}

    async def _durable_task(self, task: Envelope) -> dict[str, Any]:
        self.seen["durable"].add(task.id)
        return {"durable": task.type}

    async def _event(self, event: Envelope) -> None:
        self.seen["events"].add(event.id)

    async def _system(self, event: Envelope) -> None:
        self.seen["system"].add(event.id)

    async def _work(self, task: OrchestratorTask) -> dict[str, Any]:
        self.seen["work"].add(task.sub_prd_id)
        return {"success": True, "result": {"payloadType": type(task.payload).__name__}}

    async def _result(self, result: TaskResult) -> None:
        self.seen["results"].add(result.sub_prd_id)

    async def _trade(self, data: Any) -> None:
        self.trades.append(data)
        if isinstance(data, dict) and isinstance(data.get("sentinel"), str):
            self.seen["trades"].add(data["sentinel"])
