"""SIGTERM drains `parley serve media`: health turns 503, the live call goes on to its end, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from core.store import CallStore
from infra.caller import HangUp, Pause, Say, SimulatedCaller, WaitForAgent
from infra.emulators.__main__ import Emulators
from infra.emulators.scenario import demo_scenario
from infra.local import Service, local_dynamodb, local_table
from tests.e2e.conftest import MEDIA_STREAM_URL, TOKEN


def health(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@pytest.mark.parametrize(("drain_seconds", "ended_by"), [("60", "stop"), ("1", "shutdown")])
async def test_sigterm_drains_live_calls_then_exits_zero(tmp_path: Path, drain_seconds: str, ended_by: str) -> None:
    """With time enough the call ends as the caller ends it; at the deadline the server ends it cleanly."""
    emulators = Emulators(demo_scenario())
    await emulators.start()
    with local_dynamodb() as dynamodb_url:
        table = f"calls-drain-{drain_seconds}"
        client, aws = local_table(dynamodb_url, table)
        environment = {
            **os.environ,
            **aws,
            **emulators.environment(),
            "TWILIO_AUTH_TOKEN": TOKEN,
            "MEDIA_STREAM_URL": MEDIA_STREAM_URL,
            "SILENCE_THRESHOLD": "1.0",
            "GREETING": "",
            "DRAIN_SECONDS": drain_seconds,
        }
        media = Service(
            "media",
            [sys.executable, "-m", "handlers.cli", "serve", "media", "--host", "127.0.0.1", "--port", "0"],
            environment,
            tmp_path / "media.log",
        )
        base = media.ready["listening"]
        draining = media.watch_for("draining")
        try:
            assert await asyncio.to_thread(health, base) == 200
            caller = SimulatedCaller(
                base.replace("http://", "ws://") + "/media",
                TOKEN,
                [Pause(300), Say("book_table"), WaitForAgent(), HangUp()],
                signed_url=MEDIA_STREAM_URL,
                call_sid="CA" + "e" * 32,
            )
            call = asyncio.create_task(caller.run())
            await caller.heard_agent.wait()  # the call is live and the agent is speaking
            media.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(draining.wait, 10)
            assert await asyncio.to_thread(health, base) == 503
            report = await call  # the call goes on: to the caller's hang-up, or to the deadline
            assert report.closed_by_server == (ended_by == "shutdown")
            exit_code = await asyncio.to_thread(media.process.wait, 20)
            assert exit_code == 0
        finally:
            media.stop()
            await emulators.stop()
        item = CallStore(client, table).get_call("CA" + "e" * 32)
        assert item is not None and item["end_reason"] == ended_by  # the summary is saved either way
        assert item["turn_count"] == 1
