"""The work queue on a 3-node cluster with replicated streams (NATS_JS_REPLICAS=3)."""

from __future__ import annotations

from typing import Any

import pytest

from liquidcrypto import OrchestratorTask, WorkQueue, list_dead_letters
from liquidcrypto.config import Settings
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsCluster
from liquidcrypto.workqueue import infra


@pytest.mark.cluster
async def test_work_queue_on_a_replicated_cluster(nats_cluster: NatsCluster) -> None:
    async with NatsClient(nats_cluster.url, settings=Settings(js_replicas=3)) as client:
        await client.wait_connected(30)
        async with WorkQueue(client) as wq:
            for i in range(30):
                await wq.enqueue_orchestrator_task({"sessionId": "c", "subPrdId": f"t{i}"})

            def handler(t: OrchestratorTask) -> dict[str, Any]:
                if t.sub_prd_id == "t7":
                    raise RuntimeError("always")
                return {"success": True}

            await wq.start_orchestrator_worker(handler, concurrency=4, max_deliver=2, backoff=[0.05])
            results = await wq.collect_results("c", 30, timeout=30.0)
        assert results.complete
        assert [r.sub_prd_id for r in results if not r.success] == ["t7"]
        [letter] = await list_dead_letters(client)
        assert letter.task_id == "c.t7" and letter.attempts == 2
        for name in (infra.DLQ_STREAM, f"KV_{infra.ATTEMPTS_BUCKET}"):
            info = await client.js.stream_info(name)
            assert info.config.num_replicas == 3
