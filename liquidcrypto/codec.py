"""The JSON codec and the base of the wire models, in one place (orjson, msgspec)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from functools import cache
from typing import Any, Self

import msgspec
import orjson

from liquidcrypto.errors import InvalidPayloadError, LiquidNatsError

_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def encode(data: Any) -> bytes:
    """Encode a JSON-able value to bytes.

    Raises:
        InvalidPayloadError: the value cannot be represented as JSON.
    """
    try:
        return orjson.dumps(data, option=_OPTS)
    except TypeError as exc:
        raise InvalidPayloadError(f"cannot encode {type(data).__name__} as JSON: {exc}") from exc


def decode(raw: bytes) -> Any:
    """Decode JSON bytes.

    Raises:
        InvalidPayloadError: ``raw`` is not valid JSON (the first bytes are named).
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayloadError(f"payload is not valid JSON ({exc}): {bytes(raw[:80])!r}") from exc


class Model(msgspec.Struct, frozen=True, kw_only=True):
    """The base of every wire model: a frozen, keyword-only ``msgspec.Struct``.

    Each subclass repeats ``frozen=True, kw_only=True`` (``kw_only`` covers only the fields
    a class declares; type checkers read ``frozen`` per class).
    msgspec was chosen over pydantic on measured cost (``benchmarks/wire_models.py``).
    A subclass may rename its fields on the wire (``rename="camel"``); reading then
    accepts the attribute names as well. A validator (``__post_init__``) that raises an
    error of the project (``InvalidSubjectError``...) surfaces as that error.
    """

    def to_dict(self, *, exclude: Collection[str] = ()) -> dict[str, Any]:
        """The wire form as JSON-able builtins, without the attributes in ``exclude``."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        for name in exclude:
            out.pop(_wire_names(type(self)).get(name, name), None)
        return out

    def encode(self) -> bytes:
        """The wire form as JSON bytes.

        Raises:
            InvalidPayloadError: a field holds a value JSON cannot represent.
        """
        try:
            return _ENCODER.encode(self)
        except (TypeError, OverflowError) as exc:
            raise InvalidPayloadError(f"cannot encode {type(self).__name__} as JSON: {exc}") from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build one from a decoded JSON object (or any mapping).

        Keys may be the wire names or the attribute names (the wire name wins if both are
        given); unknown keys are ignored; values are converted as loosely as JSON peers
        need (``"5"`` for an ``int``, ``"true"`` for a ``bool``).

        Raises:
            InvalidPayloadError: a field is missing or of the wrong type.
            LiquidNatsError: the error a validator raised (``InvalidSubjectError``...).
        """
        obj = dict(data)
        for name, wire in _wire_names(cls).items():
            if name in obj:
                obj.setdefault(wire, obj.pop(name))
        try:
            return msgspec.convert(obj, cls, strict=False)
        except msgspec.ValidationError as exc:
            if isinstance(exc.__cause__, LiquidNatsError):
                raise exc.__cause__ from None
            raise InvalidPayloadError(f"invalid {cls.__name__}: {exc}") from exc
        except RecursionError as exc:  # msgspec's limit (~1,000 levels) is below orjson's (1,024)
            raise InvalidPayloadError(f"invalid {cls.__name__}: nested too deeply ({exc})") from exc

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        """Parse JSON bytes holding one object (keys as ``from_dict`` accepts them).

        Raises:
            InvalidPayloadError: not JSON, not an object, or of the wrong shape.
            LiquidNatsError: the error a validator raised.
        """
        model = cls.try_decode(raw)
        if model is not None:
            return model
        data = decode(raw)
        if not isinstance(data, dict):
            raise InvalidPayloadError(f"{cls.__name__} must be a JSON object, not {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def try_decode(cls, raw: bytes) -> Self | None:
        """The fast path of ``decode``: one typed msgspec pass, no intermediate dict.

        Returns ``None`` (never raises) when ``raw`` is invalid, or when it may give an
        optional renamed field by its attribute name (``"created_at"``), which the typed
        pass would ignore; the dict path then decides, so both accept the same input and
        fail with the same error. (A required field given only by its attribute name fails
        the typed pass; a key spelled with ``\\u`` escapes of ASCII letters is not looked
        for: no JSON encoder writes one.)
        """
        decoder, attribute_keys = _typed(cls)
        for key in attribute_keys:
            if key in raw:
                return None
        try:
            model: Self = decoder.decode(raw)
        except (msgspec.DecodeError, RecursionError):  # DecodeError covers ValidationError
            return None
        return model


_ENCODER = msgspec.json.Encoder()


@cache
def _wire_names(cls: type[Model]) -> dict[str, str]:
    """``{attribute: wire name}`` of the fields a class renames on the wire."""
    return {f.name: f.encode_name for f in msgspec.structs.fields(cls) if f.name != f.encode_name}


@cache
def _typed(cls: type[Model]) -> tuple[msgspec.json.Decoder[Any], tuple[bytes, ...]]:
    """The class's lax JSON decoder, and the attribute names (as JSON strings) of its renamed
    fields that have a default."""
    keys = tuple(
        orjson.dumps(f.name) for f in msgspec.structs.fields(cls) if f.name != f.encode_name and not f.required
    )
    return msgspec.json.Decoder(cls, strict=False), keys
