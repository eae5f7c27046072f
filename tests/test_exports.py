"""The public surface is deliberate: the spec's names, sorted, all importable."""

from __future__ import annotations

import liquidcrypto.nats as lnats

SPEC_CLIENT = {"init_nats", "close_nats", "is_nats_connected", "get_nats_health", "publish", "subscribe", "request"}


def test_all_is_sorted_and_importable() -> None:
    assert lnats.__all__ == sorted(lnats.__all__)
    for name in lnats.__all__:
        assert hasattr(lnats, name), name


def test_spec_client_functions_are_exported() -> None:
    assert set(lnats.__all__) >= SPEC_CLIENT
