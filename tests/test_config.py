from __future__ import annotations

import gc
from pathlib import Path

import pytest

from liquidcrypto.app import tune_gc
from liquidcrypto.config import Settings
from tests.helpers import documented_variables, package_variables


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.nats_url == "nats://localhost:4222"
    assert s.js_replicas == 1
    assert s.ws_backend == "nats"
    assert s.redis_url == "redis://localhost:6379"
    assert (s.host, s.port) == ("127.0.0.1", 3000)
    assert s.state_dir == Path(".liquidcrypto")
    assert (s.ws_write_delay, s.gc_gen0_threshold) == (0.0, 50_000)


def test_values_from_env() -> None:
    s = Settings.from_env(
        {
            "NATS_URL": "nats://a:4222, nats://b:4222",
            "NATS_JS_REPLICAS": "3",
            "WS_BACKEND": "Redis",
            "PORT": "8080",
            "NATS_TOKEN": "s3cret",
            "WS_WRITE_DELAY": "0.005",
            "GC_GEN0_THRESHOLD": "0",
        }
    )
    assert (s.ws_write_delay, s.gc_gen0_threshold) == (0.005, 0)
    assert s.nats_servers() == ["nats://a:4222", "nats://b:4222"]
    assert s.js_replicas == 3
    assert s.ws_backend == "redis"
    assert s.port == 8080
    assert s.nats_token == "s3cret"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "eighty"}, "PORT='eighty'"),
        ({"NATS_JS_REPLICAS": "7"}, "NATS_JS_REPLICAS=7"),
        ({"WS_BACKEND": "kafka"}, "WS_BACKEND='kafka'"),
        ({"NATS_DEDUPE_WINDOW": "soon"}, "NATS_DEDUPE_WINDOW='soon'"),
        ({"WS_WRITE_DELAY": "5"}, "WS_WRITE_DELAY=5 must be 0 to 1 seconds"),
        ({"GC_GEN0_THRESHOLD": "lots"}, "GC_GEN0_THRESHOLD='lots'"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Settings.from_env(env)
    assert message in str(info.value)


def test_tune_gc_freezes_start_up_objects_and_raises_the_gen0_threshold() -> None:
    before = gc.get_threshold()
    gc.unfreeze()  # an app started earlier in this process (lifespan) already tuned it
    try:
        tune_gc(0)
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
        tune_gc(12_345)
        assert gc.get_threshold() == (12_345, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_every_environment_variable_is_documented() -> None:
    read = package_variables()
    assert {"NATS_URL", "WS_WRITE_DELAY", "GC_GEN0_THRESHOLD", "NATS_SERVER_BIN"} <= read
    assert sorted(read - documented_variables("docs/configuration.md")) == []
