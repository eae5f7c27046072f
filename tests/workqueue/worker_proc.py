"""A worker process for the work-queue scenario tests.

``python -m tests.workqueue.worker_proc URL LOG READY --workers 2 --concurrency 2 --delay 0.05 --ack-wait 2``

Each handler run appends ``<sub_prd_id>`` to LOG with one unbuffered ``write`` before
it works (so a SIGKILL loses no record of a started run); READY is created when the
workers run. It runs until SIGTERM/SIGINT. ``--sync-sleep S`` makes the handler a plain
(non-async) function whose work is ``time.sleep(S)``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from liquidcrypto import OrchestratorTask, WorkQueue
from liquidcrypto.config import Settings
from liquidcrypto.nats.client import NatsClient


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("log")
    p.add_argument("ready")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--ack-wait", type=float, default=30.0)
    p.add_argument("--sync-sleep", type=float, default=0.0)
    args = p.parse_args(argv)
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)

    async def handler(task: OrchestratorTask) -> dict[str, Any]:
        os.write(fd, f"{task.sub_prd_id}\n".encode())
        if args.delay:
            await asyncio.sleep(args.delay)  # the task's own work
        return {"success": True, "result": {"pid": os.getpid()}}

    def sync_handler(task: OrchestratorTask) -> dict[str, Any]:
        os.write(fd, f"{task.sub_prd_id}\n".encode())
        time.sleep(args.sync_sleep)  # the task's own (blocking) work
        return {"success": True, "result": {"pid": os.getpid()}}

    async with NatsClient(args.url, settings=Settings()) as client:
        await client.wait_connected(15)
        async with WorkQueue(client) as wq:
            for _ in range(args.workers):
                await wq.start_orchestrator_worker(
                    sync_handler if args.sync_sleep else handler, concurrency=args.concurrency, ack_wait=args.ack_wait
                )
            Path(args.ready).touch()  # noqa: ASYNC240 - once, at start-up
            await done.wait()
    os.close(fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
