"""The conversation engine's vocabulary: the events it is fed and the actions it returns.

Events come from the caller (Twilio) and from the three provider roles (speech-to-text, chat model,
text-to-speech); each role also reports `ProviderFailed` when it fails for good (a refused key, a
permanent close, exhausted retries). Actions are the engine's decisions in its own words: `PlayAudio`,
`PlaceMark` and `ClearPlayback` are what to do to the caller's playback, and `core.twilio` names the
wire frames that carry them (`OutboundMedia`, `OutboundMark`, `OutboundClear`).

Every event carries `at_ms`, a time on the call's audio clock (milliseconds since the media stream
began, from Twilio's `media.timestamp`). Events that do not come from caller audio (a transcript, a
mark echo, TTS audio) are stamped by the adapter with the clock's current reading, the end of the
last caller frame. Classes are plain slotted dataclasses: a few are made for every 20 ms frame.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from core.records import CallSummary, ChatMessage, NextStep, SavedConversation, ToolCall
from core.tools import ToolSpec

# -- events (fed to the engine) ---------------------------------------------------------------------


@dataclass(slots=True)
class CallStarted:
    """A stream began. With `resume` in its parameters it continues a call: `restored` is the
    conversation the call's earlier streams saved (None if none could be read)."""

    at_ms: int
    call_sid: str
    stream_sid: str
    parameters: dict[str, str] = field(default_factory=dict)
    restored: SavedConversation | None = None


@dataclass(slots=True)
class CallerAudio:
    """One frame of caller audio, µ-law 8 kHz, beginning at `at_ms`."""

    at_ms: int
    ulaw: bytes


@dataclass(slots=True)
class Word:
    text: str
    start_ms: int
    end_ms: int


@dataclass(slots=True)
class Transcript:
    """A Deepgram `Results` message; times are on the audio clock (the client re-bases them)."""

    at_ms: int
    text: str
    is_final: bool
    speech_final: bool = False
    from_finalize: bool = False
    start_ms: int = 0
    end_ms: int = 0
    words: list[Word] = field(default_factory=list)


@dataclass(slots=True)
class UtteranceEnd:
    at_ms: int
    last_word_end_ms: int | None = None


@dataclass(slots=True)
class LlmText:
    at_ms: int
    reply_id: str
    text: str


@dataclass(slots=True)
class LlmDone:
    """The model's stream ended; `finish_reason` as OpenAI gives it ("stop", "length", "content_filter")."""

    at_ms: int
    reply_id: str
    finish_reason: str = "stop"


@dataclass(slots=True)
class LlmToolCalls:
    """The model asked for tools (DESIGN.md section 2b); its stream ends with `finish_reason` "tool_calls"."""

    at_ms: int
    reply_id: str
    calls: tuple[ToolCall, ...]


@dataclass(slots=True)
class ToolAnswered:
    """An HTTP tool's answer, or the error result standing for it."""

    at_ms: int
    call_id: str
    result: str


@dataclass(slots=True)
class LlmFailed:
    at_ms: int
    reply_id: str
    reason: str


@dataclass(slots=True)
class AlignedChar:
    """One character of spoken text and when it starts in its audio chunk (ms from the chunk start)."""

    char: str
    start_ms: float
    duration_ms: float


@dataclass(slots=True)
class TtsAudio:
    at_ms: int
    reply_id: str
    ulaw: bytes
    alignment: list[AlignedChar] | None = None


@dataclass(slots=True)
class TtsDone:
    at_ms: int
    reply_id: str


@dataclass(slots=True)
class TtsFailed:
    at_ms: int
    reply_id: str
    reason: str


@dataclass(slots=True)
class MarkPlayed:
    at_ms: int
    name: str


@dataclass(slots=True)
class DtmfPressed:
    at_ms: int
    digit: str


class ProviderRole(enum.StrEnum):
    STT = "speech-to-text"
    CHAT = "chat model"
    TTS = "text-to-speech"


@dataclass(slots=True)
class ProviderFailed:
    """A provider role failed for good: reconnecting or retrying will not bring it back this call."""

    at_ms: int
    role: ProviderRole
    reason: str


EndReason = Literal["stop", "closed", "shutdown", "error", "agent"]


@dataclass(slots=True)
class CallEnded:
    at_ms: int
    reason: EndReason


Event = (
    CallStarted
    | CallerAudio
    | Transcript
    | UtteranceEnd
    | LlmText
    | LlmDone
    | LlmToolCalls
    | ToolAnswered
    | LlmFailed
    | TtsAudio
    | TtsDone
    | TtsFailed
    | MarkPlayed
    | DtmfPressed
    | ProviderFailed
    | CallEnded
)

# -- actions (returned by the engine) ---------------------------------------------------------------


@dataclass(slots=True)
class SendToStt:
    ulaw: bytes


@dataclass(slots=True)
class FinalizeStt:
    pass


@dataclass(slots=True)
class StartLlm:
    reply_id: str
    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()


@dataclass(slots=True)
class RunTool:
    """Call a team's HTTP tool; its answer comes back as `ToolAnswered` with the call's id."""

    call: ToolCall


@dataclass(slots=True)
class CancelLlm:
    reply_id: str


@dataclass(slots=True)
class SendTtsText:
    reply_id: str
    text: str


@dataclass(slots=True)
class FinishTts:
    """No more text for this reply: flush and close its context (its final audio follows). With
    `drop_unfinished`, text not yet sent that does not end a sentence is never voiced."""

    reply_id: str
    drop_unfinished: bool = False


@dataclass(slots=True)
class CancelTts:
    """Close the reply's context now; any audio of it that still arrives is dropped."""

    reply_id: str


@dataclass(slots=True)
class PlayAudio:
    """Audio for the caller, µ-law 8 kHz, queued after what is already playing."""

    ulaw: bytes


@dataclass(slots=True)
class PlaceMark:
    """A named point in the caller's playback; Twilio echoes it when playback reaches it (or on clear)."""

    name: str


@dataclass(slots=True)
class ClearPlayback:
    """Stop the caller's playback now and drop what is queued (Twilio echoes every pending mark)."""


class Unit(enum.StrEnum):
    MILLISECONDS = "Milliseconds"
    COUNT = "Count"


@dataclass(slots=True)
class RecordMetric:
    """A CloudWatch metric: `name` as it appears in CloudWatch, with its unit."""

    name: str
    value: float
    unit: Unit
    reply_id: str | None = None


@dataclass(slots=True)
class CloseProviders:
    pass


@dataclass(slots=True)
class EndCall:
    """The agent ends the call: its last words were heard (or it has no voice left). Record `next` on
    the call's item, then close the stream; `outcome` says why, for the record."""

    outcome: str
    next: NextStep


@dataclass(slots=True)
class SaveConversation:
    """The conversation changed (a turn was committed, a tool answered): keep it where the call's next
    stream can find it. The runner writes the latest one, off the audio path."""

    conversation: SavedConversation


@dataclass(slots=True)
class SaveSummary:
    summary: CallSummary


Action = (
    SendToStt
    | FinalizeStt
    | StartLlm
    | RunTool
    | CancelLlm
    | SendTtsText
    | FinishTts
    | CancelTts
    | PlayAudio
    | PlaceMark
    | ClearPlayback
    | RecordMetric
    | CloseProviders
    | EndCall
    | SaveConversation
    | SaveSummary
)
