"""The three provider roles a call needs, as interfaces: speech-to-text, chat model, text-to-speech.

One instance of each serves one call. It is built by a `ProviderFactory` from the settings, gets the
call's `on_event` (which feeds the conversation engine) and `now_ms` (the call's audio clock), and
reports everything through events: results, and `ProviderFailed` when it fails for good (a refused
key, a permanent close, exhausted retries). The call runner starts each one's `run()` in the call's
task group, calls the methods below as the engine's actions say, and `close()`s them at the end; it
knows no vendor. A fake, a fallback or a second vendor is a new class here, not an edit of the runner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

from core.events import Event
from core.records import ChatMessage
from core.tools import ToolSpec

EventSink = Callable[[Event], None]
Clock = Callable[[], int]


class CallProvider(Protocol):
    async def run(self) -> None:
        """Serve the call until `close()`; reconnect and retry as the vendor allows."""

    async def close(self) -> None:
        """Finish cleanly: flush what is pending, read the last results, release the connection."""


class SpeechToText(CallProvider, Protocol):
    """Emits `Transcript`, `UtteranceEnd`, and `ProviderFailed(STT)`."""

    def send_audio(self, ulaw: bytes, at_ms: int) -> None: ...

    def finalize(self) -> None:
        """Flush the words pending now; a `Transcript` with `from_finalize` answers (rule 1)."""


class ChatModel(CallProvider, Protocol):
    """Emits `LlmText`, then `LlmDone` or `LlmToolCalls`, or `LlmFailed`, per reply; and `ProviderFailed(CHAT)`."""

    def start(self, reply_id: str, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> None:
        """Start (or restart: a retry, the round after a tool's answer) the reply's stream, offering `tools`."""

    def cancel(self, reply_id: str) -> None: ...


class TextToSpeech(CallProvider, Protocol):
    """Emits `TtsAudio`, `TtsDone`, `TtsFailed` per reply, and `ProviderFailed(TTS)`."""

    def send_text(self, reply_id: str, text: str) -> None: ...

    def finish(self, reply_id: str, drop_unfinished: bool = False) -> None:
        """No more text for this reply: its last audio and `TtsDone` follow. With `drop_unfinished`, text
        not yet sent that does not end a sentence is dropped (the model ran out of tokens)."""

    def cancel(self, reply_id: str) -> None:
        """Drop the reply now; its audio still on the wire is never emitted."""


@dataclasses.dataclass(frozen=True)
class CallProviders:
    stt: SpeechToText
    chat: ChatModel
    tts: TextToSpeech

    def all(self) -> tuple[CallProvider, ...]:
        return (self.stt, self.chat, self.tts)

    def reconnects(self) -> dict[str, int]:
        """How often each socket provider reopened a dropped connection (the HTTP model has none)."""
        return {"stt": getattr(self.stt, "reconnects", 0), "tts": getattr(self.tts, "reconnects", 0)}


@dataclasses.dataclass(frozen=True)
class CallContext:
    """What a call's providers are told about the call they serve."""

    call_sid: str
    silence_threshold_ms: int
    on_event: EventSink
    now_ms: Clock


class ProviderFactory(Protocol):
    def for_call(self, call: CallContext) -> CallProviders:
        """The call's three providers, not yet running."""

    async def aclose(self) -> None:
        """Release what the factory shares between calls (HTTP connection pools)."""
