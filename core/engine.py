"""The conversation engine: turn-taking for one call, as a pure state machine.

Rules of this file
==================
1. Everything that decides what the agent says and when lives here. The asyncio code around it
   (`core/call.py`) only moves bytes between sockets and this object.
2. No I/O, no sleeps, no wall clock. Time is `at_ms` on the call's audio clock (Twilio's
   `media.timestamp`), so behaviour is the same on an idle laptop and a loaded server, and every
   rule is tested by feeding events and reading the actions that come back.
3. The two state machines are tables (`CALLER_TRANSITIONS`, `AGENT_TRANSITIONS`); the code below
   decides when a trigger fires, the tables decide where it leads. A trigger a table does not
   allow raises `ConversationError`, which names the machine, the state and the trigger.

Theory of operation
===================
There are two machines, one per party, and they see each other's state but never each other's
events:

* The caller: SILENT (no turn open) -> SPEAKING <-> PAUSED -> SILENT. A turn opens with speech
  (or a key press, or words the detector missed) and closes when a pause reaches the silence
  threshold; shorter pauses keep it open. Speech is decided locally on the audio by the voice
  activity detector; Deepgram's words corroborate it (a word extends the turn's last activity).

* The agent: IDLE -> HOLDING (a speculative reply whose audio is held back) -> THINKING (the reply
  is committed, no audio out yet) -> SPEAKING (audio out until Twilio echoes the reply's last
  mark) -> IDLE. Barge-in is SPEAKING -> IDLE; a caller who resumes talking sends HOLDING -> IDLE.

Caller speech heard while the agent is THINKING or SPEAKING does not count toward a turn unless it
lasts `barge_in_min_speech_ms`: then it interrupts (Twilio `clear`, TTS context closed, LLM stream
closed, all in the same step) and the turn it starts begins at its onset. Anything shorter, and any
word Deepgram places while the agent spoke, is discarded (`_listen_from_ms`).

A reply's marks are named `<reply id>.<n>` and remember how much of the reply's audio precedes
them; Twilio echoes every pending mark when it clears, so marks of a reply that was cleared are not
taken as played. The history keeps what the caller heard: a whole reply when its last mark is
played, else the text up to the playback position (from ElevenLabs' alignment when present, else in
proportion to the audio played).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from typing import Any

from core.audio import SAMPLE_RATE, VadConfig, VoiceActivityDetector
from core.events import (
    Action,
    AlignedChar,
    CallEnded,
    CallerAudio,
    CallStarted,
    CancelLlm,
    CancelTts,
    CloseProviders,
    DtmfPressed,
    Event,
    FinalizeStt,
    FinishTts,
    LlmDone,
    LlmFailed,
    LlmText,
    MarkPlayed,
    RecordMetric,
    SaveSummary,
    SendClear,
    SendMark,
    SendMedia,
    SendToStt,
    SendTtsText,
    StartLlm,
    Transcript,
    TtsAudio,
    TtsDone,
    TtsFailed,
    UtteranceEnd,
)


class CallerState(enum.Enum):
    SILENT = "SILENT"
    SPEAKING = "SPEAKING"
    PAUSED = "PAUSED"
    ENDED = "ENDED"


class AgentState(enum.Enum):
    IDLE = "IDLE"
    HOLDING = "HOLDING"
    THINKING = "THINKING"
    SPEAKING = "SPEAKING"
    ENDED = "ENDED"


C, A = CallerState, AgentState

CALLER_TRANSITIONS: dict[CallerState, dict[str, CallerState]] = {
    C.SILENT: {"speech_started": C.SPEAKING, "words_heard": C.PAUSED, "key_pressed": C.PAUSED, "call_ended": C.ENDED},
    C.SPEAKING: {"speech_ended": C.PAUSED, "words_heard": C.SPEAKING, "key_pressed": C.SPEAKING, "call_ended": C.ENDED},
    C.PAUSED: {
        "speech_started": C.SPEAKING,
        "words_heard": C.PAUSED,
        "key_pressed": C.PAUSED,
        "turn_ended": C.SILENT,
        "call_ended": C.ENDED,
    },
    C.ENDED: {},
}

AGENT_TRANSITIONS: dict[AgentState, dict[str, AgentState]] = {
    A.IDLE: {"greet": A.THINKING, "speculate": A.HOLDING, "answer": A.THINKING, "call_ended": A.ENDED},
    A.HOLDING: {"caller_resumed": A.IDLE, "release": A.THINKING, "call_ended": A.ENDED},
    A.THINKING: {
        "first_audio": A.SPEAKING,
        "caller_interrupted": A.IDLE,
        "reply_finished": A.IDLE,
        "call_ended": A.ENDED,
    },
    A.SPEAKING: {"reply_finished": A.IDLE, "barge_in": A.IDLE, "call_ended": A.ENDED},
    A.ENDED: {},
}


class ConversationError(Exception):
    """A trigger fired in a state whose table does not allow it: a bug in the engine's guards."""

    def __init__(self, machine: str, state: enum.Enum, trigger: str) -> None:
        self.machine, self.state, self.trigger = machine, state, trigger
        super().__init__(f"the {machine} cannot {trigger!r} while {state.value}")


