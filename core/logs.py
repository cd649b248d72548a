"""Structured JSON logs, one object per line, with the call's ids and without secrets.

Both processes log through Powertools' Logger: in Lambda it adds the invocation's context, on
Fargate it is a plain JSON logger. Call ids are bound with `bind_call`, which stores them in a
context variable, so each call's asyncio task (and what it spawns) logs its own `CallSid` and
`StreamSid` even with a hundred calls in one process. Redaction happens on the finished line, so no
secret escapes by any path: message, arguments, extra keys or exception text.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import IO, Any

import msgspec
from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

REDACTED = "[redacted]"
# A secret shorter than this is too likely to collide with ordinary text to be masked usefully.
_MIN_SECRET_LENGTH = 6


class RedactingFormatter(LambdaPowertoolsFormatter):
    """Powertools' JSON formatter that masks every registered secret value in the finished line."""

    def __init__(self) -> None:
        super().__init__(utc=True, use_rfc3339=True)
        self._needles: tuple[str, ...] = ()

    def add_secrets(self, values: Iterable[str]) -> None:
        needles = set(self._needles)
        for value in values:
            if len(value) >= _MIN_SECRET_LENGTH:
                needles.add(value)
                # The JSON-escaped spelling too, for secrets holding quotes, backslashes or non-ASCII.
                needles.add(msgspec.json.encode(value).decode()[1:-1])
        self._needles = tuple(sorted(needles, key=len, reverse=True))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        for needle in self._needles:
            if needle in line:
                line = line.replace(needle, REDACTED)
        return line


def make_logger(service: str | None = None, stream: IO[str] | None = None) -> Logger:
    """A Powertools Logger with the redacting formatter; `stream` is for tests."""
    return Logger(
        service=service or os.environ.get("POWERTOOLS_SERVICE_NAME", "parley"),
        logger_formatter=RedactingFormatter(),
        stream=stream,
    )


logger = make_logger()


def redact_secrets(values: Iterable[str], target: Logger | None = None) -> None:
    """Register secret values (API keys, auth tokens) that must never appear in a log line."""
    formatter = (target or logger).registered_formatter
    assert isinstance(formatter, RedactingFormatter)
    formatter.add_secrets(values)


def bind_call(target: Logger | None = None, **ids: Any) -> None:
    """Put `CallSid=…`, `StreamSid=…` on every later line of the current task (a context variable)."""
    (target or logger).thread_safe_append_keys(**{k: v for k, v in ids.items() if v})
