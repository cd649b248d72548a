"""Our Deepgram client against the Deepgram emulator, through real sockets, faults included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.events import ProviderFailed, ProviderRole, Transcript, UtteranceEnd
from core.providers.deepgram import DeepgramStream, listen_url
from infra.emulators.deepgram import DeepgramEmulator
from infra.emulators.scenario import Faults, Latency, demo_scenario
from infra.wav import read_ulaw

VOICES = Path(__file__).parents[3] / "infra" / "voices"
EXPECTED = "Hi, I would like to book a table for two. Tomorrow at seven, please."
# Most tests push a call's audio at once: Deepgram's 1.25x real-time pace would only make them slow.
UNPACED = Latency(deepgram_max_speed=None)


class Listener:
    """Collects results and says when the last expected word has been finalized."""

    def __init__(self, last_word: str) -> None:
        self.events: list[Transcript | UtteranceEnd] = []
        self.last_word = last_word
        self.complete = asyncio.Event()

    def __call__(self, event: Transcript | UtteranceEnd) -> None:
        self.events.append(event)
        if isinstance(event, Transcript) and event.is_final and event.words and event.words[-1].text == self.last_word:
            self.complete.set()

    def final_words(self) -> list[str]:
        return [w.text for e in self.events if isinstance(e, Transcript) and e.is_final for w in e.words]


def call_audio() -> bytes:
    return (
        b"\xff" * 4000
        + read_ulaw(VOICES / "book_table.wav")
        + b"\xff" * 9600
        + read_ulaw(VOICES / "tomorrow.wav")
        + b"\xff" * 9600
    )


async def stream_through(
    faults: Faults, *, keepalive_s: float = 4.0, latency: Latency = UNPACED, last_word: str = "please."
) -> AsyncIterator[tuple[DeepgramEmulator, DeepgramStream, Listener]]:
    emulator = DeepgramEmulator(demo_scenario(faults=faults, latency=latency))
    url = await emulator.start()
    listener = Listener(last_word)
    stream = DeepgramStream(
        listen_url(url, model="nova-3", utterance_end_ms=2000, endpointing_ms=300, tag="CA-test"),
        "dg-test-key",
        listener,
        lambda: round(asyncio.get_running_loop().time() * 1000),
        keepalive_s=keepalive_s,
        max_backoff_s=0.05,
    )
    runner = asyncio.create_task(stream.run())
    yield emulator, stream, listener
    await stream.close()
    await runner
    await emulator.stop()


@pytest.fixture
async def healthy() -> AsyncIterator[tuple[DeepgramEmulator, DeepgramStream, Listener]]:
    async for items in stream_through(Faults()):
        yield items


async def test_words_arrive_on_the_audio_clock(healthy: tuple[DeepgramEmulator, DeepgramStream, Listener]) -> None:
    emulator, stream, listener = healthy
    audio = call_audio()
    for offset in range(0, len(audio), 160):
        stream.send_audio(audio[offset : offset + 160], offset // 8)
    await listener.complete.wait()
    assert " ".join(listener.final_words()) == EXPECTED
    first = next(e for e in listener.events if isinstance(e, Transcript) and e.is_final and e.words)
    assert 480 <= first.words[0].start_ms <= 560  # the caller began at 500 ms on our clock
    query = emulator.queries[0]
    assert query["utterance_end_ms"] == "2000" and query["vad_events"] == "true" and query["tag"] == "CA-test"
    assert emulator.headers[0]["Authorization"] == "Token dg-test-key"


async def test_a_gap_in_twilios_frames_keeps_the_clocks_together(
    healthy: tuple[DeepgramEmulator, DeepgramStream, Listener],
) -> None:
    _, stream, listener = healthy
    audio = call_audio()
    for offset in range(0, len(audio), 160):
        at = offset // 8
        if 100 <= at < 400:
            continue  # 300 ms of frames never came
        stream.send_audio(audio[offset : offset + 160], at)
    await listener.complete.wait()
    first = next(e for e in listener.events if isinstance(e, Transcript) and e.is_final and e.words)
    assert 480 <= first.words[0].start_ms <= 560


async def test_a_socket_dropped_mid_utterance_loses_no_word() -> None:
    async for emulator, stream, listener in stream_through(Faults(deepgram_drop_after_ms=1500)):
        audio = call_audio()
        for offset in range(0, len(audio), 160):
            stream.send_audio(audio[offset : offset + 160], offset // 8)
        await listener.complete.wait()
        assert stream.reconnects == 1
        assert emulator.progress["CA-test"].connections == 2
        assert " ".join(listener.final_words()) == EXPECTED  # every word, each once
        times = [w.start_ms for e in listener.events if isinstance(e, Transcript) and e.is_final for w in e.words]
        assert times == sorted(times) and times[0] >= 480  # re-based onto the call's clock


async def send_in_real_time(stream: DeepgramStream, audio: bytes) -> int:
    """Twilio's side: a 20 ms frame every 20 ms, on a schedule (the pace is the behaviour under test).
    Returns the stream clock's time at audio 0."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    for offset in range(0, len(audio), 160):
        at_ms = offset // 8
        await asyncio.sleep(max(0.0, began + at_ms / 1000 - loop.time()))
        stream.send_audio(audio[offset : offset + 160], at_ms)
    return round(began * 1000)


