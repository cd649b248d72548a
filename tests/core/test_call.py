"""The call runner with fake providers and a fake Twilio socket: it moves bytes, carries out the engine's
actions, reports what fails, and lets the registry find, feed and watch a live call.

No sockets and no sleeps: the fakes answer on the event loop's next turn, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from core.call import CallRunner, CallServices
from core.engine import TurnRules
from core.events import (
    Action,
    CallerAudio,
    CallStarted,
    DtmfPressed,
    Event,
    ProviderFailed,
    ProviderRole,
    TtsAudio,
    TtsDone,
    Unit,
)
from core.providers.roles import CallContext, CallProviders
from core.records import CallSummary, ChatMessage, NextStep, Role, SavedConversation, Speaker
from core.registry import CallRegistry, UnknownCall
from core.tools import ToolSpec

CALL_SID = "CA" + "1" * 32
STREAM_SID = "MZ" + "1" * 32
GREETING = "Hello there."
DEADLINE_S = 5.0


class FakeTwilio:
    """The media socket as the runner sees it: frames in through a queue, frames out kept as JSON."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[str | None] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._sequence = 0
        self.closed = False

    async def receive_text(self) -> str:
        frame = await self.inbox.get()
        if frame is None:
            raise ConnectionError("the socket closed")
        return frame

    async def send_text(self, data: str) -> None:
        self.sent.append(json.loads(data))
        self._changed.set()

    async def close(self) -> None:
        self.closed = True

    def send(self, event: str, **body: Any) -> None:
        self._sequence += 1
        self.inbox.put_nowait(json.dumps({"event": event, "sequenceNumber": str(self._sequence), **body}))

    def start(self, media_format: dict[str, Any] | None = None, **parameters: str) -> None:
        self.send(
            "start",
            streamSid=STREAM_SID,
            start={
                "accountSid": "AC" + "0" * 32,
                "streamSid": STREAM_SID,
                "callSid": CALL_SID,
                "tracks": ["inbound"],
                "mediaFormat": media_format or {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": parameters,
            },
        )

    def media(self, timestamp: int, ulaw: bytes = b"\xff" * 160) -> None:
        payload = base64.b64encode(ulaw).decode()
        self.send(
            "media",
            streamSid=STREAM_SID,
            media={"track": "inbound", "chunk": "1", "timestamp": str(timestamp), "payload": payload},
        )

    def mark(self, name: str) -> None:
        self.send("mark", streamSid=STREAM_SID, mark={"name": name})

    def stop(self) -> None:
        self.send("stop", streamSid=STREAM_SID, stop={"accountSid": "AC" + "0" * 32, "callSid": CALL_SID})

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def frames(self, event: str) -> list[dict[str, Any]]:
        return [frame for frame in self.sent if frame["event"] == event]


class Watch:
    """A call observer that keeps every (event, actions) pair and can be waited on."""

    def __init__(self) -> None:
        self.seen: list[tuple[Event, list[Action]]] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Event, actions: list[Action]) -> None:
        self.seen.append((event, actions))
        self._changed.set()

    def events(self, kind: type) -> list[Any]:
        return [event for event, _ in self.seen if isinstance(event, kind)]

    async def until_seen(self, kind: type) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while not self.events(kind):
                self._changed.clear()
                await self._changed.wait()


class FakeProvider:
    def __init__(self, call: CallContext) -> None:
        self.call = call
        self.calls: list[tuple[str, Any]] = []
        self.closed = asyncio.Event()

    def emit_soon(self, event: Event) -> None:
        asyncio.get_running_loop().call_soon(self.call.on_event, event)

    async def run(self) -> None:
        await self.closed.wait()

    async def close(self) -> None:
        self.closed.set()


class FakeStt(FakeProvider):
    def send_audio(self, ulaw: bytes, at_ms: int) -> None:
        self.calls.append(("audio", at_ms))

    def finalize(self) -> None:
        self.calls.append(("finalize", None))


class RefusedStt(FakeStt):
    async def run(self) -> None:
        self.call.on_event(ProviderFailed(self.call.now_ms(), ProviderRole.STT, "HTTP 401"))


