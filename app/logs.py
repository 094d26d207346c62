"""Log format: ``STREAMETL_LOG_FORMAT=text`` (Faust's own lines) or ``json``.

``json`` prints one JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
``message`` and, when the record carries one, ``exception`` (the traceback text). It is
installed through Faust's public ``logging_config`` setting (a ``logging.dictConfig``
that mode merges over its defaults): it swaps the formatters of mode's handlers, so a
``--logfile`` gets JSON too. The worker's banner and start-up spinner are human output
printed outside logging; ``streametl`` turns them off in json mode, as ``--quiet`` does
(app/cli.py). streametl logs nothing per record in either format.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


def logging_config(log_format: str) -> dict[str, Any] | None:
    """Faust's ``logging_config`` for a format (None: Faust's default text lines)."""
    if log_format != "json":
        return None
    json_formatter = {"()": f"{__name__}.JsonFormatter"}
    # mode's handlers name these two formatters (stream: "colored", file: "default").
    return {"version": 1, "merge": True,
            "formatters": {"default": json_formatter, "colored": json_formatter}}


__all__ = ["FORMATS", "JsonFormatter", "logging_config"]
