"""Structured logging: one line per event, human-readable or JSON (`--log-json`).

Services log through `log_event(logger, "round_closed", round=3, uploads=2)`; the fields
travel in the record's `extra`, so the plain formatter prints `event key=value ...` and the
JSON formatter one object per line that a log shipper can index. No global state beyond
what `logging` itself keeps; `setup_logging` is called once by the CLI.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_FIELDS = "fedsilo_fields"
_EVENT = "fedsilo_event"


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event` with machine-readable `fields` (values must be JSON-able or str()-able)."""
    if logger.isEnabledFor(level):
        text = " ".join(f"{k}={_plain(v)}" for k, v in fields.items())
        logger.log(level, f"{event} {text}".rstrip(), extra={_EVENT: event, _FIELDS: fields})


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple | set):
        return ",".join(map(str, value)) or "-"
    return str(value)


class JsonFormatter(logging.Formatter):
    """`{"ts": ..., "level": ..., "logger": ..., "event": ..., "msg": ..., **fields}`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, _EVENT, None) or "log",
        }
        fields = getattr(record, _FIELDS, None)
        if fields:
            out.update({k: v for k, v in fields.items() if k not in out})
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def setup_logging(level: int = logging.INFO, json_lines: bool = False,
                  stream: TextIO | None = None) -> None:
    """Route every fedsilo (and pika warning) log line to `stream` (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # pika logs every failed connection attempt with a traceback; our transport reports what
    # matters in one line. Its own detail stays available with --verbose.
    logging.getLogger("pika").setLevel(logging.DEBUG if level <= logging.DEBUG
                                       else logging.CRITICAL)
