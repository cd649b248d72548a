"""Deepgram live speech-to-text over one WebSocket per call, surviving drops without losing words.

Twilio's µ-law 8 kHz frames go to Deepgram as they are (binary frames, no transcoding). Results come
back as `core.events.Transcript` on the call's audio clock: Deepgram counts seconds of audio received
on *this* socket ("every time you reconnect … the timestamps … begin from 00:00:00 again"), so each
socket keeps anchors from its clock to the call's.

When the socket drops mid-call the client reconnects with backoff and replays the caller audio that
no final result has covered yet; words that end at or before what was already finalized are dropped,
so words are neither lost nor said twice. Deepgram processes at most 1.25x real time ("if you send a
large buffer of audio, the stream may wind up being significantly delayed"), so an N-second backlog
sent whole takes about 4N s to catch up, during which the caller's new words wait behind it. So the
replay, and the live audio until Deepgram has caught up, leave out long silences: each silent run
keeps `_KEPT_SILENCE_MS` (longer than the endpointing pause, so `speech_final` still comes) and the
rest is skipped. A socket's clock therefore jumps where audio was skipped; `_anchors` maps it back to
the call's audio clock. Catch-up ends when a result reaches the last speech of the backlog; its time
is logged and recorded as the `SttCatchUp` metric.

KeepAlive goes out whenever no audio has for a few seconds (Deepgram closes a socket after 10 s
without data); `Finalize` on demand; `CloseStream` at the end.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from typing import Any
from urllib.parse import urlencode

import msgspec
import websockets

from core import metrics
from core.audio import SAMPLE_RATE, ulaw_silence, ulaw_to_samples, voice_band_level_dbfs
from core.events import ProviderRole, Transcript, UtteranceEnd, Word
from core.logs import logger
from core.providers.connection import ProviderConnection
from core.providers.roles import Clock, EventSink

# -- Deepgram's messages (only the fields we read; msgspec ignores the rest) ----------------------


class _Word(msgspec.Struct):
    word: str
    start: float
    end: float
    punctuated_word: str | None = None


class _Alternative(msgspec.Struct):
    transcript: str = ""
    words: list[_Word] = msgspec.field(default_factory=list)


class _Channel(msgspec.Struct):
    alternatives: list[_Alternative] = msgspec.field(default_factory=list)


class _Message(msgspec.Struct):
    type: str
    is_final: bool = False
    speech_final: bool = False
    from_finalize: bool = False
    start: float = 0.0
    duration: float = 0.0
    channel: _Channel | list[int] | None = None
    last_word_end: float | None = None
    description: str | None = None
    variant: str | None = None


_decode = msgspec.json.Decoder(_Message).decode
_KEEP_ALIVE = '{"type": "KeepAlive"}'
_FINALIZE = '{"type": "Finalize"}'
_CLOSE_STREAM = '{"type": "CloseStream"}'
# Replayed audio is bounded: beyond this much unconfirmed audio, the oldest is given up.
_MAX_REPLAY_MS = 60_000
_CLOSE_TIMEOUT_S = 3.0  # after CloseStream, how long Deepgram may take to send its last results
# While catching up, each run of silence keeps this much: more than the endpointing pause (300 ms by
# default) so Deepgram still ends the utterance where the caller paused.
_KEPT_SILENCE_MS = 500
_SILENT_DBFS = -50.0  # the detector's floor (core.audio.VadConfig.min_level_dbfs): nothing below is voice
_FRAME_BYTES = SAMPLE_RATE * 20 // 1000


def _duration_ms(ulaw: bytes) -> int:
    return len(ulaw) * 1000 // SAMPLE_RATE


def _is_silent(ulaw: bytes) -> bool:
    return voice_band_level_dbfs(ulaw_to_samples(ulaw)) < _SILENT_DBFS


def _end_of_speech(audio: list[tuple[int, bytes]]) -> int | None:
    """Where on the audio clock the last speech in `audio` ends, if there is any."""
    for at_ms, ulaw in reversed(audio):
        for offset in range(len(ulaw) - len(ulaw) % _FRAME_BYTES - _FRAME_BYTES, -1, -_FRAME_BYTES):
            if not _is_silent(ulaw[offset : offset + _FRAME_BYTES]):
                return at_ms + _duration_ms(ulaw[: offset + _FRAME_BYTES])
    return None


@dataclasses.dataclass
class _CatchUp:
    """A new socket working through a backlog: done when results reach `speech_until_ms`."""

    speech_until_ms: int | None  # audio-clock end of the last speech in the backlog
    since_ms: int  # when the socket opened (the engine's clock)
    backlog_ms: int
    skipped_ms: int = 0
    silent_run_ms: int = 0


class DeepgramError(Exception):
    """What `parley check` found wrong in its exchange with Deepgram."""


def listen_url(base_url: str, *, model: str, utterance_end_ms: int, endpointing_ms: int, tag: str | None = None) -> str:
    """The live-listen URL with our query; booleans lower-case, as Deepgram requires."""
    query: dict[str, Any] = {
        "model": model,
        "encoding": "mulaw",
        "sample_rate": SAMPLE_RATE,
        "channels": 1,
        "interim_results": "true",
        "utterance_end_ms": max(1000, utterance_end_ms),  # Deepgram advises >= 1000
        "vad_events": "true",
        "endpointing": endpointing_ms,
        "smart_format": "true",
        "punctuate": "true",
    }
    if tag:
        query["tag"] = tag
    return f"{base_url}?{urlencode(query)}"


class DeepgramStream(ProviderConnection[bytes | str]):
    """One call's transcription (the `SpeechToText` role). Call `send_audio` per frame; results
    arrive through `on_event`."""

    name = "Deepgram"
    role = ProviderRole.STT
    settings_hint = "DEEPGRAM_API_KEY and DEEPGRAM_URL"
    keepalive_message = _KEEP_ALIVE
    permanent_close_reasons = ("DATA-0000",)  # "the payload cannot be decoded as audio": ours will not change

    def __init__(
        self,
        url: str,
        api_key: str,
        on_event: EventSink,
        now_ms: Clock,
        *,
        keepalive_s: float = 4.0,
        batch_ms: int = 80,
        max_backoff_s: float = 2.0,
        open_timeout_s: float = 5.0,
        give_up_after_s: float = 30.0,
    ) -> None:
        super().__init__(
            url,
            {"Authorization": f"Token {api_key}"},
            on_event,
            now_ms,
            keepalive_s=keepalive_s,
            max_backoff_s=max_backoff_s,
            give_up_after_s=give_up_after_s,
            open_timeout_s=open_timeout_s,
            close_timeout_s=_CLOSE_TIMEOUT_S,
        )
        self._batch_bytes = batch_ms * SAMPLE_RATE // 1000
        self._batch = bytearray()
        self._unconfirmed: collections.deque[tuple[int, bytes]] = collections.deque()
        self._confirmed_ms = 0  # audio-clock time up to which finals have covered the audio
        self._socket_ms = 0  # audio sent on this socket: Deepgram's clock
        # Where this socket's clock meets the call's: (socket ms, audio-clock ms), one per jump.
        self._anchors: list[tuple[int, int]] = []
        self._socket_end_at_ms: int | None = None  # the audio-clock time this socket's audio has reached
        self._next_at_ms: int | None = None
        self._catch_up: _CatchUp | None = None
        self.catch_ups: list[int] = []  # ms each reconnect took to deliver its backlog's words

    # -- the caller side (synchronous, called from the media loop) -------------------------------

    def send_audio(self, ulaw: bytes, at_ms: int) -> None:
        if self._next_at_ms is not None and at_ms > self._next_at_ms:
            # Fill a gap in Twilio's frames so Deepgram's clock keeps matching ours.
            gap = min(at_ms - self._next_at_ms, 5_000)
            self._queue_audio(ulaw_silence(gap), at_ms - gap)
        self._queue_audio(ulaw, at_ms)

    def _queue_audio(self, ulaw: bytes, at_ms: int) -> None:
        if not ulaw:
            return  # an empty binary frame would close the stream
        self._unconfirmed.append((at_ms, ulaw))
        while self._unconfirmed and at_ms - self._unconfirmed[0][0] > _MAX_REPLAY_MS:
            self._unconfirmed.popleft()
        self._next_at_ms = at_ms + _duration_ms(ulaw)
        self._forward(ulaw, at_ms)

    def _forward(self, ulaw: bytes, at_ms: int) -> None:
        catch_up = self._catch_up
        if catch_up is None:
            self._send(ulaw, at_ms)
            return
        for offset in range(0, len(ulaw), _FRAME_BYTES):
            frame = ulaw[offset : offset + _FRAME_BYTES]
            if _is_silent(frame):
                catch_up.silent_run_ms += _duration_ms(frame)
                if catch_up.silent_run_ms > _KEPT_SILENCE_MS:
                    catch_up.skipped_ms += _duration_ms(frame)
                    continue
            else:
                catch_up.silent_run_ms = 0
            self._send(frame, at_ms + _duration_ms(ulaw[:offset]))

    def _send(self, ulaw: bytes, at_ms: int) -> None:
        if at_ms != self._socket_end_at_ms:  # audio was skipped: the socket's clock jumps here
            self._anchors.append((self._socket_ms, at_ms))
        duration_ms = _duration_ms(ulaw)
        self._socket_ms += duration_ms
        self._socket_end_at_ms = at_ms + duration_ms
        # Audio goes out in batches: a socket send per 20 ms frame is most of the per-call CPU, and
        # speech is detected locally, so the batch delays only Deepgram's words, not any decision.
        self._batch += ulaw
        if len(self._batch) >= self._batch_bytes:
            self._flush_batch()

    def _clock_at(self, socket_ms: int) -> int:
        """This socket's time on the call's audio clock."""
        if not self._anchors:
            return socket_ms
        index = max(0, bisect.bisect_right(self._anchors, (socket_ms, 2**62)) - 1)
        anchor_socket_ms, anchor_clock_ms = self._anchors[index]
        return anchor_clock_ms + socket_ms - anchor_socket_ms

    def _flush_batch(self) -> None:
        if self._batch:
            self._outbox.put_nowait(bytes(self._batch))
            self._batch.clear()

    def finalize(self) -> None:
        self._flush_batch()
        self._outbox.put_nowait(_FINALIZE)

    async def close(self) -> None:
        """CloseStream, so Deepgram flushes its last results; the reader ends on its close."""
        self._flush_batch()
        self._outbox.put_nowait(_CLOSE_STREAM)
        await super().close()

    # -- the socket side ------------------------------------------------------------------------

    def _on_connect(self) -> None:
        """A fresh socket: its clock starts at zero, on the first unconfirmed frame, which is replayed."""
        replay = list(self._unconfirmed)
        self._batch.clear()  # its audio is in the replay
        controls = [item for item in self._drain_outbox() if not isinstance(item, bytes)]
        self._socket_ms, self._anchors, self._socket_end_at_ms = 0, [], None
        self._catch_up = _CatchUp(
            speech_until_ms=_end_of_speech(replay),
            since_ms=self._now_ms(),
            backlog_ms=sum(_duration_ms(ulaw) for _, ulaw in replay),
        )
        for at_ms, ulaw in replay:
            self._forward(ulaw, at_ms)
        self._flush_batch()
        for item in controls:  # control messages stay; the audio queued with them is in the replay
            self._outbox.put_nowait(item)
        if self._catch_up.speech_until_ms is None:
            self._catch_up = None  # nothing said in the backlog: nothing to wait for

    def _on_message(self, raw: str | bytes) -> None:
        try:
            message = _decode(raw)
        except msgspec.DecodeError:
            logger.warning("ignored a malformed Deepgram message", extra={"length": len(raw)})
            return
        self._handle(message)

    def _to_clock(self, seconds: float) -> int:
        return self._clock_at(round(seconds * 1000))

    def _caught_up(self, end_ms: int) -> None:
        """Deepgram's results reached the backlog's last speech: the new socket is live."""
        catch_up = self._catch_up
        if catch_up is None or catch_up.speech_until_ms is None or end_ms < catch_up.speech_until_ms:
            return
        self._catch_up = None
        took_ms = self._now_ms() - catch_up.since_ms
        self.catch_ups.append(took_ms)
        metrics.milliseconds("SttCatchUp", took_ms)
        logger.info(
            "Deepgram caught up after a reconnect",
            extra={
                "catch_up_ms": took_ms,
                "backlog_ms": catch_up.backlog_ms,
                "skipped_silence_ms": catch_up.skipped_ms,
            },
        )

    def _handle(self, message: _Message) -> None:
        if message.type == "Results":
            self._socket_works()
            channel = message.channel if isinstance(message.channel, _Channel) else _Channel()
            alternative = channel.alternatives[0] if channel.alternatives else _Alternative()
            words = [
                Word(w.punctuated_word or w.word, self._to_clock(w.start), self._to_clock(w.end))
                for w in alternative.words
            ]
            start_ms = self._to_clock(message.start)
            end_ms = self._to_clock(message.start + message.duration)
            self._caught_up(end_ms)
            text = alternative.transcript
            if message.is_final:
                # Words already finalized before a reconnect are not said twice.
                kept = [w for w in words if w.end_ms > self._confirmed_ms]
                if len(kept) != len(words):
                    words, text = kept, " ".join(w.text for w in kept)
                self._confirm(end_ms)
            self._on_event(
                Transcript(
                    self._now_ms(),
                    text,
                    message.is_final,
                    speech_final=message.speech_final,
                    from_finalize=message.from_finalize,
                    start_ms=start_ms,
                    end_ms=end_ms,
                    words=words,
                )
            )
        elif message.type == "UtteranceEnd":
            last = message.last_word_end
            self._on_event(UtteranceEnd(self._now_ms(), self._to_clock(last) if last is not None else None))
        elif message.type == "Error":
            logger.warning(
                "Deepgram reported an error", extra={"description": message.description, "variant": message.variant}
            )

    def _confirm(self, end_ms: int) -> None:
        self._confirmed_ms = max(self._confirmed_ms, end_ms)
        while self._unconfirmed:
            at_ms, ulaw = self._unconfirmed[0]
            if at_ms + len(ulaw) * 1000 // SAMPLE_RATE > self._confirmed_ms:
                break
            self._unconfirmed.popleft()


async def check(url: str, api_key: str) -> None:
    """The smallest real exchange: a second of silence, then a clean close with Metadata."""
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Token {api_key}"}, open_timeout=5, ping_interval=None
    ) as socket:
        for _ in range(50):
            await socket.send(ulaw_silence(20))
        await socket.send(_CLOSE_STREAM)
        async for raw in socket:
            if _decode(raw).type == "Metadata":
                break
        else:
            raise DeepgramError(f"the stream closed without Metadata (close code {socket.close_code})")
