"""wsd.logs: JSON lines or console text, with timestamp, level, logger, event and keys."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import structlog

from wsd import config
from wsd.logs import LogFormat, LogLevel, configure, resolve


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_timestamp_level_logger_event_and_keys() -> None:
    out = io.StringIO()
    assert configure(LogFormat.JSON, stream=out) is LogFormat.JSON
    structlog.get_logger("wsd.test").info("session started", vm_id="vm-1", regions=2)
    [line] = lines(out)
    assert list(line)[:4] == ["timestamp", "level", "logger", "event"]
    assert line["level"] == "info" and line["logger"] == "wsd.test"
    assert line["event"] == "session started"
    assert line["vm_id"] == "vm-1" and line["regions"] == 2
    stamp = datetime.fromisoformat(str(line["timestamp"]))
    assert stamp.utcoffset() is not None and stamp.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


def test_json_renders_an_exception_as_a_traceback_string() -> None:
    out = io.StringIO()
    configure(LogFormat.JSON, stream=out)
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger("wsd.test").exception("tracking failed", vm_id="vm-1")
    [line] = lines(out)
    assert line["level"] == "error" and line["vm_id"] == "vm-1"
    exception = str(line["exception"])
    assert exception.startswith("Traceback (most recent call last):")
    assert exception.rstrip().endswith("ValueError: boom")


def test_values_json_cannot_encode_are_written_as_text() -> None:
    out = io.StringIO()
    configure(LogFormat.JSON, stream=out)
    structlog.get_logger("wsd.test").info("listening", socket=config.Path("/run/wsd/wsd.sock"))
    assert lines(out)[0]["socket"] == "/run/wsd/wsd.sock"


def test_standard_library_records_come_out_in_the_same_format() -> None:
    out = io.StringIO()
    configure(LogFormat.JSON, stream=out)
    try:
        raise RuntimeError("lost")
    except RuntimeError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    [line] = lines(out)
    assert line["logger"] == "asyncio" and line["level"] == "error"
    assert line["event"] == "Task exception was never retrieved"
    assert "RuntimeError: lost" in str(line["exception"])
    assert "timestamp" in line


def test_events_below_the_level_are_dropped() -> None:
    out = io.StringIO()
    configure(LogFormat.JSON, LogLevel.WARNING, stream=out)
    log = structlog.get_logger("wsd.test")
    log.debug("late fault")
    log.info("cycle")
    log.warning("fetch failed, retrying")
    logging.getLogger("redis").info("connected")
    assert [line["event"] for line in lines(out)] == ["fetch failed, retrying"]


def test_reconfiguring_replaces_the_handler_and_reaches_existing_loggers() -> None:
    first, second = io.StringIO(), io.StringIO()
    log = structlog.get_logger("wsd.test")
    configure(LogFormat.JSON, LogLevel.INFO, stream=first)
    log.debug("hidden")
    configure(LogFormat.JSON, LogLevel.DEBUG, stream=second)  # a SIGHUP
    log.debug("shown")
    assert first.getvalue() == ""
    assert [line["event"] for line in lines(second)] == ["shown"]


def test_console_is_one_readable_line_with_a_plain_traceback() -> None:
    out = io.StringIO()
    configure(LogFormat.CONSOLE, stream=out)
    log = structlog.get_logger("wsd.test")
    log.info("session started", vm_id="vm-1")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("tracking failed")
    text = out.getvalue()
    assert "\x1b[" not in text  # no colours when the stream is not a terminal
    first = text.splitlines()[0]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z \[info\s*\] session started", first)
    assert "[wsd.test]" in first and "vm_id=vm-1" in first
    assert "Traceback (most recent call last):" in text and "ValueError: boom" in text


def test_auto_picks_console_on_a_terminal_and_json_elsewhere() -> None:
    assert resolve(LogFormat.AUTO, Terminal()) is LogFormat.CONSOLE
    assert resolve(LogFormat.AUTO, io.StringIO()) is LogFormat.JSON
    assert resolve(LogFormat.JSON, Terminal()) is LogFormat.JSON
    assert resolve(LogFormat.CONSOLE, io.StringIO()) is LogFormat.CONSOLE
    terminal = Terminal()
    assert configure(stream=terminal) is LogFormat.CONSOLE
    structlog.get_logger("wsd.test").info("hello")
    assert "\x1b[" in terminal.getvalue()  # coloured


def test_auto_writes_json_to_stderr_when_it_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert configure() is LogFormat.JSON  # pytest's captured stderr is no terminal
    structlog.get_logger("wsd.test").warning("fetch failed", vm_id="vm-1")
    err = capsys.readouterr().err
    assert json.loads(err.splitlines()[-1])["vm_id"] == "vm-1"


def test_the_config_keys_and_their_errors() -> None:
    cfg = config.parse('[daemon]\nlog_format = "json"\nlog_level = "debug"\n')
    assert cfg.daemon.log_format is LogFormat.JSON and cfg.daemon.log_level is LogLevel.DEBUG
    defaults = config.WsdConfig().daemon
    assert defaults.log_format is LogFormat.AUTO and defaults.log_level is LogLevel.INFO
    with pytest.raises(config.ConfigError, match=r"`daemon\.log_format` = 'xml'.*'json'"):
        config.parse('[daemon]\nlog_format = "xml"\n', source="wsd.toml")
    with pytest.raises(config.ConfigError, match=r"`daemon\.log_level` = 'verbose'"):
        config.parse('[daemon]\nlog_level = "verbose"\n', source="wsd.toml")