async def test_a_10_s_outage_delivers_every_word_and_deepgram_catches_up_with_the_caller() -> None:
    """The socket drops 1.5 s into the call and Deepgram refuses new ones for 10 s while the caller
    says two things; a second after it is back the caller says a third. Deepgram works at its real
    1.25x pace. Every word arrives once, on the call's clock. Sent whole, the 11 s backlog would keep
    the third line's words about 8 s behind the caller; with long silences left out they come within
    a few seconds, and the catch-up time is reported."""
    faults = Faults(deepgram_drop_after_ms=1500, deepgram_outage_ms=10_000)
    async for emulator, stream, listener in stream_through(faults, latency=Latency(), last_word="people."):
        audio = call_audio() + b"\xff" * 44_000 + read_ulaw(VOICES / "actually.wav") + b"\xff" * 12_000
        began_ms = await send_in_real_time(stream, audio)
        await asyncio.wait_for(listener.complete.wait(), timeout=30)
        assert " ".join(listener.final_words()) == EXPECTED + " Actually, wait, make it four people."
        finals = [e for e in listener.events if isinstance(e, Transcript) and e.is_final and e.words]
        times = [w.start_ms for e in finals for w in e.words]
        assert times == sorted(times) and 480 <= times[0] <= 560  # on the call's clock across the jumps
        assert emulator.progress["CA-test"].connections == 2
        [catch_up_ms] = stream.catch_ups  # the backlog's last words, after the reconnect
        last = finals[-1]
        behind_ms = last.at_ms - (began_ms + last.words[-1].end_ms)
        figures = f"catch-up {catch_up_ms} ms; the third line's last word came {behind_ms} ms after it was said"
        # Measured here: 4.1 s and 3.2 s; with the backlog sent whole, 4.7 s and 9.0 s.
        assert catch_up_ms < 6000 and behind_ms < 5000, figures


async def test_finalize_and_keepalive_go_out(healthy: tuple[DeepgramEmulator, DeepgramStream, Listener]) -> None:
    emulator, stream, _ = healthy
    stream.send_audio(b"\xff" * 160, 0)
    stream.finalize()
    assert (await emulator.inbox.get())["type"] == "Finalize"


async def test_keepalive_when_no_audio_goes_out() -> None:
    async for emulator, stream, _ in stream_through(Faults(), keepalive_s=0.05):
        stream.send_audio(b"\xff" * 160, 0)
        assert (await emulator.inbox.get())["type"] == "KeepAlive"


async def test_a_wrong_key_fails_for_good() -> None:
    emulator = DeepgramEmulator(demo_scenario())
    url = await emulator.start()
    events: list[Any] = []
    stream = DeepgramStream(url, "wrong-key", events.append, lambda: 0)
    await stream.run()  # returns: reconnecting cannot fix a refused key
    assert stream.failure is not None and "401" in stream.failure
    assert events == [ProviderFailed(0, ProviderRole.STT, "Deepgram refused the connection with HTTP 401")]
    await emulator.stop()


async def test_a_service_that_never_answers_fails_after_its_attempts() -> None:
    events: list[Any] = []
    # A port nobody listens on: every attempt is refused at once; backoff and budget kept tiny for the test.
    stream = DeepgramStream(
        "ws://127.0.0.1:9/v1/listen", "key", events.append, lambda: 0, max_backoff_s=0.01, give_up_after_s=0.3
    )
    await asyncio.wait_for(stream.run(), timeout=10)
    assert [type(e) for e in events] == [ProviderFailed]
    assert events[0].role is ProviderRole.STT and "over 0.3 s" in events[0].reason and stream.reconnects >= 2