@dataclasses.dataclass(frozen=True)
class TurnRules:
    """The settings of DESIGN.md section 2, in the engine's units."""

    silence_threshold_ms: int = 2000
    barge_in_min_speech_ms: int = 150
    speculate_after_ms: int = 400
    greeting: str = "Hello! How can I help?"
    system_prompt: str = "You are a friendly, concise phone assistant."
    apology: str = "Sorry, I'm having trouble answering right now. Could you say that again?"
    vad: VadConfig = dataclasses.field(default_factory=VadConfig)
    # Deepgram's word times and the detector's onset disagree by a few tens of ms.
    word_slack_ms: int = 120
    # A stop consonant's closure ("ac-t-ually") is a quiet frame inside speech: one such frame does
    # not break the barge-in count. A short "mm-hm" followed by silence still never reaches it.
    barge_in_gap_ms: int = 20
    llm_attempts: int = 2


@dataclasses.dataclass
class _Mark:
    reply_offset_ms: float


@dataclasses.dataclass
class _Reply:
    id: str
    kind: str  # "greeting", "answer" or "apology"
    caller_text: str
    caller_segments: list[tuple[int, str]]
    speech_end_ms: int | None
    started_at_ms: int
    held: bool = False
    text: str = ""
    attempts: int = 1
    llm_done: bool = False
    tts_done: bool = False
    cleared: bool = False
    audio_ms: float = 0.0
    held_audio: list[tuple[bytes, str]] = dataclasses.field(default_factory=list)
    marks: dict[str, _Mark] = dataclasses.field(default_factory=dict)
    mark_count: int = 0
    last_mark_name: str | None = None
    played_ms: float = 0.0
    played_mark_at_ms: int | None = None
    first_audio_at_ms: int | None = None
    first_text_at_ms: int | None = None
    aligned: list[tuple[float, float, str]] = dataclasses.field(default_factory=list)


_SENTENCE_ENDS = frozenset(".!?")
_NO_ACTIONS: list[Action] = []


