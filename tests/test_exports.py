"""The public surface is deliberate: one ``__all__`` in ``liquidcrypto``, each name at one door."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import liquidcrypto
import liquidcrypto.nats as transport

SPEC_CLIENT = {"init_nats", "close_nats", "is_nats_connected", "get_nats_health", "publish", "subscribe", "request"}
SPEC_A2A = {"publish_task", "publish_event", "publish_system_event", "subscribe_to_tasks", "subscribe_to_events"}
SPEC_WORK_QUEUE = {"enqueue_orchestrator_task", "start_orchestrator_worker", "collect_results", "subscribe_to_results"}
CLASSES = {"NatsClient", "A2ABus", "WorkQueue", "NatsWebSocketManager"}


def test_all_is_sorted_and_importable() -> None:
    assert liquidcrypto.__all__ == sorted(liquidcrypto.__all__)
    assert len(set(liquidcrypto.__all__)) == len(liquidcrypto.__all__)
    for name in liquidcrypto.__all__:
        assert hasattr(liquidcrypto, name), name


def test_the_spec_functions_and_the_classes_are_exported() -> None:
    assert set(liquidcrypto.__all__) >= SPEC_CLIENT | SPEC_A2A | SPEC_WORK_QUEUE | CLASSES


def test_the_transport_exports_the_client_only() -> None:
    assert transport.__all__ == sorted(transport.__all__)
    assert set(transport.__all__) >= SPEC_CLIENT
    for name in transport.__all__:
        assert getattr(transport, name) is getattr(liquidcrypto, name), name
    assert not set(transport.__all__) & (SPEC_A2A | SPEC_WORK_QUEUE)


@pytest.mark.parametrize("package", ["liquidcrypto.a2a", "liquidcrypto.workqueue", "liquidcrypto.fanout"])
def test_component_packages_are_not_a_second_door(package: str) -> None:
    module = importlib.import_module(package)
    public = {n for n in vars(module) if not n.startswith("_")} - {"annotations"}
    submodules = {m.name for m in pkgutil.iter_modules(module.__path__)}
    assert public <= submodules, f"{package} re-exports {sorted(public - submodules)}"


@pytest.mark.parametrize(
    "old",
    [
        "liquidcrypto.nats.a2a_bus",
        "liquidcrypto.nats.a2a",
        "liquidcrypto.nats.work_queue",
        "liquidcrypto.nats.wq",
        "liquidcrypto.websocket_nats",
        "liquidcrypto.ws",
    ],
)
def test_the_old_facades_are_gone(old: str) -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)


def test_each_public_name_is_defined_once_in_the_package() -> None:
    """No module's ``__all__`` repeats a name that another module defines."""
    owners: dict[str, list[str]] = {}
    for info in pkgutil.walk_packages(liquidcrypto.__path__, "liquidcrypto."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            home = getattr(obj, "__module__", info.name)
            if home == info.name:
                owners.setdefault(name, []).append(info.name)
            elif info.name not in ("liquidcrypto.nats",):
                owners.setdefault(name, []).append(f"{info.name} (re-export of {home})")
    doubles = {n: m for n, m in owners.items() if len(m) > 1}
    assert not doubles, doubles
