"""Work-queue scenarios across worker processes: exactly once, and a SIGKILL mid-task."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from liquidcrypto import WorkQueue
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, ready: Path) -> None:
        self.proc, self.log, self.ready = proc, log, ready

    def runs(self) -> list[str]:
        return self.log.read_text().split() if self.log.exists() else []


@pytest.fixture
def spawn(tmp_path: Path, nats_server: NatsServer) -> Iterator[object]:
    procs: list[Proc] = []

    def start(name: str, *extra: str) -> Proc:
        log, ready = tmp_path / f"{name}.log", tmp_path / f"{name}.ready"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.workqueue.worker_proc", nats_server.url, str(log), str(ready), *extra],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        procs.append(Proc(proc, log, ready))
        return procs[-1]

    try:
        yield start
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.terminate()
                try:
                    p.proc.wait(20)
                except subprocess.TimeoutExpired:
                    p.proc.kill()
                    p.proc.wait()


async def wait_ready(*procs: Proc) -> None:
    for p in procs:
        await eventually(lambda p=p: p.ready.exists() or p.proc.poll() is not None, timeout=30, what="worker ready")
        assert p.proc.poll() is None, "worker process exited early"


async def enqueue_all(wq: WorkQueue, session: str, n: int) -> None:
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with sem:
            await wq.enqueue_orchestrator_task({"sessionId": session, "subPrdId": f"t{i}", "payload": {"i": i}})

    await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.slow
async def test_1000_tasks_over_4_workers_in_2_processes_each_once(client: NatsClient, spawn: object) -> None:
    a = spawn("a", "--workers", "2", "--concurrency", "2")  # type: ignore[operator]
    b = spawn("b", "--workers", "2", "--concurrency", "2")  # type: ignore[operator]
    await wait_ready(a, b)
    wq = WorkQueue(client)
    await enqueue_all(wq, "big", 1000)
    results = await wq.collect_results("big", 1000, timeout=90.0)
    assert results.complete and len(results) == 1000 and all(r.success for r in results)
    runs = Counter(a.runs() + b.runs())
    assert len(runs) == 1000 and set(runs.values()) == {1}, "a task ran twice or never"
    assert a.runs() and b.runs(), "both processes took work"
    assert {r.result["pid"] for r in results} == {a.proc.pid, b.proc.pid}


@pytest.mark.slow
async def test_sigkill_of_a_worker_process_mid_task_completes_every_task_once_in_effect(
    client: NatsClient, spawn: object
) -> None:
    args = ("--workers", "2", "--concurrency", "2", "--delay", "0.05", "--ack-wait", "2")
    a = spawn("a", *args)  # type: ignore[operator]
    b = spawn("b", *args)  # type: ignore[operator]
    await wait_ready(a, b)
    wq = WorkQueue(client)
    await enqueue_all(wq, "crash", 300)
    await eventually(lambda: len(a.runs()) >= 40, timeout=30, what="process a busy")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    results = await wq.collect_results("crash", 300, timeout=60.0)
    assert results.complete and len({r.sub_prd_id for r in results}) == 300
    assert all(r.success for r in results)
    runs = Counter(a.runs() + b.runs())
    assert len(runs) == 300
    twice = {t for t, n in runs.items() if n > 1}
    print(f"killed process ran {len(a.runs())} task(s); {len(twice)} ran again elsewhere")
    # Only what `a` held when it died can run again: it never held more than its 4 slots.
    assert twice <= set(a.runs()) and len(twice) <= 4
    assert max(runs.values()) <= 2


@pytest.mark.slow
async def test_plain_handler_blocking_longer_than_ack_wait_runs_once(client: NatsClient, spawn: object) -> None:
    """A plain (non-async) handler works for 6 s with ack_wait 2 s in one of two worker
    processes: it runs in a thread, the event loop keeps sending in_progress, and the
    other process never gets the task."""
    args = ("--workers", "1", "--concurrency", "1", "--ack-wait", "2", "--sync-sleep", "6")
    a = spawn("a", *args)  # type: ignore[operator]
    b = spawn("b", *args)  # type: ignore[operator]
    await wait_ready(a, b)
    wq = WorkQueue(client)
    await wq.enqueue_orchestrator_task({"sessionId": "sync", "subPrdId": "blocking"})
    results = await wq.collect_results("sync", 1, timeout=30.0)
    assert results.complete and results[0].success
    assert a.runs() + b.runs() == ["blocking"], f"ran in a: {a.runs()}, in b: {b.runs()}"