class Conversation:
    """One call's turn-taking. Feed `handle(event)`; carry out the actions it returns, in order."""

    def __init__(self, rules: TurnRules | None = None) -> None:
        self.rules = rules or TurnRules()
        self.caller_state = CallerState.SILENT
        self.agent_state = AgentState.IDLE
        self.history: list[dict[str, str]] = []
        self.call_sid = ""
        self.stream_sid = ""
        self._vad = VoiceActivityDetector(self.rules.vad)
        self._segments: list[tuple[int, str]] = []
        self._activity_ms = 0  # last caller voice, word or key of the open turn
        self._speech_counts = False  # whether the detector's current speech belongs to a turn
        # Words starting in [deaf_from, listen_from) were said while the agent held the floor.
        self._deaf_from_ms: float = float("inf")
        self._listen_from_ms: float = float("inf")
        self._finalize_sent = False
        self._finalize_pending = False
        self._last_turn_end_ms = -1
        self._reply: _Reply | None = None
        self._reply_count = 0
        self._now_ms = 0
        self._turns: list[dict[str, Any]] = []
        self._metrics: dict[str, list[float]] = {}

    # -- the two machines ---------------------------------------------------------------------------

    def _caller(self, trigger: str) -> None:
        try:
            self.caller_state = CALLER_TRANSITIONS[self.caller_state][trigger]
        except KeyError:
            raise ConversationError("caller", self.caller_state, trigger) from None

    def _agent(self, trigger: str) -> None:
        try:
            self.agent_state = AGENT_TRANSITIONS[self.agent_state][trigger]
        except KeyError:
            raise ConversationError("agent", self.agent_state, trigger) from None

    # -- entry point --------------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if self.agent_state is AgentState.ENDED:
            return _NO_ACTIONS  # late provider events after hang-up are normal
        self._now_ms = max(self._now_ms, event.at_ms)
        actions: list[Action] = []
        match event:
            case CallerAudio():
                self._on_audio(event, actions)
            case Transcript():
                self._on_transcript(event, actions)
            case LlmText():
                self._on_llm_text(event, actions)
            case TtsAudio():
                self._on_tts_audio(event, actions)
            case MarkPlayed():
                self._on_mark(event, actions)
            case LlmDone():
                self._on_llm_done(event, actions)
            case TtsDone() | TtsFailed():
                self._on_tts_done(event.reply_id, actions)
            case LlmFailed():
                self._on_llm_failed(event, actions)
            case DtmfPressed():
                self._on_dtmf(event, actions)
            case CallStarted():
                self._on_start(event, actions)
            case CallEnded():
                self._on_end(event, actions)
            case UtteranceEnd():
                pass  # the local clock already closes turns; Deepgram's word times extend them
        return actions

    # -- caller side ----------------------------------------------------------------------------------

    def _on_audio(self, event: CallerAudio, actions: list[Action]) -> None:
        actions.append(SendToStt(event.ulaw))
        now = event.at_ms + len(event.ulaw) * 1000 // SAMPLE_RATE
        self._now_ms = max(self._now_ms, now)
        frame = self._vad.process(event.ulaw, event.at_ms)
        if frame.started and frame.onset_ms is not None:
            self._on_speech_started(frame.onset_ms, actions)
        if frame.speaking and frame.onset_ms is not None:
            if self._speech_counts:
                self._activity_ms = max(self._activity_ms, frame.last_voice_ms or now)
            elif (
                now - frame.onset_ms >= self.rules.barge_in_min_speech_ms
                and now - (frame.last_voice_ms or now) <= self.rules.barge_in_gap_ms
            ):
                # Voiced time, not the detector's hangover after a short "mm-hm".
                self._interrupt(frame.onset_ms, actions)
        if frame.ended and self._speech_counts:
            self._speech_counts = False
            self._activity_ms = max(self._activity_ms, frame.last_voice_ms or now)
            self._caller("speech_ended")
        self._on_clock(now, actions)

    def _on_speech_started(self, onset_ms: int, actions: list[Action]) -> None:
        if self.agent_state in (AgentState.THINKING, AgentState.SPEAKING):
            return  # it counts only if it lasts long enough to interrupt (checked per frame)
        if self.agent_state is AgentState.HOLDING:
            self._drop_speculation(actions)
        self._open_speech(onset_ms)

    def _open_speech(self, onset_ms: int) -> None:
        if self.caller_state is CallerState.SILENT:
            self._segments = []
        self._speech_counts = True
        self._finalize_sent = self._finalize_pending = False
        self._activity_ms = max(self._activity_ms, onset_ms)
        if self.caller_state is not CallerState.SPEAKING:
            self._caller("speech_started")

    def _interrupt(self, onset_ms: int, actions: list[Action], *, by_voice: bool = True) -> None:
        """Caller speech (or a key) while the agent is about to speak or speaking: stop it now."""
        reply = self._reply
        if self.agent_state is AgentState.SPEAKING and reply is not None:
            actions.append(SendClear())
            self._stop_reply_streams(reply, actions)
            reply.cleared = True
            actions.append(RecordMetric("barge_in_ms", self._now_ms - onset_ms, reply.id))
            self._metrics.setdefault("barge_in_ms", []).append(self._now_ms - onset_ms)
            self._commit_reply(reply, self._heard_text(reply), interrupted=True)
            self._reply = None
            self._agent("barge_in")
        elif self.agent_state is AgentState.THINKING and reply is not None:
            self._stop_reply_streams(reply, actions)
            # Nothing was heard: the caller is still in the turn the reply was answering.
            if self.caller_state is CallerState.SILENT:
                self._segments = []
            self._segments = [*reply.caller_segments, *self._segments]
            self._reply = None
            self._agent("caller_interrupted")
        self._listen_again(onset_ms - self.rules.word_slack_ms)
        if by_voice:
            self._open_speech(onset_ms)

    def _go_deaf(self) -> None:
        """The agent takes the floor: words the caller says from now on do not count."""
        self._deaf_from_ms = self._now_ms
        self._listen_from_ms = float("inf")

    def _listen_again(self, from_ms: float) -> None:
        self._listen_from_ms = from_ms

    def _on_transcript(self, event: Transcript, actions: list[Action]) -> None:
        if event.from_finalize:
            self._finalize_pending = False
        if not event.is_final:
            return
        words = [w for w in event.words if self._listening_at(w.start_ms)]
        if event.words:
            text = " ".join(w.text for w in words)
            start_ms = words[0].start_ms if words else event.start_ms
            end_ms = words[-1].end_ms if words else event.end_ms
        else:
            text = event.text.strip() if self._listening_at(event.start_ms) else ""
            start_ms, end_ms = event.start_ms, event.end_ms
        if text:
            self._add_words(start_ms, end_ms, text, actions)
        if event.speech_final and self.caller_state is CallerState.PAUSED and self.agent_state is AgentState.IDLE:
            self._speculate(actions)

    def _listening_at(self, start_ms: float) -> bool:
        return not self._deaf_from_ms <= start_ms < self._listen_from_ms

    def _add_words(self, start_ms: int, end_ms: int, text: str, actions: list[Action]) -> None:
        reply = self._reply
        if start_ms < self._last_turn_end_ms and self.caller_state is CallerState.SILENT:
            # Late words of a turn that already closed (Deepgram was slow to finalize them).
            if reply is not None and reply.kind == "answer" and reply.first_audio_at_ms is None:
                self._stop_reply_streams(reply, actions)
                self._reply = None
                self._agent("caller_interrupted")
                self._start_reply([*reply.caller_segments, (start_ms, text)], reply.speech_end_ms, actions)
                return
            if reply is not None and reply.kind == "answer":
                reply.caller_segments.append((start_ms, text))
                reply.caller_text = _join(reply.caller_segments)
                return
        if self.agent_state is AgentState.HOLDING:
            self._drop_speculation(actions)  # it answered less than the caller has now said
        if self.caller_state is CallerState.SILENT:
            self._segments = []
        self._segments.append((start_ms, text))
        self._segments.sort(key=lambda segment: segment[0])
        self._activity_ms = max(self._activity_ms, end_ms)
        self._caller("words_heard")

    def _on_dtmf(self, event: DtmfPressed, actions: list[Action]) -> None:
        if self.agent_state in (AgentState.THINKING, AgentState.SPEAKING):
            self._interrupt(event.at_ms, actions, by_voice=False)  # a key press is deliberate
        elif self.agent_state is AgentState.HOLDING:
            self._drop_speculation(actions)
        if self.caller_state is CallerState.SILENT:
            self._segments = []
        self._segments.append((event.at_ms, f"(pressed {event.digit})"))
        self._activity_ms = max(self._activity_ms, event.at_ms)
        self._finalize_sent = self._finalize_pending = False
        self._caller("key_pressed")

    def _on_clock(self, now: int, actions: list[Action]) -> None:
        if self.caller_state is not CallerState.PAUSED:
            return
        pause = now - self._activity_ms
        if pause >= self.rules.silence_threshold_ms:
            self._end_turn(now, actions)
            return
        if pause >= self.rules.speculate_after_ms and not self._finalize_sent:
            actions.append(FinalizeStt())  # flush Deepgram's pending words now, not at the threshold
            self._finalize_sent = self._finalize_pending = True
        if (
            self._finalize_sent
            and not self._finalize_pending
            and self.agent_state is AgentState.IDLE
            and pause >= self.rules.speculate_after_ms
        ):
            self._speculate(actions)

    def _end_turn(self, now: int, actions: list[Action]) -> None:
        if not self._finalize_sent:
            actions.append(FinalizeStt())
        segments, self._segments = self._segments, []
        self._caller("turn_ended")
        self._last_turn_end_ms = now
        self._finalize_sent = self._finalize_pending = False
        reply = self._reply
        if self.agent_state is AgentState.HOLDING and reply is not None:
            if reply.caller_text == _join(segments):
                self._release(reply, actions)
                return
            self._drop_speculation(actions)
        if _join(segments):
            self._start_reply(segments, self._activity_ms, actions)

    # -- agent side -----------------------------------------------------------------------------------

    def _next_reply_id(self) -> str:
        self._reply_count += 1
        return f"r{self._reply_count}"

    def _messages(self, caller_text: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.rules.system_prompt},
            *self.history,
            {"role": "user", "content": caller_text},
        ]

    def _start_reply(
        self, segments: list[tuple[int, str]], speech_end_ms: int | None, actions: list[Action], *, held: bool = False
    ) -> _Reply:
        text = _join(segments)
        reply = _Reply(
            id=self._next_reply_id(),
            kind="answer",
            caller_text=text,
            caller_segments=list(segments),
            speech_end_ms=speech_end_ms,
            started_at_ms=self._now_ms,
            held=held,
        )
        self._reply = reply
        actions.append(StartLlm(reply.id, self._messages(text)))
        self._agent("speculate" if held else "answer")
        if not held:
            self._go_deaf()
        return reply

    def _speculate(self, actions: list[Action]) -> None:
        if _join(self._segments):
            self._start_reply(self._segments, self._activity_ms, actions, held=True)

    def _drop_speculation(self, actions: list[Action]) -> None:
        reply = self._reply
        if reply is not None:
            self._stop_reply_streams(reply, actions)
        self._reply = None
        self._agent("caller_resumed")

    def _release(self, reply: _Reply, actions: list[Action]) -> None:
        """The pause reached the threshold: the held reply goes out now."""
        reply.held = False
        reply.speech_end_ms = self._activity_ms
        self._agent("release")
        self._go_deaf()
        held, reply.held_audio = reply.held_audio, []
        for ulaw, mark in held:
            self._emit_audio(reply, ulaw, mark, actions)
        if reply.tts_done and reply.mark_count == 0:
            self._finish_reply(reply)  # the model had nothing to say

    def _stop_reply_streams(self, reply: _Reply, actions: list[Action]) -> None:
        if not reply.llm_done:
            actions.append(CancelLlm(reply.id))
            reply.llm_done = True
        if not reply.tts_done:
            actions.append(CancelTts(reply.id))
            reply.tts_done = True

    def _current(self, reply_id: str) -> _Reply | None:
        reply = self._reply
        return reply if reply is not None and reply.id == reply_id and not reply.cleared else None

    def _on_start(self, event: CallStarted, actions: list[Action]) -> None:
        self.call_sid, self.stream_sid = event.call_sid, event.stream_sid
        if self.rules.greeting.strip():
            self._say(self.rules.greeting, "greeting", actions)

    def _say(self, text: str, kind: str, actions: list[Action]) -> None:
        """A reply whose text is known (no LLM): the greeting."""
        reply = _Reply(
            id=self._next_reply_id(),
            kind=kind,
            caller_text="",
            caller_segments=[],
            speech_end_ms=None,
            started_at_ms=self._now_ms,
            text=text,
            llm_done=True,
        )
        self._reply = reply
        actions.append(SendTtsText(reply.id, text))
        actions.append(FinishTts(reply.id))
        self._agent("greet")
        self._go_deaf()

    def _on_llm_text(self, event: LlmText, actions: list[Action]) -> None:
        reply = self._current(event.reply_id)
        if reply is None or reply.llm_done or not event.text:
            return
        if reply.first_text_at_ms is None:
            reply.first_text_at_ms = event.at_ms
            actions.append(RecordMetric("llm_first_text_ms", event.at_ms - reply.started_at_ms, reply.id))
        reply.text += event.text
        actions.append(SendTtsText(reply.id, event.text))

    def _on_llm_done(self, event: LlmDone, actions: list[Action]) -> None:
        reply = self._current(event.reply_id)
        if reply is None or reply.llm_done:
            return
        reply.llm_done = True
        actions.append(FinishTts(reply.id))

    def _on_llm_failed(self, event: LlmFailed, actions: list[Action]) -> None:
        reply = self._current(event.reply_id)
        if reply is None or reply.llm_done:
            return
        actions.append(RecordMetric("llm_failures", 1, reply.id))
        if reply.text:  # part of the answer is already being spoken: end it there
            reply.llm_done = True
            actions.append(FinishTts(reply.id))
        elif reply.attempts < self.rules.llm_attempts:
            reply.attempts += 1
            actions.append(StartLlm(reply.id, self._messages(reply.caller_text)))
        else:
            reply.llm_done = True
            reply.kind = "apology"
            reply.text = self.rules.apology
            actions.append(SendTtsText(reply.id, reply.text))
            actions.append(FinishTts(reply.id))

    def _on_tts_audio(self, event: TtsAudio, actions: list[Action]) -> None:
        reply = self._current(event.reply_id)
        if reply is None or not event.ulaw:
            return
        chunk_start = reply.audio_ms
        pieces = _split_at_sentences(event.ulaw, event.alignment)
        if event.alignment:
            reply.aligned.extend(
                (chunk_start + c.start_ms, chunk_start + c.start_ms + c.duration_ms, c.char) for c in event.alignment
            )
        for piece in pieces:
            reply.audio_ms += len(piece) * 1000 / SAMPLE_RATE
            reply.mark_count += 1
            name = f"{reply.id}.{reply.mark_count}"
            reply.marks[name] = _Mark(reply.audio_ms)
            if reply.held:
                reply.held_audio.append((piece, name))
            else:
                self._emit_audio(reply, piece, name, actions)

    def _emit_audio(self, reply: _Reply, ulaw: bytes, mark: str, actions: list[Action]) -> None:
        actions.append(SendMedia(ulaw))
        actions.append(SendMark(mark))
        reply.last_mark_name = mark
        if reply.first_audio_at_ms is None:
            reply.first_audio_at_ms = self._now_ms
            if reply.speech_end_ms is not None:
                actions.append(RecordMetric("reply_latency_ms", self._now_ms - reply.speech_end_ms, reply.id))
            self._agent("first_audio")

    def _on_tts_done(self, reply_id: str, actions: list[Action]) -> None:
        reply = self._current(reply_id)
        if reply is None or reply.tts_done:
            return
        reply.tts_done = True
        if reply.held:
            return  # released (or dropped) at the threshold
        if reply.mark_count == 0 or (reply.played_mark_at_ms is not None and reply.played_ms >= reply.audio_ms):
            self._finish_reply(reply)

    def _on_mark(self, event: MarkPlayed, actions: list[Action]) -> None:
        reply_id, _, _ = event.name.partition(".")
        reply = self._current(reply_id)
        mark = reply.marks.get(event.name) if reply is not None else None
        if reply is None or mark is None:
            return  # a mark of a cleared reply: Twilio echoes them on clear, unplayed
        reply.played_ms = max(reply.played_ms, mark.reply_offset_ms)
        reply.played_mark_at_ms = event.at_ms
        if reply.tts_done and event.name == reply.last_mark_name and not reply.held:
            self._finish_reply(reply)

    def _finish_reply(self, reply: _Reply) -> None:
        self._commit_reply(reply, reply.text if reply.mark_count else "", interrupted=False)
        self._reply = None
        self._listen_again(self._now_ms)
        self._agent("reply_finished")

    def _heard_text(self, reply: _Reply) -> str:
        """What the caller heard of a reply interrupted now: playback position, then text."""
        if reply.first_audio_at_ms is None:
            return ""
        if reply.played_mark_at_ms is not None:
            played = reply.played_ms + (self._now_ms - reply.played_mark_at_ms)
        else:
            played = self._now_ms - reply.first_audio_at_ms
        played = min(played, reply.audio_ms)
        if reply.aligned:
            heard = [char for _, end, char in reply.aligned if end <= played]
            unheard = [char for _, end, char in reply.aligned if end > played]
            spoken, next_char = "".join(heard), (unheard[0] if unheard else "")
        else:
            cut = int(len(reply.text) * played / reply.audio_ms) if reply.audio_ms > 0 else 0
            spoken, next_char = reply.text[:cut], reply.text[cut : cut + 1]
        if next_char and not next_char.isspace() and spoken and not spoken[-1].isspace():
            spoken = spoken.rsplit(" ", 1)[0] if " " in spoken else ""  # no half-heard word
        return spoken.strip()

    def _commit_reply(self, reply: _Reply, heard: str, *, interrupted: bool) -> None:
        if reply.caller_text:
            self.history.append({"role": "user", "content": reply.caller_text})
            self._turns.append({"role": "caller", "text": reply.caller_text, "at_ms": reply.speech_end_ms})
        if heard:
            self.history.append({"role": "assistant", "content": heard})
        latency = (
            reply.first_audio_at_ms - reply.speech_end_ms
            if reply.first_audio_at_ms is not None and reply.speech_end_ms is not None
            else None
        )
        self._turns.append(
            {
                "role": "agent",
                "reply_id": reply.id,
                "kind": reply.kind,
                "text": heard,
                "full_text": reply.text,
                "interrupted": interrupted,
                "at_ms": reply.first_audio_at_ms,
                "reply_latency_ms": latency,
            }
        )
        if latency is not None:
            self._metrics.setdefault("reply_latency_ms", []).append(latency)

    # -- call end -------------------------------------------------------------------------------------

    def _on_end(self, event: CallEnded, actions: list[Action]) -> None:
        reply = self._reply
        if reply is not None:
            self._stop_reply_streams(reply, actions)
            if reply.first_audio_at_ms is not None:
                self._commit_reply(reply, self._heard_text(reply), interrupted=True)
            elif reply.caller_text and not reply.held:  # a held reply's words are still in _segments
                self._turns.append({"role": "caller", "text": reply.caller_text, "at_ms": reply.speech_end_ms})
            self._reply = None
        if _join(self._segments):
            self._turns.append({"role": "caller", "text": _join(self._segments), "at_ms": self._activity_ms})
        self._caller("call_ended")
        self._agent("call_ended")
        actions.append(CloseProviders())
        actions.append(SaveSummary(self.summary(event.reason)))

    def summary(self, end_reason: str | None = None) -> dict[str, Any]:
        """The call's record for the store: turns as heard, transcript and latency figures."""
        transcript = "\n".join(
            f"{'Agent' if turn['role'] == 'agent' else 'Caller'}: {turn['text']}"
            + (" [interrupted]" if turn.get("interrupted") else "")
            for turn in self._turns
            if turn["text"]
        )
        barge_ins = [t for t in self._turns if t.get("interrupted")]
        return {
            "turns": self._turns,
            "turn_count": sum(1 for t in self._turns if t["role"] == "caller"),
            "transcript": transcript,
            "interruptions": len(barge_ins),
            "reply_latency_ms": self._metrics.get("reply_latency_ms", []),
            "barge_in_ms": self._metrics.get("barge_in_ms", []),
            "end_reason": end_reason,
            "duration_ms": self._now_ms,
        }


def _join(segments: list[tuple[int, str]]) -> str:
    return " ".join(text for _, text in segments).strip()


def _split_at_sentences(ulaw: bytes, alignment: list[AlignedChar] | None) -> list[bytes]:
    """Cut a chunk of audio where a sentence ends inside it, so that each sentence gets its mark."""
    if not alignment:
        return [ulaw]
    cuts: list[int] = []
    for char in alignment:
        if char.char in _SENTENCE_ENDS:
            cut = int((char.start_ms + char.duration_ms) * SAMPLE_RATE / 1000)
            if 0 < cut < len(ulaw) - SAMPLE_RATE // 50 and (not cuts or cut > cuts[-1]):
                cuts.append(cut)
    bounds = [0, *cuts, len(ulaw)]
    return [ulaw[a:b] for a, b in itertools.pairwise(bounds)]
