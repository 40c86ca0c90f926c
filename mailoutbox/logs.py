"""Logging set-up for the command line (the library itself only creates loggers).

Every mailoutbox module logs to ``logging.getLogger(__name__)`` and passes its
structured context through `extra` (delivery_id, attempt, outcome, smtp_code,
worker). `configure_logging` shows that context: as ``key=value`` pairs after
the message (``text``), or as fields of one JSON object per line (``json``).

At INFO and above, e-mail addresses in messages and context are masked to
``***@domain`` (`AddressRedactor`): SMTP servers like to quote the recipient in
their replies, and those replies reach the logs through error texts. DEBUG
keeps them, for a developer who asks. Passwords are never logged anywhere.
Other libraries (SQLAlchemy, alembic, psycopg) log at WARNING and above only:
SQLAlchemy at INFO would print statements with their parameters.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
# The attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
# Addresses as they appear in SMTP replies and error texts; the domain is kept.
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@((?:[A-Za-z0-9-]+\.)*[A-Za-z0-9-]+)")
_HANDLER_NAME = "mailoutbox-cli"


def redact_addresses(text: str) -> str:
    """`text` with the local part of every e-mail address replaced by ``***``."""
    return _ADDRESS.sub(r"***@\1", text)


def context_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured context a record carries (what the caller passed in `extra`)."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD and not key.startswith("_") and value is not None
    }


class AddressRedactor(logging.Filter):
    """Masks e-mail addresses in records at INFO and above (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call (wrong % arguments)
            # Filters run outside the handler's guard: raising here raised at the call
            # site (inside a transport's send, a dead-lettered mail). Nor is it left to
            # logging's own error report, which prints the arguments unmasked.
            args = record.args
            shown = ", ".join(map(str, args)) if isinstance(args, tuple) else str(args)
            message = f"malformed log call: {record.msg!s} with arguments: {shown}"
            record.msg, record.args = message, None
        redacted = redact_addresses(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        for key, value in context_of(record).items():
            if isinstance(value, str):
                setattr(record, key, redact_addresses(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_addresses(logging.Formatter().formatException(record.exc_info))
        return True


class TextFormatter(logging.Formatter):
    """``2024-05-01T12:00:00.123Z INFO mailoutbox.worker: message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        timestamp = _timestamp(record)
        # One record, one line: a line break in the message (a server's reply, a
        # transport's error) would start a line no log shipper can attribute.
        message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        line = f"{timestamp} {record.levelname} {record.name}: {message}"
        context = context_of(record)
        if context:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in sorted(context.items()))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the context, exc."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in context_of(record).items():
            data.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        return json.dumps(data, default=str, ensure_ascii=False)


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _text(value: object) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=\n') else text


class _StandardError:
    """sys.stderr as it is at each write, not as it was when logging was set up."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class LoggingSetup:
    """What `configure_logging` changed; `restore()` puts it back."""

    def __init__(self, handler: logging.Handler, levels: dict[str, int]) -> None:
        self.handler = handler
        self._levels = levels

    def restore(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
        for name, level in self._levels.items():
            logging.getLogger(name or None).setLevel(level)


def configure_logging(
    level: str = "info", fmt: str = "text", *, stream: TextIO | None = None
) -> LoggingSetup:
    """Send mailoutbox's logs at `level` (and others' at WARNING) to `stream` (stderr).

    Idempotent: a second call replaces the handler the first one installed.
    Returns what it changed, for `restore()`.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else _StandardError())
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(AddressRedactor())
    root = logging.getLogger()
    ours = logging.getLogger("mailoutbox")
    levels = {"": root.level, "mailoutbox": ours.level}
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    ours.setLevel(level.upper())
    return LoggingSetup(handler, levels)


__all__ = [
    "AddressRedactor",
    "JsonFormatter",
    "LoggingSetup",
    "TextFormatter",
    "configure_logging",
    "context_of",
    "redact_addresses",
]


def format_duration(seconds: float) -> str:
    """A short human form: 0s, 42s, 3m12s, 2h05m, 3d04h."""
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"