class FakeChat(FakeProvider):
    def start(self, reply_id: str, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> None:
        self.calls.append(("start", reply_id))

    def cancel(self, reply_id: str) -> None:
        self.calls.append(("cancel", reply_id))


class FakeTts(FakeProvider):
    """Voices any text at once: 10 ms of audio per character, then `TtsDone`."""

    def __init__(self, call: CallContext) -> None:
        super().__init__(call)
        self.text: dict[str, str] = {}

    def send_text(self, reply_id: str, text: str) -> None:
        self.text[reply_id] = self.text.get(reply_id, "") + text

    def finish(self, reply_id: str, drop_unfinished: bool = False) -> None:
        audio = b"\x7f" * (80 * len(self.text.get(reply_id, "")))
        self.emit_soon(TtsAudio(self.call.now_ms(), reply_id, audio))
        self.emit_soon(TtsDone(self.call.now_ms(), reply_id))

    def cancel(self, reply_id: str) -> None:
        self.calls.append(("cancel", reply_id))


@dataclasses.dataclass
class FakeFactory:
    stt: type[FakeStt] = FakeStt
    built: list[CallProviders] = dataclasses.field(default_factory=list)

    def for_call(self, call: CallContext) -> CallProviders:
        providers = CallProviders(stt=self.stt(call), chat=FakeChat(call), tts=FakeTts(call))
        self.built.append(providers)
        return providers

    async def aclose(self) -> None:
        pass


class FakeBooks:
    def __init__(self) -> None:
        self.saved: list[tuple[str, CallSummary, Mapping[str, str] | None]] = []
        self.next_steps: list[tuple[str, NextStep, str]] = []
        self.conversations: list[SavedConversation] = []
        self.saved_conversation: SavedConversation | None = None  # what a resumed stream finds

    def save_conversation(self, call_sid: str, conversation: SavedConversation) -> None:
        self.conversations.append(conversation)

    def load_conversation(self, call_sid: str) -> SavedConversation | None:
        return self.saved_conversation

    def set_next(self, call_sid: str, next_step: NextStep, stream_sid: str) -> bool:
        self.next_steps.append((call_sid, next_step, stream_sid))
        return True

    def complete_call(self, call_sid: str, summary: CallSummary, parameters: Mapping[str, str] | None = None) -> None:
        self.saved.append((call_sid, summary, parameters))


@dataclasses.dataclass
class Harness:
    twilio: FakeTwilio
    factory: FakeFactory
    books: FakeBooks
    runner: CallRunner

    @property
    def providers(self) -> CallProviders:
        return self.factory.built[0]


def harness(stt: type[FakeStt] = FakeStt, **rules: Any) -> Harness:
    twilio, factory, books = FakeTwilio(), FakeFactory(stt), FakeBooks()
    services = CallServices(TurnRules.defaults(**{"greeting": GREETING, **rules}), factory, books)
    return Harness(twilio, factory, books, CallRunner(twilio, services))


async def test_the_greeting_goes_out_with_its_mark_and_the_summary_is_saved_at_stop() -> None:
    call = harness()
    call.twilio.start(From="+15550001111")
    running = asyncio.create_task(call.runner.run())
    await call.twilio.until(lambda: bool(call.twilio.frames("mark")))
    media, mark = call.twilio.frames("media")[0], call.twilio.frames("mark")[0]
    assert media["streamSid"] == STREAM_SID and len(base64.b64decode(media["media"]["payload"])) == 80 * len(GREETING)
    call.twilio.mark(mark["mark"]["name"])  # the greeting played out
    for index in range(3):
        call.twilio.media(index * 20)
    call.twilio.stop()
    await asyncio.wait_for(running, DEADLINE_S)

    [(call_sid, summary, parameters)] = call.books.saved
    assert call_sid == CALL_SID and parameters is not None and parameters["From"] == "+15550001111"
    assert summary.end_reason == "stop" and summary.turns[0].text == GREETING
    assert summary.turns[0].interrupted is False  # the mark came back: heard whole
    assert [name for name, _ in call.providers.stt.calls] == ["audio"] * 3  # type: ignore[attr-defined]
    assert all(provider.closed.is_set() for provider in call.providers.all())  # type: ignore[attr-defined]


async def test_a_socket_that_closes_before_start_opens_no_provider() -> None:
    call = harness()
    call.twilio.send("connected", protocol="Call", version="1.0.0")
    call.twilio.inbox.put_nowait(None)
    await asyncio.wait_for(call.runner.run(), DEADLINE_S)
    assert call.factory.built == [] and call.books.saved == []


@pytest.mark.parametrize(
    "media_format",
    [
        {"encoding": "audio/l16", "sampleRate": 8000, "channels": 1},
        {"encoding": "audio/x-mulaw", "sampleRate": 16000, "channels": 1},
        {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2},
    ],
)
async def test_a_stream_that_is_not_mulaw_8k_mono_is_refused_before_any_provider(media_format: dict[str, Any]) -> None:
    call = harness()
    call.twilio.start(media_format=media_format)
    await asyncio.wait_for(call.runner.run(), DEADLINE_S)
    assert call.factory.built == [] and call.books.saved == [] and call.twilio.sent == []


async def test_malformed_frames_are_counted_and_the_call_goes_on() -> None:
    call = harness(greeting="")
    call.twilio.start()
    call.twilio.inbox.put_nowait("{not json")
    call.twilio.send("media", streamSid=STREAM_SID, media={"payload": "%%%"})
    call.twilio.media(0)
    call.twilio.stop()
    await asyncio.wait_for(call.runner.run(), DEADLINE_S)
    assert call.runner.malformed_frames == 2
    assert call.books.saved[0][1].end_reason == "stop"


async def test_a_providers_failure_for_good_reaches_the_calls_record(log_output: io.StringIO) -> None:
    call = harness(RefusedStt, greeting="")
    watch = Watch()
    call.runner.observe(watch)
    call.twilio.start()
    running = asyncio.create_task(call.runner.run())
    await watch.until_seen(ProviderFailed)
    call.twilio.stop()
    await asyncio.wait_for(running, DEADLINE_S)
    assert call.books.saved[0][1].provider_failures == ("speech-to-text: HTTP 401",)
    # One summary line per call, with the call's ids, as the template's Logs Insights queries read it.
    [summary] = [json.loads(line) for line in log_output.getvalue().splitlines() if '"call summary"' in line]
    assert summary["CallSid"] == CALL_SID and summary["StreamSid"] == STREAM_SID
    assert summary["provider_failures"] == ["speech-to-text: HTTP 401"] and summary["end_reason"] == "stop"
    assert {"duration_s", "turns", "interruptions", "false_barge_ins", "malformed_frames"} <= set(summary)
    assert "reply_latency_max_ms" not in summary  # no reply: absent, not a made-up 0
    assert summary["provider_reconnects"] == {"stt": 0, "tts": 0}


async def test_the_drain_deadline_ends_the_call_cleanly() -> None:
    call = harness()
    call.twilio.start()
    running = asyncio.create_task(call.runner.run())
    await call.twilio.until(lambda: bool(call.twilio.frames("mark")))
    call.runner.end("shutdown")
    await asyncio.wait_for(running, DEADLINE_S)
    summary = call.books.saved[0][1]
    assert summary.end_reason == "shutdown"
    assert summary.turns[0].interrupted is True  # its mark never came back: not heard whole
    assert ("cancel", "r1") not in call.providers.tts.calls  # type: ignore[attr-defined]


async def test_the_agent_ending_the_call_records_the_next_step_then_closes_the_stream() -> None:
    call = harness(greeting="")
    watch = Watch()
    call.runner.observe(watch)
    call.twilio.start()
    running = asyncio.create_task(call.runner.run())
    await watch.until_seen(CallStarted)
    call.runner.inject(ProviderFailed(0, ProviderRole.TTS, "ElevenLabs closed 2 sockets in a row"))  # no voice left
    await asyncio.wait_for(running, DEADLINE_S)  # the runner ends the call itself; Twilio sent no stop
    assert call.books.next_steps == [(CALL_SID, NextStep("hangup"), STREAM_SID)]
    assert call.twilio.closed  # closed by the runner, so Twilio moves on at once
    summary = call.books.saved[0][1]
    assert summary.end_reason == "agent" and summary.outcome == "provider_failure"


async def test_a_resumed_stream_starts_from_the_saved_conversation_and_saves_it_again() -> None:
    call = harness(greeting="", resume_line="I'm back.")
    history = (ChatMessage(Role.USER, "a table for two"), ChatMessage(Role.ASSISTANT, "For when?"))
    call.books.saved_conversation = SavedConversation(history, 30_000)
    watch = Watch()
    call.runner.observe(watch)
    call.twilio.start(resume="lost-stream")
    running = asyncio.create_task(call.runner.run())
    await watch.until_seen(CallStarted)
    assert watch.events(CallStarted)[0].restored == call.books.saved_conversation
    await call.twilio.until(lambda: bool(call.twilio.frames("mark")))
    call.twilio.mark(call.twilio.frames("mark")[-1]["mark"]["name"])  # "I'm back." heard
    call.twilio.media(0)
    call.twilio.stop()
    await asyncio.wait_for(running, DEADLINE_S)
    assert call.books.conversations[-1].history == (
        history[0],
        ChatMessage(Role.ASSISTANT, "For when? I'm back."),
    )
    assert call.books.conversations[-1].elapsed_ms >= 30_000


# -- the registry ------------------------------------------------------------------------------------


async def test_the_registry_finds_feeds_and_watches_a_live_call_by_its_call_sid() -> None:
    registry = CallRegistry()
    call = harness(greeting="")
    watch = Watch()
    with pytest.raises(UnknownCall, match=CALL_SID):
        registry.get(CALL_SID)
    call.twilio.start()
    running = asyncio.create_task(registry.run(call.runner))
    assert await asyncio.wait_for(registry.wait_for(CALL_SID), DEADLINE_S) is call.runner
    assert registry.get(CALL_SID) is call.runner and registry.call_sids() == [CALL_SID] and len(registry) == 1

    stop_watching = registry.observe(CALL_SID, watch)
    call.twilio.media(0)
    await watch.until_seen(CallerAudio)
    registry.inject(CALL_SID, DtmfPressed(0, "5"))
    assert watch.events(DtmfPressed) == [DtmfPressed(20, "5")]  # stamped with the call's audio clock
    stop_watching()
    call.twilio.media(20)
    call.twilio.stop()
    await asyncio.wait_for(running, DEADLINE_S)

    assert [event.at_ms for event in watch.events(CallerAudio)] == [0]  # nothing seen after it stopped watching
    caller_turns = [turn.text for turn in call.books.saved[0][1].turns if turn.speaker is Speaker.CALLER]
    assert caller_turns == ["(pressed 5)"]
    assert CALL_SID not in registry and len(registry) == 0 and registry.idle.is_set()
    with pytest.raises(UnknownCall):
        registry.inject(CALL_SID, DtmfPressed(0, "1"))


async def test_an_observer_that_fails_is_dropped_and_the_call_goes_on() -> None:
    registry = CallRegistry()
    call = harness()
    call.twilio.start()
    running = asyncio.create_task(registry.run(call.runner))
    await asyncio.wait_for(registry.wait_for(CALL_SID), DEADLINE_S)

    def broken(event: Event, actions: list[Action]) -> None:
        raise RuntimeError("a console bug")

    registry.observe(CALL_SID, broken)
    await call.twilio.until(lambda: bool(call.twilio.frames("mark")))
    call.twilio.stop()
    await asyncio.wait_for(running, DEADLINE_S)
    assert call.books.saved[0][1].end_reason == "stop"


def test_metrics_carry_their_unit() -> None:
    from core import metrics

    metrics.metrics.clear_metrics()
    metrics.record("BargeIn", 160, Unit.MILLISECONDS)
    metrics.record("LlmFailures", 1, Unit.COUNT)
    assert metrics.metrics.metric_set["BargeIn"]["Unit"] == "Milliseconds"
    assert metrics.metrics.metric_set["LlmFailures"]["Unit"] == "Count"
    metrics.metrics.clear_metrics()
