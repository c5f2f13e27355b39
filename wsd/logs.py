"""Logging: structlog, readable on a terminal, one JSON object per line otherwise.

Every event carries ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``,
``event`` and its key-values.  Under systemd stderr is not a terminal and
journald stores each line as it is, so ``auto`` writes JSON there, which log
shippers and ``jq`` read without guessing; on a terminal it writes aligned
text.  Records of the standard library's ``logging`` (asyncio's "Task
exception was never retrieved", redis) pass through the same renderer, so the
output never mixes two formats.  Exceptions are a traceback string under
``exception`` in JSON, and a plain traceback below the line on the console.
"""

from __future__ import annotations

import enum
import logging
import sys
from typing import Any, Final, TextIO

import structlog
from structlog.types import EventDict, Processor, WrappedLogger


class LogFormat(enum.StrEnum):
    AUTO = "auto"
    """``console`` when the stream is a terminal, else ``json``."""
    JSON = "json"
    CONSOLE = "console"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def number(self) -> int:
        """The ``logging`` module's number for this level."""
        return logging.getLevelNamesMapping()[self.value.upper()]


# JSON keys in this order first, then the event's own key-values.
_FIRST: Final = ("timestamp", "level", "logger", "event")


def resolve(fmt: LogFormat, stream: TextIO) -> LogFormat:
    """The format ``auto`` stands for on ``stream``; other formats are themselves."""
    if fmt is not LogFormat.AUTO:
        return fmt
    isatty = getattr(stream, "isatty", None)
    return LogFormat.CONSOLE if isatty is not None and isatty() else LogFormat.JSON


def configure(
    fmt: LogFormat = LogFormat.AUTO,
    level: LogLevel = LogLevel.INFO,
    *,
    stream: TextIO | None = None,
) -> LogFormat:
    """Send every log event (structlog's and ``logging``'s) to ``stream`` (stderr).

    Idempotent: calling it again (a reload) replaces the handler it installed
    before and leaves any other handler of the root logger alone.  Returns the
    format chosen.
    """
    out = sys.stderr if stream is None else stream
    chosen = resolve(fmt, out)
    # Added to structlog's events and to logging's records alike.
    stamped: list[Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    render: list[Processor]
    if chosen is LogFormat.JSON:
        render = [
            structlog.processors.format_exc_info,
            _key_order,
            # str() for what json cannot encode (paths, enums), not repr().
            structlog.processors.JSONRenderer(default=str),
        ]
    else:
        render = [
            structlog.dev.ConsoleRenderer(
                colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
        ]
    handler = _WsdHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=stamped,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _WsdHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.number)
    structlog.configure(
        processors=[
            # First: an event below the level costs one isEnabledFor call.
            structlog.stdlib.filter_by_level,
            structlog.contextvars.merge_contextvars,
            *stamped,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached, so a reconfiguration (or a test's capture_logs) also
        # reaches the module-level loggers that have logged already.
        cache_logger_on_first_use=False,
    )
    return chosen


class _WsdHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure` installs, told apart from anyone else's."""


def _key_order(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    ordered: dict[str, Any] = {k: event.pop(k) for k in _FIRST if k in event}
    ordered.update(event)
    return ordered
