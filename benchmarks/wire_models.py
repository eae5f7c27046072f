"""Wire-model cost, pydantic v2 against msgspec: ``python benchmarks/wire_models.py``.

Times encode (model -> JSON bytes) and decode (JSON bytes -> validated model) of the hot
wire shapes: the A2A envelope, an orchestrator task, a task result and a ``/ws`` subscribe
frame. Needs no server. Columns:

- ``pydantic``: pydantic v2 models equivalent to the ones the project used before it
  moved to msgspec (same fields, aliases, validators), ``model_validate_json`` /
  ``__pydantic_serializer__.to_json``. The project no longer depends on pydantic: the
  column is left out unless it is installed (``pip install pydantic``).
- ``msgspec``: a typed ``msgspec.json`` decode / encode of the project's ``Struct``
  (its ``__post_init__`` validators included): the library's own cost.
- ``liquidcrypto``: the function the project calls on the path (``envelope.encode`` /
  ``envelope.decode``, ``OrchestratorTask.encode`` / ``decode_task``, ``TaskResult.encode``
  / ``decode_result``, ``Subscribe.encode`` / ``parse_client_frame``). Its decoders also
  accept the other key spellings; ``envelope.encode`` builds the message from its fields
  (reading the clock), where the other columns encode a model already built.

Figures are microseconds per operation, the median of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec

from liquidcrypto.a2a import envelope
from liquidcrypto.fanout import protocol
from liquidcrypto.nats import subjects
from liquidcrypto.workqueue import models

Op = Callable[[], object]

DATA = {"symbol": "BTCUSDT", "side": "buy", "qty": 0.5, "price": 95000.5, "client_order_id": "ord-42"}
ENVELOPE = envelope.Envelope(
    id=envelope.new_id(), kind=envelope.Kind.TASK, agent_id="trading-agent", type="execute",
    timestamp=envelope.now_ms(), data=DATA,
)
ENVELOPE_RAW = msgspec.json.encode(ENVELOPE)
TASK = models.OrchestratorTask(
    session_id="session-123", sub_prd_id="ui-component", specialist="ui-agent",
    payload={"story": "login page", "acceptance": ["renders", "validates"], "priority": 2},
)
TASK_RAW = TASK.encode()
RESULT = models.TaskResult(
    session_id="session-123", sub_prd_id="ui-component", success=True, result={"files": ["a.tsx", "b.tsx"]},
)
RESULT_RAW = RESULT.encode()
SUBSCRIBE_RAW = b'{"action":"subscribe","symbols":["BTCUSDT","ETHUSDT","SOLUSDT"],"last":50}'


# -- msgspec: a typed /ws frame (the project parses frames by hand for its messages) ---


NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class _MsgspecSubscribe(msgspec.Struct, frozen=True, kw_only=True, tag_field="action", tag="subscribe"):
    symbols: Annotated[list[str], msgspec.Meta(min_length=1, max_length=50)]
    since_seq: NonNegative | dict[str, NonNegative] | None = None
    last: NonNegative | None = None
    conflate: bool = True

    def __post_init__(self) -> None:
        for s in self.symbols:
            subjects.token(s, "symbol")


_SUBSCRIBE = msgspec.json.Decoder(_MsgspecSubscribe)


# -- pydantic v2: the models as the project had them --------------------------------


def _pydantic_ops() -> dict[str, tuple[Op, Op]] | None:
    try:
        from pydantic import BaseModel, ConfigDict, Field, field_validator
    except ImportError:
        return None

    def camel(name: str) -> str:
        head, *rest = name.split("_")
        return head + "".join(p.title() for p in rest)

    class Kind(StrEnum):
        TASK = "task"
        EVENT = "event"
        SYSTEM = "system"
        HEARTBEAT = "heartbeat"
        REPLY = "reply"

    class Envelope(BaseModel):
        model_config = ConfigDict(frozen=True)

        id: str
        kind: Kind
        agent_id: str
        type: str
        timestamp: int
        data: Any = None
        task_id: str | None = None
        correlation_id: str | None = None
        reply_to: str | None = None
        metadata: dict[str, Any] | None = None

    class Wire(BaseModel):
        model_config = ConfigDict(frozen=True, populate_by_name=True, alias_generator=camel, extra="ignore")

    class SubPrd(Wire):
        session_id: str
        sub_prd_id: str

        @field_validator("session_id")
        @classmethod
        def _session(cls, v: str) -> str:
            return subjects.token(v, "session_id")

        @field_validator("sub_prd_id")
        @classmethod
        def _sub_prd(cls, v: str) -> str:
            return subjects.token(v, "sub_prd_id")

    class Task(SubPrd):
        specialist: str | None = None
        payload: Any = None
        created_at: int = Field(default_factory=models.now_ms)

        @field_validator("specialist")
        @classmethod
        def _specialist(cls, v: str | None) -> str | None:
            return None if v is None else subjects.token(v, "specialist")

    class Result(SubPrd):
        success: bool
        result: Any = None
        error: str | None = None
        completed_at: int = Field(default_factory=models.now_ms)

    class Subscribe(BaseModel):
        model_config = ConfigDict(frozen=True)

        action: Literal["subscribe"]
        symbols: Annotated[list[str], Field(min_length=1, max_length=50)]
        since_seq: Annotated[int, Field(ge=0)] | dict[str, Annotated[int, Field(ge=0)]] | None = None
        last: Annotated[int, Field(ge=0)] | None = None
        conflate: bool = True

        @field_validator("symbols")
        @classmethod
        def _symbols(cls, v: list[str]) -> list[str]:
            return [subjects.token(s, "symbol") for s in v]

    env = Envelope.model_validate_json(ENVELOPE_RAW)
    task = Task.model_validate_json(TASK_RAW)
    result = Result.model_validate_json(RESULT_RAW)
    sub = Subscribe.model_validate_json(SUBSCRIBE_RAW)
    # The same bytes as the project writes (None fields left out of the envelope only).
    assert env.__pydantic_serializer__.to_json(env, exclude_none=True) == ENVELOPE_RAW
    assert task.__pydantic_serializer__.to_json(task, by_alias=True) == TASK_RAW
    assert result.__pydantic_serializer__.to_json(result, by_alias=True) == RESULT_RAW
    return {
        "envelope": (
            lambda: env.__pydantic_serializer__.to_json(env, exclude_none=True),
            lambda: Envelope.model_validate_json(ENVELOPE_RAW),
        ),
        "task": (
            lambda: task.__pydantic_serializer__.to_json(task, by_alias=True),
            lambda: Task.model_validate_json(TASK_RAW),
        ),
        "result": (
            lambda: result.__pydantic_serializer__.to_json(result, by_alias=True),
            lambda: Result.model_validate_json(RESULT_RAW),
        ),
        "subscribe": (lambda: sub.model_dump_json(), lambda: Subscribe.model_validate_json(SUBSCRIBE_RAW)),
    }


def _msgspec_ops() -> dict[str, tuple[Op, Op]]:
    enc = msgspec.json.Encoder()
    sub = _SUBSCRIBE.decode(SUBSCRIBE_RAW)
    return {
        "envelope": (lambda: enc.encode(ENVELOPE), lambda: envelope.DECODER.decode(ENVELOPE_RAW)),
        "task": (lambda: enc.encode(TASK), lambda: msgspec.json.decode(TASK_RAW, type=models.OrchestratorTask)),
        "result": (lambda: enc.encode(RESULT), lambda: msgspec.json.decode(RESULT_RAW, type=models.TaskResult)),
        "subscribe": (lambda: enc.encode(sub), lambda: _SUBSCRIBE.decode(SUBSCRIBE_RAW)),
    }


def _project_ops() -> dict[str, tuple[Op, Op]]:
    subject = "agents.trading-agent.tasks.execute"
    frame = protocol.parse_client_frame(SUBSCRIBE_RAW, max_symbols=50)
    return {
        "envelope": (
            lambda: envelope.encode(
                id=ENVELOPE.id, kind=ENVELOPE.kind, agent_id=ENVELOPE.agent_id, type=ENVELOPE.type, data=DATA
            ),
            lambda: envelope.decode(ENVELOPE_RAW, subject),
        ),
        "task": (TASK.encode, lambda: models.decode_task(TASK_RAW)),
        "result": (RESULT.encode, lambda: models.decode_result(RESULT_RAW)),
        "subscribe": (frame.encode, lambda: protocol.parse_client_frame(SUBSCRIBE_RAW, max_symbols=50)),
    }


def per_op_us(ops: list[Op], rounds: int, budget: float) -> list[float]:
    """For each op, the median over ``rounds`` of the time per call; rounds of ~``budget`` s
    alternate between the ops so that a busy machine slows them alike."""
    timers = [timeit.Timer(op) for op in ops]
    numbers = [max(1, int(100 * budget / max(timer.timeit(100), 1e-9))) for timer in timers]
    samples: list[list[float]] = [[] for _ in ops]
    for _ in range(rounds):
        for timer, number, out in zip(timers, numbers, samples, strict=True):
            out.append(timer.timeit(number) / number * 1e6)
    return [statistics.median(s) for s in samples]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="rounds per figure (median reported)")
    parser.add_argument("--budget", type=float, default=0.05, help="seconds per round")
    args = parser.parse_args(argv)
    columns: dict[str, dict[str, tuple[Op, Op]]] = {}
    pyd = _pydantic_ops()
    if pyd is None:
        print("pydantic is not installed: its column is left out\n")
    else:
        columns["pydantic v2"] = pyd
    columns["msgspec"] = _msgspec_ops()
    columns["liquidcrypto"] = _project_ops()
    names = list(columns)
    print(f"µs per operation, median of {args.rounds} rounds\n")
    print("| shape | op | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for shape in ("envelope", "task", "result", "subscribe"):
        for i, op in enumerate(("encode", "decode")):
            figures = per_op_us([columns[n][shape][i] for n in names], args.rounds, args.budget)
            cells = [f"{f:.2f}" for f in figures]
            print(f"| {shape} | {op} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
