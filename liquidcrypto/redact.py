"""Keep credentials out of log lines: query-string values, bearer tokens, auth headers.

uvicorn logs every WebSocket handshake as ``"WebSocket /ws?token=..." [accepted]`` (on
``uvicorn.error``) and every HTTP request with its query string (on ``uvicorn.access``);
at debug level the ``websockets`` library also logs the handshake headers.
``install_log_redaction()`` puts ``RedactSecrets`` on those loggers and on every handler
present, so the final text of each record is scrubbed whoever logged it.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
# Query parameters whose values are kept (nothing secret): everything else is redacted.
PUBLIC_PARAMS = frozenset({"batch"})

_QUERY_PARAM = re.compile(r"([?&])([^=&\s\"'#?]+)=([^&\s\"'#]*)")
_HEADER = re.compile(r"(?i)\b(authorization|sec-websocket-protocol|cookie|x-api-key)(\s*[:=]\s*)[^\r\n,;]*")
_BEARER = re.compile(r"(?i)\b(bearer[ .])[A-Za-z0-9\-._~+/=]+")
LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "websockets", "liquidcrypto")


def redact(text: str) -> str:
    """``text`` with every credential-looking part replaced by ``[redacted]``."""
    if "=" in text:
        text = _QUERY_PARAM.sub(
            lambda m: m.group(0) if m.group(2).lower() in PUBLIC_PARAMS else f"{m.group(1)}{m.group(2)}={REDACTED}",
            text,
        )
    if ":" in text or "=" in text:
        text = _HEADER.sub(rf"\1\2{REDACTED}", text)
    return _BEARER.sub(rf"\1{REDACTED}", text)


class RedactSecrets(logging.Filter):
    """A logging filter that rewrites a record's message with ``redact`` (never drops it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: leave it to the formatter
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactSecrets()


def install_log_redaction() -> None:
    """Attach the filter to the server loggers and to every handler configured now (idempotent)."""
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in LOGGERS)]
    for logger in loggers:
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
