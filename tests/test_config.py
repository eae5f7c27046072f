from __future__ import annotations

from pathlib import Path

import pytest

from liquidcrypto.config import Settings


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.nats_url == "nats://localhost:4222"
    assert s.js_replicas == 1
    assert s.ws_backend == "nats"
    assert s.redis_url == "redis://localhost:6379"
    assert (s.host, s.port) == ("127.0.0.1", 3000)
    assert s.state_dir == Path(".liquidcrypto")


def test_values_from_env() -> None:
    s = Settings.from_env(
        {
            "NATS_URL": "nats://a:4222, nats://b:4222",
            "NATS_JS_REPLICAS": "3",
            "WS_BACKEND": "Redis",
            "PORT": "8080",
            "NATS_TOKEN": "s3cret",
        }
    )
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
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Settings.from_env(env)
    assert message in str(info.value)
