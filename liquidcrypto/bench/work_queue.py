"""Benchmark: end-to-end tasks/s of the work queue against a raw nats-py loop.

Each round enqueues N no-op tasks (``Nats-Msg-Id`` per task), runs them on a worker
with C concurrent handlers (result published with its own ``Nats-Msg-Id``, then
``ack_sync``), and collects the N results; the clock runs from the first enqueue to
the last result collected. The baseline is the same loop written directly on nats-py
(C coroutines, each with its own pull subscription: the fast way per NATS-NOTES) on an
identical work-queue stream, in the same run against the same nats-server.

``python benchmarks/work_queue.py [--tasks N] [--concurrency 1,4,16] [--rounds R] [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from rich.console import Console
from rich.table import Table

from liquidcrypto.config import Settings
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from liquidcrypto.workqueue.models import OrchestratorTask
from liquidcrypto.workqueue.queue import WorkQueue

ENQUEUE_WINDOW = 64
RAW_STREAM = "RAW_BENCH_TASKS"


async def _enqueue_all(n: int, one: Callable[[int], Awaitable[Any]]) -> None:
    sem = asyncio.Semaphore(ENQUEUE_WINDOW)

    async def run(i: int) -> None:
        async with sem:
            await one(i)

    await asyncio.gather(*(run(i) for i in range(n)))


async def bench_liquidcrypto(url: str, n: int, concurrency: int) -> float:
    """Tasks/s through ``WorkQueue``: enqueue, worker, collect_results."""
    async with NatsClient(url, settings=Settings()) as client:
        await client.wait_connected(15)
        wq = WorkQueue(client)

        async def noop(task: OrchestratorTask) -> dict[str, Any]:  # a plain one would run in a thread
            return {"success": True}

        stop = await wq.start_orchestrator_worker(noop, concurrency=concurrency)
        session = uuid.uuid4().hex[:12]
        start = time.perf_counter()
        enq = asyncio.create_task(
            _enqueue_all(
                n,
                lambda i: wq.enqueue_orchestrator_task(
                    {"sessionId": session, "subPrdId": f"t{i}", "payload": {"i": i}}
                ),
            )
        )
        results = await wq.collect_results(session, n, timeout=300.0)
        elapsed = time.perf_counter() - start
        await enq
        await stop()
        if not results.complete:
            raise RuntimeError(f"liquidcrypto round incomplete: {len(results)}/{n}")
        return n / elapsed


async def bench_raw(url: str, n: int, concurrency: int) -> float:
    """Tasks/s of the same loop on plain nats-py."""
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=5)
    await js.add_stream(
        StreamConfig(
            name=RAW_STREAM,
            subjects=["raw.tasks.>", "raw.results.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=3600.0,
        )
    )
    durable = "raw-workers"
    await js.add_consumer(
        RAW_STREAM,
        ConsumerConfig(
            durable_name=durable,
            filter_subject="raw.tasks.>",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_ack_pending=10_000,
        ),
    )
    running = True

    async def worker() -> None:
        psub = await js.pull_subscribe_bind(durable, stream=RAW_STREAM)
        while running:
            try:
                msgs = await psub.fetch(1, timeout=1.0)
            except TimeoutError:
                continue
            for msg in msgs:
                task = orjson.loads(msg.data)
                result = {
                    "sessionId": task["sessionId"],
                    "subPrdId": task["subPrdId"],
                    "success": True,
                    "completedAt": int(time.time() * 1000),
                }
                await js.publish(
                    f"raw.results.{task['sessionId']}.{task['subPrdId']}",
                    orjson.dumps(result),
                    headers={"Nats-Msg-Id": "result." + (msg.headers or {})["Nats-Msg-Id"]},
                )
                await msg.ack_sync()
        await psub.unsubscribe()

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    session = uuid.uuid4().hex[:12]
    seen: set[str] = set()
    all_in = asyncio.Event()

    async def on_result(msg: Any) -> None:
        seen.add(orjson.loads(msg.data)["subPrdId"])
        await msg.ack()
        if len(seen) >= n:
            all_in.set()

    # The idiomatic fast collector on plain nats-py: a push consumer with a callback.
    collector = await js.subscribe(
        f"raw.results.{session}.>",
        stream=RAW_STREAM,
        cb=on_result,
        manual_ack=True,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
    )

    async def enqueue(i: int) -> None:
        body = {"sessionId": session, "subPrdId": f"t{i}", "payload": {"i": i}, "createdAt": int(time.time() * 1000)}
        await js.publish(f"raw.tasks.{session}.t{i}", orjson.dumps(body), headers={"Nats-Msg-Id": f"{session}.t{i}"})

    start = time.perf_counter()
    enq = asyncio.create_task(_enqueue_all(n, enqueue))
    await asyncio.wait_for(all_in.wait(), 300)
    elapsed = time.perf_counter() - start
    await enq
    running = False
    await asyncio.gather(*workers)
    await collector.unsubscribe()
    await js.delete_stream(RAW_STREAM)
    await nc.close()
    return n / elapsed


async def run(tasks: int, levels: list[int], rounds: int) -> list[tuple[int, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="lc-bench-wq-") as tmp, NatsServer(tmp) as server:
        await bench_raw(server.url, min(tasks, 200), 2)  # warm up the server and both code paths
        await bench_liquidcrypto(server.url, min(tasks, 200), 2)
        for c in levels:
            ours = raw = 0.0
            for _ in range(rounds):
                raw = max(raw, await bench_raw(server.url, tasks, c))
                ours = max(ours, await bench_liquidcrypto(server.url, tasks, c))
            rows.append((c, ours, raw))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--tasks", type=int, default=3000, help="tasks per round")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated handler counts")
    p.add_argument("--rounds", type=int, default=2, help="rounds per level (best is shown)")
    p.add_argument("--quick", action="store_true", help="a few hundred tasks, one round (smoke test)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    tasks, rounds = (300, 1) if args.quick else (args.tasks, args.rounds)
    rows = asyncio.run(run(tasks, levels, rounds))
    table = Table(title=f"work queue end-to-end, {tasks} no-op tasks (enqueue -> worker -> collected)")
    table.add_column("handlers", justify="right")
    table.add_column("liquidcrypto tasks/s", justify="right")
    table.add_column("raw nats-py tasks/s", justify="right")
    table.add_column("ratio", justify="right")
    for c, ours, raw in rows:
        table.add_row(str(c), f"{ours:,.0f}", f"{raw:,.0f}", f"{ours / raw:.0%}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
