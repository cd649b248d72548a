"""ElevenLabs text-to-speech over one multi-context WebSocket per call.

Each reply is a context with a fresh `context_id` (the reply's id). Text is sent as the model
writes it, cut at phrase boundaries (ElevenLabs wants text ending in a space, and whole phrases
sound better), then `flush` + `close_context` at the end of the reply, which makes ElevenLabs send
the context's last audio and `isFinal`. On barge-in the context is closed and any audio of it that
is still on the wire is dropped. The socket is opened when the call starts, before it is needed,
and kept alive while idle. If it drops, the client reconnects and re-sends each unfinished reply's
text that has not been voiced yet (known from the alignment of the audio received).

Audio arrives in `ELEVENLABS_OUTPUT_FORMAT`; `ulaw_8000` goes to Twilio untouched, `pcm_16000`
and `pcm_24000` are decimated and encoded by the audio core.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from typing import Any
from urllib.parse import quote, urlencode

import msgspec
import websockets

from core.audio import TtsAudioConverter
from core.events import AlignedChar, ProviderRole, TtsAudio, TtsDone, TtsFailed
from core.logs import logger
from core.providers.connection import ProviderConnection
from core.providers.roles import Clock, EventSink

VOICE_SETTINGS = {"stability": 0.5, "similarity_boost": 0.75, "style": 0.0, "use_speaker_boost": True, "speed": 1.0}
# Send text at the end of a phrase; a long run without punctuation goes at a word boundary.
_PHRASE_END = re.compile(r"[.!?;:,]\s|\n")
_MAX_BUFFERED = 120


class _Alignment(msgspec.Struct):
    chars: list[str] = msgspec.field(default_factory=list)
    charStartTimesMs: list[float] = msgspec.field(default_factory=list)
    charDurationsMs: list[float] | None = None
    charsDurationsMs: list[float] | None = None


class _Message(msgspec.Struct):
    audio: str | None = None
    isFinal: bool | None = None
    is_final: bool | None = None
    contextId: str | None = None
    alignment: _Alignment | None = None
    normalizedAlignment: _Alignment | None = None
    error: str | None = None
    message: str | None = None


_decode = msgspec.json.Decoder(_Message).decode
_encode = msgspec.json.Encoder().encode


class ElevenLabsError(Exception):
    """What `parley check` found wrong in its exchange with ElevenLabs."""


def stream_url(base_url: str, voice_id: str, *, model_id: str, output_format: str, inactivity_timeout: int) -> str:
    query = {
        "model_id": model_id,
        "output_format": output_format,
        "inactivity_timeout": inactivity_timeout,
        "sync_alignment": "true",
        "auto_mode": "true",  # we send whole phrases: no chunk schedule, lowest latency
    }
    return f"{base_url}/v1/text-to-speech/{quote(voice_id)}/multi-stream-input?{urlencode(query)}"


@dataclasses.dataclass
class _Context:
    id: str
    converter: TtsAudioConverter
    pending: str = ""  # written by the model, not yet sent
    sent: str = ""  # sent to ElevenLabs on any socket
    voiced_chars: int = 0  # characters of `sent` that audio has arrived for
    initialised: bool = False
    finished: bool = False  # flush + close_context sent
    done: bool = False


class ElevenLabsStream(ProviderConnection[dict[str, Any]]):
    """One call's voice (the `TextToSpeech` role): one context per reply."""

    name = "ElevenLabs"
    role = ProviderRole.TTS
    settings_hint = "ELEVENLABS_API_KEY, ELEVENLABS_VOICE_ID and ELEVENLABS_URL"
    keepalive_message = '{"text": ""}'  # keeps an idle socket open

    def __init__(
        self,
        url: str,
        api_key: str,
        output_format: str,
        on_event: EventSink,
        now_ms: Clock,
        *,
        keepalive_s: float = 10.0,
        max_backoff_s: float = 2.0,
        open_timeout_s: float = 5.0,
        give_up_after_s: float = 30.0,
    ) -> None:
        super().__init__(
            url,
            {"xi-api-key": api_key},
            on_event,
            now_ms,
            keepalive_s=keepalive_s,
            max_backoff_s=max_backoff_s,
            give_up_after_s=give_up_after_s,
            open_timeout_s=open_timeout_s,
            max_size=16 * 2**20,
        )
        self._output_format = output_format
        self._contexts: dict[str, _Context] = {}
        self._cancelled: set[str] = set()

    # -- what the call runner asks ----------------------------------------------------------------

    def send_text(self, reply_id: str, text: str) -> None:
        context = self._contexts.get(reply_id)
        if context is None:
            context = self._contexts[reply_id] = _Context(reply_id, TtsAudioConverter(self._output_format))
        phrases, context.pending = split_phrases(context.pending + text)
        for phrase in phrases:
            self._send(context, phrase)

    def finish(self, reply_id: str, drop_unfinished: bool = False) -> None:
        """No more text: send what is left, flush, and close the context (its isFinal follows)."""
        context = self._contexts.get(reply_id)
        if context is None:
            self._on_event(TtsDone(self._now_ms(), reply_id))  # nothing was ever said
            return
        if drop_unfinished and not context.pending.rstrip().endswith((".", "!", "?")):
            context.pending = ""  # half a sentence is worse than none
        if context.pending.strip():
            self._send(context, context.pending)
        context.pending = ""
        context.finished = True
        if not context.initialised:  # empty reply: no context on the server to close
            self._forget(context)
            self._on_event(TtsDone(self._now_ms(), reply_id))
            return
        self._outbox.put_nowait({"context_id": reply_id, "flush": True})
        self._outbox.put_nowait({"context_id": reply_id, "close_context": True})

    def cancel(self, reply_id: str) -> None:
        context = self._contexts.pop(reply_id, None)
        self._cancelled.add(reply_id)
        for item in self._drain_outbox():  # text of the interrupted reply that has not gone out yet never will
            if item is None or item.get("context_id") != reply_id:
                self._outbox.put_nowait(item)
        if context is not None and context.initialised:
            self._outbox.put_nowait({"context_id": reply_id, "close_context": True})

    async def close(self) -> None:
        self._outbox.put_nowait({"close_socket": True})
        await super().close()

    def _send(self, context: _Context, text: str) -> None:
        if not text.strip():
            return
        text = text if text.endswith(" ") else text + " "
        message: dict[str, Any] = {"text": text, "context_id": context.id}
        if not context.initialised:
            message["voice_settings"] = VOICE_SETTINGS  # only in a context's first message
            context.initialised = True
        context.sent += text
        self._outbox.put_nowait(message)

    def _forget(self, context: _Context) -> None:
        self._contexts.pop(context.id, None)

    # -- the socket -----------------------------------------------------------------------------

    def _on_failed(self, reason: str) -> None:
        for context in list(self._contexts.values()):
            self._forget(context)
            self._on_event(TtsFailed(self._now_ms(), context.id, reason))

    def _encode(self, item: dict[str, Any]) -> str:
        return _encode(item).decode()

    def _on_connect(self) -> None:
        """On a new socket, say again what no audio has arrived for yet.

        Queued text was already counted in `sent`, so the queue is rebuilt from the contexts; only
        socket-level messages (close_socket, the end marker) are carried over.
        """
        queued = self._drain_outbox()
        for context in list(self._contexts.values()):
            if not context.initialised or context.done:
                continue
            unvoiced = context.sent[context.voiced_chars :]
            context.sent = context.sent[: context.voiced_chars]
            context.initialised = False
            phrases, rest = split_phrases(unvoiced)
            for phrase in [*phrases, rest]:
                self._send(context, phrase)
            if context.finished and context.initialised:
                self._outbox.put_nowait({"context_id": context.id, "flush": True})
                self._outbox.put_nowait({"context_id": context.id, "close_context": True})
            elif context.finished:  # everything had been voiced; only isFinal was missing
                self._forget(context)
                self._on_event(TtsDone(self._now_ms(), context.id))
        for item in queued:
            if item is None or "close_socket" in item:
                self._outbox.put_nowait(item)

    def _on_message(self, raw: str | bytes) -> None:
        try:
            message = _decode(raw)
        except msgspec.DecodeError:
            logger.warning("ignored a malformed ElevenLabs message", extra={"length": len(raw)})
            return
        self._handle(message)

    def _handle(self, message: _Message) -> None:
        if message.error:
            # An error is followed by a 1008 close (input timeout, quota, "something went wrong"): the replies
            # it names (or, naming none, every open one) will never get their isFinal. Settle them, so the
            # engine can apologise; the socket reconnects, and repeated closes fail the role.
            logger.warning("ElevenLabs reported an error", extra={"error": message.error, "detail": message.message})
            named = self._contexts.get(message.contextId) if message.contextId else None
            failed = [named] if named is not None else list(self._contexts.values())
            for settled in failed:
                self._forget(settled)
                self._on_event(TtsFailed(self._now_ms(), settled.id, f"{message.error}: {message.message}"))
            return
        context_id = message.contextId
        if context_id is None or context_id in self._cancelled:
            return  # late audio of an interrupted reply
        context = self._contexts.get(context_id)
        if context is None:
            return
        if message.audio:
            self._socket_works()
            audio = context.converter.convert(base64.b64decode(message.audio))
            alignment = _aligned(message.alignment)
            if alignment is not None:
                context.voiced_chars += len(alignment)
            if audio:
                self._on_event(TtsAudio(self._now_ms(), context_id, audio, alignment))
        if message.isFinal or message.is_final:
            context.done = True
            self._forget(context)
            self._on_event(TtsDone(self._now_ms(), context_id))


