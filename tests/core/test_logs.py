"""Structured logs: one JSON object per line, call ids per task, no secret ever printed."""

from __future__ import annotations

import asyncio
import io
import json

from core.logs import REDACTED, bind_call, make_logger, redact_secrets


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line_with_call_ids() -> None:
    stream = io.StringIO()
    logger = make_logger("test-ids", stream)

    async def call(call_sid: str, stream_sid: str) -> None:
        bind_call(logger, CallSid=call_sid, StreamSid=stream_sid)
        await asyncio.sleep(0)
        logger.info("frame", extra={"n": 1})

    async def main() -> None:
        await asyncio.gather(call("CA1", "MZ1"), call("CA2", "MZ2"))

    asyncio.run(main())
    records = lines(stream)
    assert sorted((r["CallSid"], r["StreamSid"]) for r in records) == [("CA1", "MZ1"), ("CA2", "MZ2")]
    assert all(r["message"] == "frame" and r["service"] == "test-ids" for r in records)


def test_secrets_never_appear_by_any_path() -> None:
    stream = io.StringIO()
    logger = make_logger("test-secrets", stream)
    secret = 'sk-"very"-secret-ü'
    redact_secrets([secret, "tiny"], logger)
    logger.info(f"key is {secret}")
    logger.info("key is %s", secret)
    logger.info("extra", extra={"headers": {"Authorization": f"Token {secret}"}})
    try:
        raise ValueError(f"bad key {secret}")
    except ValueError:
        logger.exception("failed")
    text = stream.getvalue()
    assert "very" not in text
    assert text.count(REDACTED) >= 4
    assert len(lines(stream)) == 4
