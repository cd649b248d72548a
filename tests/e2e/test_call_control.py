"""Call control end to end, checked from Twilio's view (DESIGN.md section 2b): the Twilio emulator runs
the TwiML of the real webhook app, streams to the real media app (or to `parley serve media`
processes, for the killed task), with the provider emulators, a tool server and a DynamoDB server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from core import metrics as metric_sink
from core.call import call_services
from core.config import ConversationSettings, MediaSettings, ProviderSettings, WebhookSettings
from core.registry import CallRegistry
from core.secrets import AuthToken
from core.server import Drain, RunningServer, start_in_loop
from core.store import CallStore, create_table
from core.webhook import WebhookService
from handlers.media import make_app as media_app
from infra.caller import HangUp, Say, Step, WaitForAgent
from infra.emulators.__main__ import Emulators
from infra.emulators.scenario import Answer, Scenario, Utterance, demo_scenario
from infra.emulators.twilio import CalledParty, TwilioCall, TwilioEmulator
from infra.local import Service, local_dynamodb
from infra.tool_server import ToolServer

TOKEN = "twilio-token-call-control"
PUBLIC_BASE_URL = "https://hooks.parley.test"
MEDIA_STREAM_URL = "wss://media.parley.test/media"
SUPPORT = "+15551230000"
GOODBYE = Utterance.recorded("goodbye", "Thank you, goodbye.")
BOOK = Utterance.recorded("book_table", "Hi, I would like to book a table for two.")
TOMORROW = Utterance.recorded("tomorrow", "Tomorrow at seven, please.")


@dataclasses.dataclass
class ControlStack:
    emulators: Emulators
    tools: ToolServer
    store: CallStore
    twilio: TwilioEmulator
    environment: dict[str, str]

    def item(self, call: TwilioCall) -> dict[str, Any]:
        item = self.store.get_call(call.call_sid)
        assert item is not None, f"no item for {call.call_sid}"
        return item


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Scenario:
    scenario: Scenario = request.param
    return scenario


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> dict[str, str]:
    return dict(getattr(request, "param", {}))


@pytest.fixture
async def parts(
    scenario: Scenario, settings: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Emulators, ToolServer, CallStore, dict[str, str]]]:
    """Everything but the media service: DynamoDB (a server, shared with subprocesses), the provider
    emulators, a tool server, the environment a media service needs."""
    emulators = Emulators(scenario)
    await emulators.start()
    tools = ToolServer(slow_s=2.0)
    tools_url = await tools.start()
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(
        json.dumps([*tools.tools_file(tools_url), {**tools.tools_file(tools_url, "/slow")[0], "name": "slow_check"}])
    )
    aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    table = f"calls-{uuid.uuid4().hex[:8]}"  # moto's state outlives its server: a table per test
    with local_dynamodb() as dynamodb_url:
        webhook_needs = {"TWILIO_AUTH_TOKEN": TOKEN, "MEDIA_STREAM_URL": MEDIA_STREAM_URL, "CALLS_TABLE": table}
        for name, value in {**aws, **webhook_needs, "AWS_ENDPOINT_URL_DYNAMODB": dynamodb_url}.items():
            monkeypatch.setenv(name, value)
        client = boto3.client("dynamodb")
        create_table(client, table)
        environment = {
            **emulators.environment(),
            **aws,
            "AWS_ENDPOINT_URL_DYNAMODB": dynamodb_url,
            "TWILIO_AUTH_TOKEN": TOKEN,
            "MEDIA_STREAM_URL": MEDIA_STREAM_URL,
            "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
            "CALLS_TABLE": table,
            "GREETING": "Hello! How can I help?",
            "TOOLS_FILE": str(tools_file),
            "TRANSFER_DESTINATIONS": f"support={SUPPORT}",
            "TRANSFER_RING_SECONDS": "1",
            **settings,
        }
        try:
            yield emulators, tools, CallStore(client, table), environment
        finally:
            await tools.stop()
            await emulators.stop()
            # The webhook app ran in this process, outside Lambda: its metrics were never flushed.
            metric_sink.metrics.clear_metrics()


async def _webhook(store: CallStore, environment: dict[str, str]) -> RunningServer:
    # Imported here: the module builds its Lambda service from the environment at import (the `parts`
    # fixture has set it); the app served is made with this test's own service.
    from handlers.webhook import make_app as webhook_app

    return await start_in_loop(webhook_app(WebhookService(WebhookSettings.from_env(environment), store)))


def _twilio(
    webhook: RunningServer, media_urls: list[str], called: dict[str, CalledParty] | None = None
) -> TwilioEmulator:
    return TwilioEmulator(
        TOKEN,
        public_base_url=PUBLIC_BASE_URL,
        webhook_url=webhook.url,
        media_urls=media_urls,
        media_stream_url=MEDIA_STREAM_URL,
        called_parties=called or {SUPPORT: CalledParty("answer")},
        status_callback=f"{PUBLIC_BASE_URL}/status",
    )


@pytest.fixture
async def stack(
    parts: tuple[Emulators, ToolServer, CallStore, dict[str, str]], request: pytest.FixtureRequest
) -> AsyncIterator[ControlStack]:
    """The webhook and media apps in this process."""
    emulators, tools, store, environment = parts
    registry = CallRegistry()
    media_settings = MediaSettings.from_env(environment)
    drain = Drain(media_settings.drain_seconds, registry.wait_idle, registry.end_all, lambda: len(registry))
    services = call_services(
        ProviderSettings.from_env(environment), ConversationSettings.from_env(environment), store, AuthToken(TOKEN)
    )
    media = await start_in_loop(media_app(media_settings, services, registry, drain))
    webhook = await _webhook(store, environment)
    called = getattr(request, "param", None)
    twilio = _twilio(webhook, [media.url.replace("http://", "ws://") + "/media"], called)
    try:
        yield ControlStack(emulators, tools, store, twilio, environment)
    finally:
        await twilio.aclose()
        await webhook.stop()
        await media.stop()
        await services.aclose()


def said_to_voice(stack: ControlStack) -> str:
    """Everything the agent's voice was given to say, in order."""
    return " ".join(m["text"].strip() for m in stack.emulators.elevenlabs.received if m.get("text", "").strip())


