"""The JetStream resource registry: declared values, per-component groups, and the
client ensuring what components require, now and after every reconnection."""

from __future__ import annotations

import dataclasses

import pytest
from nats.js.api import ConsumerInfo, RetentionPolicy, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError

from liquidcrypto.config import Settings
from liquidcrypto.errors import StreamConflictError
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from tests.helpers import eventually

GROUPS = (streams.SPEC_STREAMS, streams.WORK_QUEUE_RESOURCES, streams.A2A_RESOURCES)


def test_every_resource_is_declared_once_in_one_group() -> None:
    assert streams.STREAM_NAMES == (streams.A2A_TASKS, streams.ORCHESTRATOR_TASKS, streams.TRADE_EVENTS)
    names = [n for g in GROUPS for n in g.stream_names] + [b.bucket for g in GROUPS for b in g.buckets]
    assert len(names) == len(set(names))
    assert streams.ORCHESTRATOR_DLQ in streams.WORK_QUEUE_RESOURCES.stream_names
    assert {b.bucket for b in streams.A2A_RESOURCES.buckets} == {
        streams.A2A_TASK_STATES,
        streams.A2A_AGENTS,
        streams.A2A_HANDLED,
    }


def test_deployed_applies_replicas_and_the_work_queue_window() -> None:
    dlq = streams.deployed(streams.ORCHESTRATOR_DLQ_STREAM, replicas=3, dedupe_window=30 * 24 * 3600.0)
    assert dlq.num_replicas == 3
    assert dlq.duplicate_window == streams.DLQ_MAX_AGE  # capped at the stream's max age
    tasks = streams.deployed(streams.ORCHESTRATOR_TASKS_STREAM, replicas=1, dedupe_window=600.0)
    assert tasks.duplicate_window == 600.0
    a2a = streams.deployed(streams.A2A_TASKS_STREAM, replicas=1, dedupe_window=600.0)
    assert a2a.duplicate_window == streams.A2A_MAX_AGE  # not a work-queue stream
    assert streams.ORCHESTRATOR_DLQ_STREAM.num_replicas == 1  # the declared value is untouched


async def test_require_ensures_now_and_after_every_reconnection(client: NatsClient, nats_server: NatsServer) -> None:
    await client.require(streams.WORK_QUEUE_RESOURCES)
    await client.require(streams.WORK_QUEUE_RESOURCES)  # idempotent
    assert (await client.js.stream_info(streams.ORCHESTRATOR_DLQ)).config.retention == RetentionPolicy.LIMITS
    await client.js.key_value(streams.ORCHESTRATOR_ATTEMPTS)
    # Health counts the spec's streams only, whatever components require.
    assert (await client.health())["jetstream"]["streams"] == 3

    await client.js.delete_stream(streams.ORCHESTRATOR_DLQ)
    await client.js.delete_key_value(streams.ORCHESTRATOR_ATTEMPTS)
    nats_server.restart()

    async def recreated() -> bool:
        try:
            await client.js.stream_info(streams.ORCHESTRATOR_DLQ)
            await client.js.key_value(streams.ORCHESTRATOR_ATTEMPTS)
        except (NotFoundError, BucketNotFoundError):
            return False
        except Exception:  # noqa: BLE001 - reconnecting
            return False
        return True

    await eventually(recreated, timeout=15, what="required resources recreated after reconnect")


async def test_require_reports_a_stream_with_another_retention(client: NatsClient) -> None:
    await client.js.add_stream(
        StreamConfig(name=streams.ORCHESTRATOR_DLQ, subjects=["orchestrator.dlq.>"], retention=RetentionPolicy.INTEREST)
    )
    with pytest.raises(StreamConflictError, match=streams.ORCHESTRATOR_DLQ):
        await client.require(streams.WORK_QUEUE_RESOURCES)
    assert [streams.ORCHESTRATOR_DLQ in str(e) for e in client.stream_conflicts] == [True]
    # The rest of the group is still ensured; the stream in conflict is left as it is.
    await client.js.key_value(streams.ORCHESTRATOR_ATTEMPTS)
    info = await client.js.stream_info(streams.ORCHESTRATOR_DLQ)
    assert info.config.retention == RetentionPolicy.INTEREST
    assert await client.provision() == client.stream_conflicts


async def test_without_provision_the_client_ensures_only_what_is_required(nats_server: NatsServer) -> None:
    async with NatsClient(nats_server.url, settings=Settings(), provision=False) as c:
        await c.wait_connected(10)
        assert (await c.health())["jetstream"] == {"enabled": True, "streams": 0}
        await c.require(streams.A2A_RESOURCES)
        for bucket in streams.A2A_RESOURCES.buckets:
            await c.js.key_value(bucket.bucket)
        assert (await c.health())["jetstream"]["streams"] == 0


async def test_ensure_consumer_creates_keeps_or_updates(client: NatsClient) -> None:
    wanted = streams.worker_consumer(5.0)
    created = await streams.ensure_consumer(client.js, streams.ORCHESTRATOR_TASKS, wanted)
    assert created.config.ack_wait == 5.0

    asked: list[ConsumerInfo] = []

    async def keep(info: ConsumerInfo) -> ConsumerInfo | None:
        asked.append(info)
        return info

    # Unchanged: the policy is not even asked.
    same = await streams.ensure_consumer(client.js, streams.ORCHESTRATOR_TASKS, wanted, keep=keep)
    assert same.created == created.created and asked == []
    # Differs, and the policy keeps it.
    kept = await streams.ensure_consumer(client.js, streams.ORCHESTRATOR_TASKS, streams.worker_consumer(2.0), keep=keep)
    assert kept.config.ack_wait == 5.0 and len(asked) == 1
    # Differs, no policy: updated in place.
    longer = dataclasses.replace(wanted, ack_wait=9.0)
    updated = await streams.ensure_consumer(client.js, streams.ORCHESTRATOR_TASKS, longer)
    assert updated.config.ack_wait == 9.0
