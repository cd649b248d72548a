"""Our ElevenLabs client against the ElevenLabs emulator, through real sockets, faults included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from core.events import TtsAudio, TtsDone
from core.providers.elevenlabs import ElevenLabsStream, stream_url
from infra.emulators.elevenlabs import ElevenLabsEmulator
from infra.emulators.scenario import Faults, demo_scenario


class Speaker:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.done: dict[str, asyncio.Event] = {}

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        if isinstance(event, TtsDone):
            self.done.setdefault(event.reply_id, asyncio.Event()).set()

    async def finished(self, reply_id: str) -> None:
        await self.done.setdefault(reply_id, asyncio.Event()).wait()

    def spoken(self, reply_id: str) -> str:
        return "".join(
            c.char for e in self.events if isinstance(e, TtsAudio) and e.reply_id == reply_id for c in e.alignment or []
        )


async def speaking(faults: Faults = Faults()) -> AsyncIterator[tuple[ElevenLabsEmulator, ElevenLabsStream, Speaker]]:
    emulator = ElevenLabsEmulator(demo_scenario(faults=faults))
    base = await emulator.start()
    speaker = Speaker()
    url = stream_url(base, "voice1", model_id="eleven_flash_v2_5", output_format="ulaw_8000", inactivity_timeout=180)
    stream = ElevenLabsStream(url, "el-test-key", "ulaw_8000", speaker, lambda: 0, max_backoff_s=0.05)
    runner = asyncio.create_task(stream.run())
    yield emulator, stream, speaker
    await stream.close()
    await runner
    await emulator.stop()


REPLY = "Of course! A table for two, tomorrow at seven. Could I have a name for the booking, please?"


async def test_a_reply_is_voiced_in_phrases_and_ends_with_is_final() -> None:
    async for emulator, stream, speaker in speaking():
        for token in REPLY.split(" "):
            stream.send_text("r1", token + " ")
        stream.finish("r1")
        await speaker.finished("r1")
        assert speaker.spoken("r1") == REPLY + " "
        texts = [m["text"] for m in emulator.received if m.get("text")]
        assert texts[0] == "Of course! " and all(t.endswith(" ") for t in texts)  # phrases, not tokens
        assert emulator.received[-2:] == [
            {"context_id": "r1", "flush": True},
            {"context_id": "r1", "close_context": True},
        ]
        assert sum(1 for m in emulator.received if "voice_settings" in m) == 1


async def test_a_cancelled_reply_is_closed_and_its_late_audio_dropped() -> None:
    async for emulator, stream, speaker in speaking():
        stream.send_text("r1", REPLY)
        first_audio = await emulator.inbox.get()
        assert first_audio["context_id"] == "r1"
        stream.cancel("r1")
        while (await emulator.inbox.get()) != {"context_id": "r1", "close_context": True}:
            pass  # phrases already on the wire before the cancel
        heard_before = len([e for e in speaker.events if isinstance(e, TtsAudio)])
        stream.send_text("r2", "Sure. ")
        stream.finish("r2")
        await speaker.finished("r2")
        assert not any(isinstance(e, TtsAudio) and e.reply_id == "r1" for e in speaker.events[heard_before:])
        assert not any(isinstance(e, TtsDone) and e.reply_id == "r1" for e in speaker.events)


async def test_a_dropped_socket_resends_what_was_not_voiced() -> None:
    async for emulator, stream, speaker in speaking(Faults(elevenlabs_drop_after_chars=20)):
        stream.send_text("r1", REPLY)
        stream.finish("r1")
        await speaker.finished("r1")
        assert stream.reconnects == 1 and emulator.connections == 2
        assert speaker.spoken("r1") == REPLY + " "  # every character voiced once


async def test_an_empty_reply_is_done_at_once() -> None:
    async for _, stream, speaker in speaking():
        stream.finish("r9")
        await speaker.finished("r9")


def voice_of(base: str, key: str, events: list[Any]) -> ElevenLabsStream:
    """A stream to the emulator at `base` whose events land in `events`."""
    url = stream_url(base, "v", model_id="m", output_format="ulaw_8000", inactivity_timeout=20)
    return ElevenLabsStream(url, key, "ulaw_8000", events.append, lambda: 0)


async def test_a_wrong_key_fails_for_good() -> None:
    emulator = ElevenLabsEmulator(demo_scenario())
    base = await emulator.start()
    events: list[Any] = []
    stream = voice_of(base, "nope", events)
    stream.send_text("r1", "Hello. ")
    await stream.run()
    assert stream.failure is not None and "401" in stream.failure
    # the role's failure first, then every reply it was voicing is settled
    assert [type(e).__name__ for e in events] == ["ProviderFailed", "TtsFailed"]
    await emulator.stop()


def test_finishing_a_reply_cut_by_the_token_limit_drops_its_half_sentence() -> None:
    events: list[Any] = []
    stream = ElevenLabsStream("ws://127.0.0.1:9", "key", "ulaw_8000", events.append, lambda: 0)
    stream.send_text("r1", "Sure, I can help. And then we")
    stream.finish("r1", drop_unfinished=True)
    sent = [item for item in stream._drain_outbox() if item is not None]
    assert "".join(item.get("text", "") for item in sent) == "Sure, I can help. "
    assert {"context_id": "r1", "close_context": True} in sent
    stream.send_text("r2", "All done.")
    stream.finish("r2", drop_unfinished=True)  # a whole sentence is kept
    assert "".join(item.get("text", "") for item in stream._drain_outbox() if item is not None) == "All done. "


async def test_an_account_out_of_quota_fails_each_reply_then_the_role_with_no_reconnect_storm() -> None:
    """ElevenLabs answers an account out of characters with an error and a 1008 close, on every socket."""
    emulator = ElevenLabsEmulator(demo_scenario(faults=Faults(elevenlabs_quota_exceeded=True)))
    base = await emulator.start()
    events: list[Any] = []
    stream = voice_of(base, "el-test-key", events)
    runner = asyncio.create_task(stream.run())
    stream.send_text("r1", "Hello there. ")
    stream.finish("r1")
    stream.send_text("r2", "Sorry, I'm having trouble. ")  # the engine's apology, on a new context
    stream.finish("r2")
    await asyncio.wait_for(runner, timeout=10)  # it gives up by itself
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("TtsFailed") == 2 and kinds[-1] == "ProviderFailed"
    assert "quota_exceeded" in events[0].reason
    assert stream.failure is not None and "1008 quota_exceeded" in stream.failure
    assert emulator.connections == 2  # bounded
    await emulator.stop()