def scenario_of(*caller: Utterance, answers: tuple[str | Answer, ...]) -> Scenario:
    return dataclasses.replace(demo_scenario(), caller=caller, answers=answers)


END_CALL = Answer("Thank you for calling. Goodbye!", "end_call", {"reason": "the caller is done"})
TRANSFER = Answer(
    "Let me put you through to our reservations team.",
    "transfer_call",
    {"destination": "support", "summary": "wants a table for two"},
)
LISTEN: list[Step] = [WaitForAgent(quiet_ms=300), Say("book_table"), WaitForAgent(quiet_ms=20_000, timeout_ms=20_000)]


@pytest.mark.parametrize("scenario", [scenario_of(GOODBYE, answers=(END_CALL,))], indirect=True)
async def test_the_agent_hangs_up_once_its_goodbye_was_heard(stack: ControlStack) -> None:
    call = await stack.twilio.place_call(
        [[WaitForAgent(quiet_ms=300), Say("goodbye"), WaitForAgent(quiet_ms=20_000, timeout_ms=20_000)]]
    )
    assert call.ended_by == "hangup" and call.streams[0].closed_by_server
    [stream] = call.streams
    hung_up_at = call.began + call.at("POST /after-stream")[0]
    assert stream.last_mark_at is not None and stream.last_mark_at < hung_up_at  # heard whole, then the hang-up
    item = stack.item(call)
    assert item["outcome"] == "completed_by_agent" and "next" not in item
    assert "Thank you for calling. Goodbye!" in said_to_voice(stack)
    assert item["status"] == "completed"


@pytest.mark.parametrize("scenario", [scenario_of(BOOK, answers=(TRANSFER,))], indirect=True)
async def test_an_answered_transfer_whispers_the_summary_and_the_item_has_the_child_leg(stack: ControlStack) -> None:
    call = await stack.twilio.place_call([LISTEN])
    assert call.dial_statuses == ["completed"] and call.ended_by == "hangup"
    assert call.whispers == ["Transferred call. wants a table for two"]
    item = stack.item(call)
    assert item["outcome"] == "transferred"
    transfer = item["transfer"]
    assert transfer["destination"] == "support" and transfer["dial_status"] == "completed"
    assert transfer["child_call_sid"].startswith("CA") and transfer["child_status"] == "completed"


@pytest.mark.parametrize("scenario", [scenario_of(BOOK, answers=(TRANSFER,))], indirect=True)
@pytest.mark.parametrize(
    "stack",
    [{SUPPORT: CalledParty("busy")}, {SUPPORT: CalledParty("no-answer")}],
    indirect=True,
    ids=["busy", "no-answer"],
)
async def test_a_transfer_nobody_takes_brings_the_caller_back_to_an_agent_who_knows_why(stack: ControlStack) -> None:
    call = await stack.twilio.place_call([LISTEN, [WaitForAgent(quiet_ms=300), HangUp()]])
    [status] = call.dial_statuses
    assert status in ("busy", "no-answer")
    assert call.stream_parameters[1]["resume"] == f"transfer-failed:{status}"
    back = call.streams[1].first_audio_at
    assert back is not None and back - (call.began + call.at("Dial ended")[0]) <= 3.0
    note = stack.emulators.openai.requests[-1]["messages"][-1]
    assert note["role"] == "system" and status in note["content"]
    assert "wants a table" not in said_to_voice(stack)  # the summary is for the person, not the caller
    assert stack.emulators.scenario.back_from_transfer in said_to_voice(stack)