def split_phrases(text: str) -> tuple[list[str], str]:
    """Whole phrases ready to voice, and the unfinished rest."""
    phrases: list[str] = []
    while True:
        match = _PHRASE_END.search(text)
        if match is None:
            if len(text) < _MAX_BUFFERED or " " not in text:
                return phrases, text
            cut = text.rindex(" ") + 1
        else:
            cut = match.end()
        phrases.append(text[:cut])
        text = text[cut:]


def _aligned(alignment: _Alignment | None) -> list[AlignedChar] | None:
    if alignment is None or not alignment.chars:
        return None
    durations = alignment.charDurationsMs or alignment.charsDurationsMs or [0.0] * len(alignment.chars)
    return [
        AlignedChar(char, start, duration)
        for char, start, duration in zip(alignment.chars, alignment.charStartTimesMs, durations, strict=False)
    ]


async def check(url: str, api_key: str) -> None:
    """The smallest real exchange: one context, one word, its first audio, then close the socket."""
    async with websockets.connect(
        url, additional_headers={"xi-api-key": api_key}, open_timeout=5, ping_interval=None
    ) as socket:
        await socket.send(
            _encode({"text": "Hello ", "context_id": "check", "voice_settings": VOICE_SETTINGS, "flush": True})
        )
        async for raw in socket:
            message = _decode(raw)
            if message.error:
                raise ElevenLabsError(f"{message.error}: {message.message}")
            if message.audio:
                break
        else:
            raise ElevenLabsError(f"the socket closed before any audio (close code {socket.close_code})")
        await socket.send(_encode({"close_socket": True}))