TOOL = Answer("Let me check.", "check_availability", {"people": 2}, then="Yes, we have a table for two at seven.")
SLOW = Answer("", "slow_check", {"people": 2}, then="Yes, we have a table for two at seven.")


@pytest.mark.parametrize(
    ("scenario", "settings"),
    [(scenario_of(BOOK, answers=(TOOL,)), {}), (scenario_of(BOOK, answers=(SLOW,)), {"TOOL_FILLER_MS": "800"})],
    indirect=True,
    ids=["quick", "slow-with-filler"],
)
async def test_an_http_tool_answers_the_model_and_a_slow_one_gets_a_filler(stack: ControlStack) -> None:
    call = await stack.twilio.place_call(
        [[WaitForAgent(quiet_ms=300), Say("book_table"), WaitForAgent(quiet_ms=1500), HangUp()]]
    )
    [(path, request)] = stack.tools.requests
    assert request == {"call_sid": call.call_sid, "arguments": {"people": 2}}
    spoken = said_to_voice(stack)
    assert "Yes, we have a table for two at seven." in spoken
    assert ("One moment." in spoken) == (path == "/slow")
    [turn] = [turn for turn in stack.item(call)["turns"] if turn.get("tools")]
    assert json.loads(turn["tools"][0]["result"]) == {"available": True, "time": "19:00"}


@pytest.mark.parametrize("scenario", [scenario_of(BOOK, answers=("Sure.",))], indirect=True)
@pytest.mark.parametrize(
    ("settings", "outcome"),
    [
        ({"IDLE_REPROMPT_SECONDS": "1.5", "IDLE_MAX_REPROMPTS": "1", "GOODBYE": "Goodbye for now."}, "idle_hangup"),
        ({"MAX_CALL_SECONDS": "4", "GOODBYE": "Goodbye for now."}, "max_duration"),
    ],
    indirect=["settings"],
    ids=["idle", "duration-cap"],
)
async def test_an_idle_caller_and_the_longest_call_are_hung_up_after_a_goodbye(
    stack: ControlStack, outcome: str
) -> None:
    call = await stack.twilio.place_call([[WaitForAgent(quiet_ms=30_000, timeout_ms=30_000)]])
    assert call.ended_by == "hangup"
    assert stack.item(call)["outcome"] == outcome
    assert said_to_voice(stack).endswith("Goodbye for now.")


@pytest.mark.parametrize(
    "scenario", [scenario_of(BOOK, TOMORROW, answers=("For when?", "Done, see you then."))], indirect=True
)
async def test_a_media_task_killed_mid_call_loses_no_call(
    parts: tuple[Emulators, ToolServer, CallStore, dict[str, str]], tmp_path: Path
) -> None:
    """SIGKILL: no drain, no goodbye. Twilio finds the stream dead, `/after-stream` reconnects the caller
    to another media task, and the agent, with the conversation restored, speaks within 3 s."""
    emulators, _, store, environment = parts
    command = [sys.executable, "-m", "handlers.cli", "serve", "media", "--host", "127.0.0.1", "--port", "0"]
    environment = {**os.environ, **environment, "RESUME_LINE": "Sorry, I lost you for a moment."}
    first = Service("media-1", command, environment, tmp_path / "media-1.log")
    second = Service("media-2", command, environment, tmp_path / "media-2.log")
    webhook = await _webhook(store, environment)
    urls = [service.ready["listening"].replace("http://", "ws://") + "/media" for service in (first, second)]
    twilio = _twilio(webhook, urls)
    try:
        # The greeting, the first turn and its answer: three messages saved on the item. Then the kill.
        saved = first.watch_for('"messages":3')
        first_stream: list[Step] = [WaitForAgent(quiet_ms=300), Say("book_table"), WaitForAgent(quiet_ms=20_000)]
        second_stream: list[Step] = [WaitForAgent(quiet_ms=300), Say("tomorrow"), WaitForAgent(), HangUp()]
        placing = asyncio.create_task(twilio.place_call([first_stream, second_stream]))
        assert await asyncio.to_thread(saved.wait, 20), "the first turn's conversation was never saved"
        first.process.send_signal(signal.SIGKILL)
        call = await placing
    finally:
        await twilio.aclose()
        await webhook.stop()
        first.stop()
        second.stop()
    assert call.stream_parameters[1]["resume"] == "lost-stream"
    lost_at = call.streams[0].closed_at
    back_at = call.streams[1].first_audio_at
    assert lost_at is not None and back_at is not None and back_at - lost_at <= 3.0
    last_request = emulators.openai.requests[-1]["messages"]  # the second stream's turn, on the other task
    said = [m["content"] for m in last_request if m["role"] == "user"]
    assert said == ["Hi, I would like to book a table for two.", "Tomorrow at seven, please."]
    assert any(m["role"] == "assistant" and m["content"].startswith("For when?") for m in last_request)
    assert store.get_call(call.call_sid) is not None
