"""The conversation engine: turn-taking for one call, as a pure state machine.

Rules of this file
==================
1. Everything that decides what the agent says and when lives in `core/engine/`. The asyncio code
   around it (`core/call.py`) only moves bytes between sockets and this object.
2. No I/O, no sleeps, no wall clock. Time is `at_ms` on the call's audio clock (Twilio's
   `media.timestamp`), so behaviour is the same on an idle laptop and a loaded server, and every
   rule is tested by feeding events and reading the actions that come back.
3. The machines are tables in `core/engine/machines.py`; this file decides *when* a trigger fires.
   Each rule of DESIGN.md section 2 has one method here, and the method cites its rule.
4. Every timed rule is checked in one place, `_on_clock`, in every state. A deadline is a time on
   the audio clock that `_on_clock` compares with the clock; nothing here owns a timer.

Theory of operation
===================
`handle(event)` advances the audio clock to the event's time, routes the event to its handler, and
returns the actions in the order they must be carried out. Caller audio drives the clock forward:
after each frame, `_on_clock` runs every timed rule.

The caller's words are `_segments` (audio-clock time, text) until the turn ends (rule 1); then they
become a `Reply`'s caller segments and the reply's streams start. A speculative reply (rule 7) is the
same `Reply` with its playback held. When a reply is committed to the history, what enters is what
the caller heard (rule 6), cut by its `Playback` ledger (`core/engine/playback.py`).

Caller speech heard while the agent is THINKING or SPEAKING does not count toward a turn unless it
lasts `barge_in_min_speech_ms` and is not the agent's own echo (`EchoGate`): then playback stops at
once (rule 4) and the agent is STOPPED, its reply alive and its audio kept. A word of the interruption
that is not a backchannel, or `barge_in_confirm_ms` of speech, confirms it: the reply is cancelled and
the interruption opens the next turn. Neither within `resume_window_ms`, and it was a cough or an
"mm-hm": the agent resumes from the start of the word the caller was hearing, and what was said
meanwhile never enters a turn. Anything shorter, and any word Deepgram places while the agent held the
floor, is discarded (rule 5).
"""

from __future__ import annotations

import dataclasses
import json

from core.audio import SAMPLE_RATE, EchoGate, VoiceActivityDetector
from core.config import normalize_word
from core.engine.machines import (
    AGENT_TRANSITIONS,
    CALLER_TRANSITIONS,
    FLUSH_TRANSITIONS,
    PHASE_TRANSITIONS,
    AgentState,
    AgentTrigger,
    CallerState,
    CallerTrigger,
    CallPhase,
    FlushState,
    FlushTrigger,
    Hearing,
    Machine,
    PhaseTrigger,
    StreamsState,
    StreamsTrigger,
)
from core.engine.playback import Reply, ToolRound, join_segments
from core.engine.rules import TurnRules
from core.events import (
    Action,
    CallEnded,
    CallerAudio,
    CallStarted,
    CancelLlm,
    CancelTts,
    ClearPlayback,
    CloseProviders,
    DtmfPressed,
    EndCall,
    Event,
    FinalizeStt,
    FinishTts,
    LlmDone,
    LlmFailed,
    LlmText,
    LlmToolCalls,
    MarkPlayed,
    PlaceMark,
    PlayAudio,
    ProviderFailed,
    ProviderRole,
    RecordMetric,
    RunTool,
    SaveConversation,
    SaveSummary,
    SendToStt,
    SendTtsText,
    StartLlm,
    ToolAnswered,
    Transcript,
    TtsAudio,
    TtsDone,
    TtsFailed,
    Unit,
    UtteranceEnd,
)
from core.records import (
    CallSummary,
    ChatMessage,
    NextStep,
    ReplyKind,
    Role,
    SavedConversation,
    Speaker,
    ToolCall,
    TurnRecord,
)
from core.tools import END_CALL, TRANSFER_CALL, ToolSpec, error_result

_NO_ACTIONS: list[Action] = []
A, C = AgentState, CallerState
# How the agent gives up a reply the caller is not hearing, by the state it is in.
_WITHDRAW_UNHEARD = {
    A.HOLDING: AgentTrigger.CALLER_RESUMED,
    A.THINKING: AgentTrigger.CALLER_INTERRUPTED,
    A.STOPPED: AgentTrigger.CONFIRMED,
}


@dataclasses.dataclass(slots=True)
class _Closing:
    """Why and how the call is closing (the call phase's CLOSING): the outcome for the record, what the
    call does next, the last line still to say (None once said, or when there is no voice to say it),
    and whether a caller who really interrupts calls it off (they are there, and have more to say)."""

    outcome: str
    next: NextStep
    line: str | None
    cancellable: bool
    tool_calls: tuple[str, ...] = ()  # the ids of the tool calls that asked for it
    # The reply being said stops at the end of its sentence (rule 12); otherwise it is said to its end.
    cuts_speech: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class _Stop:
    """A barge-in not yet confirmed (rule 4): when it began, and what the caller had heard by then."""

    onset_ms: int
    heard: str  # the reply's text up to the word being heard
    resume_at_ms: float  # that word's start in the reply's audio
    was_playing: bool  # False when the reply had no audio out yet (THINKING)


class Conversation:
    """One call's turn-taking. Feed `handle(event)`; carry out the actions it returns, in order."""

    def __init__(self, rules: TurnRules | None = None) -> None:
        self.rules = rules or TurnRules.defaults()
        self.caller = Machine("caller", CALLER_TRANSITIONS, CallerState.SILENT)
        self.agent = Machine("agent", AGENT_TRANSITIONS, AgentState.IDLE)
        self.phase = Machine("call phase", PHASE_TRANSITIONS, CallPhase.OPENING)
        self.flush = Machine("STT flush", FLUSH_TRANSITIONS, FlushState.IDLE)
        self.hearing = Hearing()
        self.history: list[ChatMessage] = []
        self.call_sid = ""
        self.stream_sid = ""
        self._vad = VoiceActivityDetector(self.rules.vad)
        self._echo = EchoGate(self.rules.echo)
        self._play_until_ms = 0.0  # when the audio sent so far ends playing, on the audio clock
        self._stop: _Stop | None = None  # while the agent is STOPPED
        self._caller_sounding = False  # the detector hears the caller now
        self._finalize_sent_ms = 0
        self._closing: _Closing | None = None
        self._end_requested = False
        self._agent_done_ms = 0  # when the agent last finished speaking (rule 11 counts from there)
        self._reprompts = 0  # idle reprompts since the caller last said something (rule 11)
        self._elapsed_before_ms = 0  # the call's time in streams before this one (rule 12)
        self._saved_history: list[ChatMessage] = self.history  # the history as last saved
        self._segments: list[tuple[int, str]] = []
        self._activity_ms = 0  # last caller voice, word or key of the open turn
        self._speech_counts = False  # whether the detector's current speech belongs to a turn
        self._last_turn_end_ms = -1
        self._reply: Reply | None = None
        self._reply_count = 0
        self._now_ms = 0
        self._turns: list[TurnRecord] = []
        self._reply_latencies: list[int] = []
        self._barge_ins: list[int] = []
        self._provider_failures: list[str] = []
        self._false_barge_ins = 0

    @property
    def caller_state(self) -> CallerState:
        return self.caller.state

    @property
    def agent_state(self) -> AgentState:
        return self.agent.state

    @property
    def now_ms(self) -> int:
        return self._now_ms

    # -- entry point --------------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if self.phase.state is CallPhase.ENDED:
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
            case LlmToolCalls():
                self._on_tool_calls(event, actions)
            case ToolAnswered():
                self._on_tool_answered(event, actions)
            case TtsDone():
                self._on_voice_done(event.reply_id, actions)
            case TtsFailed():
                self._on_voice_done(event.reply_id, actions, failed=True)
            case LlmFailed():
                self._on_llm_failed(event, actions)
            case DtmfPressed():
                self._on_dtmf(event, actions)
            case ProviderFailed():
                self._on_provider_failed(event, actions)
            case CallStarted():
                self._on_start(event, actions)
            case CallEnded():
                self._on_end(event, actions)
            case UtteranceEnd():
                pass  # the local clock already closes turns; Deepgram's word times extend them
        if self.history is not self._saved_history:
            # Section 2b: the conversation outlives its stream. The history is replaced, never edited,
            # when it changes, so one identity check per event finds a change.
            self._saved_history = self.history
            actions.append(SaveConversation(self.saved()))
        return actions

    def saved(self) -> SavedConversation:
        """What the call's next stream needs to go on from here (DESIGN.md section 2b)."""
        return SavedConversation(tuple(self.history), self._elapsed_before_ms + self._now_ms)

    # -- the clock: every timed rule, in every state ----------------------------------------------------

    def _on_clock(self, now: int, actions: list[Action]) -> None:
        """The audio clock reached `now`: check every rule that waits for a time."""
        stop = self._stop
        if stop is not None:
            # Rule 4: an interruption neither confirmed within the window, nor still going on, was not one.
            window_over = now - stop.onset_ms >= self.rules.resume_window_ms
            turn_over = self.caller.state is C.PAUSED and now - self._activity_ms >= self.rules.silence_threshold_ms
            if window_over or turn_over:
                if self._caller_sounding:
                    self._confirm_barge_in(actions)
                else:
                    self._resume(actions)
        if self.caller.state is C.PAUSED and self._stop is None:
            pause = now - self._activity_ms
            if pause >= self.rules.silence_threshold_ms:
                self._end_turn(now, actions)
            elif pause >= self.rules.speculate_after_ms:
                self._flush_early(now, actions)
                if (
                    self.flush.state is FlushState.PENDING
                    and now - self._finalize_sent_ms >= self.rules.finalize_wait_ms
                ):
                    self.flush.fire(FlushTrigger.GAVE_UP)  # no answer is promised: the words are in as far as we wait
                    actions.append(RecordMetric("FinalizeUnanswered", 1, Unit.COUNT))
                self._consider_speculation(actions, speech_final=False)
        self._check_tool_filler(now, actions)
        self._check_idle(now, actions)
        self._check_duration(now, actions)

    # -- rule 2: speech vs silence, decided locally ---------------------------------------------------

    def _on_audio(self, event: CallerAudio, actions: list[Action]) -> None:
        """Rule 2: the detector decides speech on the caller's audio; every frame also goes to STT."""
        actions.append(SendToStt(event.ulaw))
        now = event.at_ms + len(event.ulaw) * 1000 // SAMPLE_RATE
        self._now_ms = max(self._now_ms, now)
        frame = self._vad.process(event.ulaw, event.at_ms, self._echo)
        self._caller_sounding = frame.speaking
        if frame.started and frame.onset_ms is not None:
            self._on_speech_started(frame.onset_ms, actions)
        if frame.speaking and frame.onset_ms is not None:
            # Voiced time, not the detector's hangover after a short "mm-hm".
            voiced_ms = now - frame.onset_ms if now - (frame.last_voice_ms or now) <= self.rules.barge_in_gap_ms else 0
            if self._speech_counts:
                self._activity_ms = max(self._activity_ms, frame.last_voice_ms or now)
                if self._stop is not None and voiced_ms >= self.rules.barge_in_confirm_ms:
                    self._confirm_barge_in(actions)  # rule 4: long enough to be meant, words or not
            elif voiced_ms >= self.rules.barge_in_min_speech_ms and self._interruptible():
                self._barge_in(frame.onset_ms, actions)
        if frame.ended and self._speech_counts:
            self._speech_counts = False
            self._activity_ms = max(self._activity_ms, frame.last_voice_ms or now)
            self.caller.fire(CallerTrigger.SPEECH_ENDED)
        self._on_clock(now, actions)

    def _on_speech_started(self, onset_ms: int, actions: list[Action]) -> None:
        if self.agent.state in (A.THINKING, A.SPEAKING):
            return  # it counts only if it lasts long enough to interrupt (checked per frame)
        # While HOLDING, the sound extends the turn but the held reply stays: only new words make it
        # answer less than the caller said (`_add_words`). A cough costs no second model request.
        self._open_speech(onset_ms)

    def _open_speech(self, onset_ms: int) -> None:
        if self.caller.state is C.SILENT:
            self._segments = []
        self._speech_counts = True
        self.flush.fire(FlushTrigger.RESET)
        self._activity_ms = max(self._activity_ms, onset_ms)
        if self.caller.state is not C.SPEAKING:
            self.caller.fire(CallerTrigger.SPEECH_STARTED)

    # -- rule 1: caller turns ------------------------------------------------------------------------

    def _on_transcript(self, event: Transcript, actions: list[Action]) -> None:
        if event.from_finalize and self.flush.state is FlushState.PENDING:
            self.flush.fire(FlushTrigger.FLUSHED)
        if not event.is_final:
            return
        words = [w for w in event.words if self.hearing.hears(w.start_ms)]  # rule 5
        if event.words:
            text = " ".join(w.text for w in words)
            start_ms = words[0].start_ms if words else event.start_ms
            end_ms = words[-1].end_ms if words else event.end_ms
        else:
            text = event.text.strip() if self.hearing.hears(event.start_ms) else ""
            start_ms, end_ms = event.start_ms, event.end_ms
        if text:
            self._add_words(start_ms, end_ms, text, actions)
            if self._stop is not None and any(
                normalize_word(word) not in self.rules.backchannel_words for word in text.split()
            ):
                self._confirm_barge_in(actions)  # rule 4: a word of it that is not a backchannel
        if event.speech_final:
            self._consider_speculation(actions, speech_final=True)

    def _add_words(self, start_ms: int, end_ms: int, text: str, actions: list[Action]) -> None:
        """Rule 1: final words join the open turn; late words of a closed turn join the reply to it."""
        reply = self._reply
        if start_ms < self._last_turn_end_ms and self.caller.state is C.SILENT and reply is not None:
            # Late words of the turn the current reply answers (Deepgram was slow to finalize them).
            if reply.caller_segments and reply.playback.first_audio_at_ms is None:
                # Nothing heard yet: answer the whole turn instead (an apology gets another try, too).
                self._withdraw(reply, AgentTrigger.CALLER_INTERRUPTED, actions)
                self._start_reply([*reply.caller_segments, (start_ms, text)], reply.speech_end_ms, actions)
                return
            if reply.caller_segments:
                reply.caller_segments.append((start_ms, text))  # on the record; the model heard less
                return
        if (
            reply is not None
            and not reply.caller_segments
            and start_ms < reply.started_at_ms
            and self.agent.state in (A.THINKING, A.SPEAKING)
            and self._interruptible()
        ):
            # Words said before the agent began a line of its own (a reprompt, the idle goodbye), and
            # transcribed after: the caller was there. The line gives way as to a barge-in (rule 4).
            self._barge_in(start_ms, actions, by_voice=False)
            self._confirm_barge_in(actions)
        if self.agent.state is A.HOLDING:
            self._drop_speculation(actions)  # it answered less than the caller has now said
        if self.caller.state is C.SILENT:
            self._segments = []
        self._reprompts = 0  # rule 11: the caller is there
        self._segments.append((start_ms, text))
        self._segments.sort(key=lambda segment: segment[0])
        self._activity_ms = max(self._activity_ms, end_ms)
        self.caller.fire(CallerTrigger.WORDS_HEARD)

    def _flush_early(self, now: int, actions: list[Action]) -> None:
        """Rule 1's `Finalize`, sent at the speculation pause so the words are in before the threshold."""
        if self.flush.state is FlushState.IDLE:
            actions.append(FinalizeStt())
            self.flush.fire(FlushTrigger.FINALIZE_SENT)
            self._finalize_sent_ms = now

    def _end_turn(self, now: int, actions: list[Action]) -> None:
        """Rule 1: a pause reached the silence threshold; the turn's words go to the model (or the held
        reply to them goes out, rule 7). A turn with no words sends nothing."""
        if self.flush.state is FlushState.IDLE:
            actions.append(FinalizeStt())
        segments, self._segments = self._segments, []
        self.caller.fire(CallerTrigger.TURN_ENDED)
        self._last_turn_end_ms = now
        self.flush.fire(FlushTrigger.RESET)
        reply = self._reply
        if self.agent.state is A.HOLDING and reply is not None:
            if reply.caller_text == join_segments(segments):
                self._release(reply, actions)
                return
            self._drop_speculation(actions)
        if join_segments(segments) and self.phase.state is CallPhase.CONVERSING:
            self._start_reply(segments, self._activity_ms, actions)

    # -- rule 7: speculation ---------------------------------------------------------------------------

    def _consider_speculation(self, actions: list[Action], *, speech_final: bool) -> None:
        """Rule 7: once the caller pauses (Deepgram's `speech_final`, or the local pause with every word
        flushed), start the reply on the words so far, its audio held back."""
        if self.caller.state is not C.PAUSED or self.agent.state is not A.IDLE:
            return
        if self.phase.state is not CallPhase.CONVERSING:
            return
        if not speech_final and self.flush.state is not FlushState.FLUSHED:
            return
        if join_segments(self._segments):
            self._start_reply(self._segments, self._activity_ms, actions, held=True)

    def _drop_speculation(self, actions: list[Action]) -> None:
        """Rule 7: the caller went on; the held reply answered less than they have now said."""
        reply = self._reply
        assert reply is not None, "dropping a speculation with no held reply"
        self._withdraw(reply, AgentTrigger.CALLER_RESUMED, actions)

    def _release(self, reply: Reply, actions: list[Action]) -> None:
        """Rule 7: the pause reached the threshold: the held reply goes out now."""
        reply.speech_end_ms = self._activity_ms
        self.agent.fire(AgentTrigger.RELEASE)
        self._take_floor()
        for ulaw, mark in reply.playback.release():
            self._play(reply, ulaw, mark, actions)
        if reply.parked_calls:  # asked for while held: the turn is over, so now they may run
            calls, reply.parked_calls = reply.parked_calls, ()
            self._act_on_tool_calls(reply, calls, actions)
        self._finish_if_heard_out(reply, actions)

    # -- rule 4: barge-in ------------------------------------------------------------------------------

    def _barge_in(self, onset_ms: int, actions: list[Action], *, by_voice: bool = True) -> None:
        """Rule 4: caller speech (or a key) while the agent is about to speak or speaking: stop playback
        now, in this step, and keep the reply until the interruption is confirmed or dismissed. The
        interrupting speech opens the next turn."""
        reply = self._reply
        if self.agent.state in (A.SPEAKING, A.THINKING) and reply is not None:
            was_playing = self.agent.state is A.SPEAKING
            if was_playing:
                self._clear_playback(actions)
                latency = self._now_ms - onset_ms
                actions.append(RecordMetric("BargeIn", latency, Unit.MILLISECONDS, reply.id))
                self._barge_ins.append(latency)
            heard = reply.playback.heard_text(reply.text, self._now_ms)
            resume_at = reply.playback.stop(reply.text, self._now_ms)
            self._stop = _Stop(onset_ms, heard, resume_at, was_playing)
            self.agent.fire(AgentTrigger.BARGE_IN)
        self.hearing.listen_again(onset_ms - self.rules.word_slack_ms)
        if by_voice:
            self._open_speech(onset_ms)

    def _confirm_barge_in(self, actions: list[Action]) -> None:
        """Rule 4: the interruption was meant. The reply's model and voice are closed, the history keeps
        what the caller heard, and the interruption goes on as the caller's turn."""
        reply, stop = self._reply, self._stop
        assert reply is not None and stop is not None, "confirming with no stopped reply"
        self._stop = None
        if self.phase.state is CallPhase.CLOSING:
            self._call_off_closing(reply)
        if stop.was_playing or reply.rounds:  # a tool call is not undone by a barge-in (section 2b)
            self._commit_reply(reply, stop.heard if stop.was_playing else "", interrupted=True)
        else:
            # Nothing was heard: the caller is still in the turn the reply was answering.
            self._segments = [*reply.caller_segments, *self._segments]
        self._withdraw(reply, AgentTrigger.CONFIRMED, actions)
        actions.append(RecordMetric("BargeInConfirmed", 1, Unit.COUNT, reply.id))

    def _resume(self, actions: list[Action]) -> None:
        """Rule 4: no word and not long enough: a cough, a click, a breath or an "mm-hm". The agent goes on
        from the start of the word the caller was hearing; what was said meanwhile is dropped (rule 5)."""
        reply, stop = self._reply, self._stop
        assert reply is not None and stop is not None, "resuming with no stopped reply"
        self._stop = None
        self._segments = []
        self._speech_counts = False
        self.flush.fire(FlushTrigger.RESET)
        self.caller.fire(CallerTrigger.SOUND_DISMISSED)
        self.hearing.agent_resumed()
        self._false_barge_ins += 1
        actions.append(RecordMetric("FalseBargeIn", 1, Unit.COUNT, reply.id))
        if stop.was_playing:
            actions.append(RecordMetric("ResumeDelay", self._now_ms - stop.onset_ms, Unit.MILLISECONDS, reply.id))
            self.agent.fire(AgentTrigger.RESUME)
            pieces = reply.playback.resume_from(stop.resume_at_ms, self._now_ms)
        else:
            self.agent.fire(AgentTrigger.RESUME_BEFORE_AUDIO)
            pieces = reply.playback.release()
        for ulaw, mark in pieces:
            self._play(reply, ulaw, mark, actions)
        self._finish_if_heard_out(reply, actions)

    # -- rule 5: what the agent does not hear while it holds the floor -----------------------------------

    def _take_floor(self) -> None:
        """Rule 5: the agent takes the floor; words the caller says from now on are discarded unless
        they turn into a barge-in."""
        self.hearing.agent_took_floor(self._now_ms)

    # -- rule 9: DTMF ----------------------------------------------------------------------------------

    def _on_dtmf(self, event: DtmfPressed, actions: list[Action]) -> None:
        """Rule 9: a key is part of the caller's turn, and interrupts the agent at once (rule 4)."""
        if self.agent.state in (A.THINKING, A.SPEAKING):
            self._barge_in(event.at_ms, actions, by_voice=False)
        if self._stop is not None:
            self._confirm_barge_in(actions)  # a key press is deliberate: confirmed at once
        elif self.agent.state is A.HOLDING:
            self._drop_speculation(actions)
        if self.caller.state is C.SILENT:
            self._segments = []
        self._segments.append((event.at_ms, f"(pressed {event.digit})"))
        self._activity_ms = max(self._activity_ms, event.at_ms)
        self.flush.fire(FlushTrigger.RESET)
        self.caller.fire(CallerTrigger.KEY_PRESSED)

    # -- the agent's replies ---------------------------------------------------------------------------

    def _next_reply_id(self) -> str:
        self._reply_count += 1
        return f"r{self._reply_count}"

    def _messages(self, caller_text: str) -> tuple[ChatMessage, ...]:
        history = _joined(self.history, Role.USER, caller_text) if caller_text else self.history
        return (ChatMessage(Role.SYSTEM, self.rules.system_prompt), *history)

    def _reply_messages(self, reply: Reply) -> tuple[ChatMessage, ...]:
        """What the model is sent for `reply`: the history, the caller's turn (or why the agent speaks
        first), and the reply's tool rounds."""
        note = (ChatMessage(Role.SYSTEM, reply.note),) if reply.note else ()
        # What was said after the last tool call (a filler) is not the model's: its next round follows the
        # results directly, as OpenAI expects.
        written = reply.text[: reply.rounds[-1].text_at] if reply.rounds else reply.text
        return (*self._messages(reply.caller_text), *note, *reply.messages_after(written))

    def _offered_tools(self, reply: Reply) -> tuple[ToolSpec, ...]:
        """Every tool, until the reply has used its rounds: then the model must answer in words."""
        return self.rules.tools if len(reply.rounds) < self.rules.max_tool_rounds else ()

    def _start_reply(
        self, segments: list[tuple[int, str]], speech_end_ms: int | None, actions: list[Action], *, held: bool = False
    ) -> Reply:
        reply = Reply.create(
            self._next_reply_id(),
            ReplyKind.ANSWER,
            caller_segments=segments,
            speech_end_ms=speech_end_ms,
            now_ms=self._now_ms,
            held=held,
        )
        self._reply = reply
        actions.append(StartLlm(reply.id, self._messages(reply.caller_text), self.rules.tools))
        self.agent.fire(AgentTrigger.SPECULATE if held else AgentTrigger.ANSWER)
        if not held:
            self._take_floor()
        return reply

    def _stop_streams(self, reply: Reply, actions: list[Action]) -> None:
        """Close whatever of the reply's model and voice streams is still open."""
        state = reply.streams.state
        if state is StreamsState.WRITING:
            actions.append(CancelLlm(reply.id))
        if state in (StreamsState.WRITING, StreamsState.AWAITING_TOOLS, StreamsState.VOICING):
            actions.append(CancelTts(reply.id))
            reply.streams.fire(StreamsTrigger.CANCEL)

    def _withdraw(self, reply: Reply, trigger: AgentTrigger, actions: list[Action]) -> None:
        """The reply will not be heard (any more): close its streams and give the floor back."""
        self._stop_streams(reply, actions)
        self._reply = None
        self.agent.fire(trigger)

    def _current(self, reply_id: str) -> Reply | None:
        reply = self._reply
        return reply if reply is not None and reply.id == reply_id else None

    def _on_start(self, event: CallStarted, actions: list[Action]) -> None:
        self.call_sid, self.stream_sid = event.call_sid, event.stream_sid
        self.phase.fire(PhaseTrigger.ANSWERED)
        resume = event.parameters.get("resume")
        if resume:
            self._resume_call(resume, event.restored, actions)
        elif self.rules.greeting.strip():
            self._greet(actions)

    def _resume_call(self, reason: str, restored: SavedConversation | None, actions: list[Action]) -> None:
        """Section 2b: a new stream of a call that had one. The conversation goes on from where it was
        saved, and the agent speaks first: the resume line after a lost stream, or, back from a transfer
        nobody answered, its own words, told why it is back."""
        if restored is not None:
            self.history = list(restored.history)
            self._saved_history = self.history
            self._elapsed_before_ms = restored.elapsed_ms
        actions.append(RecordMetric("StreamsRestored", 1, Unit.COUNT))
        if reason.startswith("transfer-failed"):
            status = reason.partition(":")[2] or "failed"
            note = (
                f"You tried to transfer the caller, but the transfer did not connect ({status}). The caller "
                "is back with you now: tell them briefly and carry on helping them."
            )
            reply = Reply.create(
                self._next_reply_id(), ReplyKind.ANSWER, caller_segments=[], speech_end_ms=None, now_ms=self._now_ms
            )
            reply.note = note
            self._reply = reply
            actions.append(StartLlm(reply.id, self._reply_messages(reply), self.rules.tools))
            self.agent.fire(AgentTrigger.ANSWER)
            self._take_floor()
        else:
            self._say(self.rules.resume_line, ReplyKind.GREETING, actions)

    def _greet(self, actions: list[Action]) -> None:
        """Rule 8: on `start` of an inbound call the agent speaks the greeting, interruptible like any reply."""
        self._say(self.rules.greeting, ReplyKind.GREETING, actions)

    def _say(self, text: str, kind: ReplyKind, actions: list[Action]) -> None:
        """A reply whose words are known (no model): the greeting, an apology, the goodbye."""
        reply = Reply.create(
            self._next_reply_id(), kind, caller_segments=[], speech_end_ms=None, now_ms=self._now_ms, text=text
        )
        self._reply = reply
        actions.append(SendTtsText(reply.id, text))
        actions.append(FinishTts(reply.id))
        self.agent.fire(AgentTrigger.SAY)
        self._take_floor()

    def _on_llm_text(self, event: LlmText, actions: list[Action]) -> None:
        reply = self._current(event.reply_id)
        if reply is None or not reply.writing or not event.text:
            return
        if reply.first_text_at_ms is None:
            reply.first_text_at_ms = event.at_ms
            actions.append(RecordMetric("LlmFirstText", event.at_ms - reply.started_at_ms, Unit.MILLISECONDS, reply.id))
        reply.text += event.text
        actions.append(SendTtsText(reply.id, event.text))

    def _on_llm_done(self, event: LlmDone, actions: list[Action]) -> None:
        reply = self._current(event.reply_id)
        if reply is None or not reply.writing:
            return
        if event.finish_reason == "content_filter" and not reply.text.strip():
            # Section 6: the model refused before saying anything; the caller hears the apology, not silence.
            actions.append(RecordMetric("LlmRefused", 1, Unit.COUNT, reply.id))
            self._apologise(reply, actions)
            return
        reply.streams.fire(StreamsTrigger.TEXT_DONE)
        if event.finish_reason == "length":
            # Out of tokens mid-answer: end at the last whole sentence rather than mid-word.
            actions.append(RecordMetric("LlmTruncated", 1, Unit.COUNT, reply.id))
            reply.text = _through_last_sentence(reply.text)
            actions.append(FinishTts(reply.id, drop_unfinished=True))
        else:
            actions.append(FinishTts(reply.id))

    def _on_llm_failed(self, event: LlmFailed, actions: list[Action]) -> None:
        """Section 6: a model error is retried once, then the agent apologises; never silence."""
        reply = self._current(event.reply_id)
        if reply is None or not reply.writing:
            return
        actions.append(RecordMetric("LlmFailures", 1, Unit.COUNT, reply.id))
        if reply.text:  # part of the answer is already being spoken: end it there
            reply.streams.fire(StreamsTrigger.TEXT_DONE)
            actions.append(FinishTts(reply.id))
        elif reply.attempts < self.rules.llm_attempts:
            reply.attempts += 1
            actions.append(StartLlm(reply.id, self._reply_messages(reply), self._offered_tools(reply)))
        else:
            self._apologise(reply, actions)

    def _apologise(self, reply: Reply, actions: list[Action]) -> None:
        """The model will not answer this turn: the reply becomes the apology (section 6)."""
        reply.streams.fire(StreamsTrigger.TEXT_DONE)
        reply.kind = ReplyKind.APOLOGY
        reply.text = self.rules.apology
        actions.append(SendTtsText(reply.id, reply.text))
        actions.append(FinishTts(reply.id))

    def _on_tts_audio(self, event: TtsAudio, actions: list[Action]) -> None:
        reply = self._current(event.reply_id)
        if reply is None or not event.ulaw:
            return
        for ulaw, mark in reply.playback.add_audio(event.ulaw, event.alignment):
            self._play(reply, ulaw, mark, actions)

    def _play(self, reply: Reply, ulaw: bytes, mark: str, actions: list[Action]) -> None:
        """Rule 3: every piece of audio goes out followed by its mark."""
        actions.append(PlayAudio(ulaw))
        actions.append(PlaceMark(mark))
        plays_at = max(self._play_until_ms, self._now_ms)
        self._echo.played(ulaw, plays_at)
        self._play_until_ms = plays_at + len(ulaw) * 1000 / SAMPLE_RATE
        if reply.playback.sent(mark, ulaw, plays_at, self._now_ms):
            if reply.speech_end_ms is not None:
                latency = self._now_ms - reply.speech_end_ms
                actions.append(RecordMetric("ReplyLatency", latency, Unit.MILLISECONDS, reply.id))
            self.agent.fire(AgentTrigger.FIRST_AUDIO)

    def _on_voice_done(self, reply_id: str, actions: list[Action], *, failed: bool = False) -> None:
        reply = self._current(reply_id)
        if reply is None or reply.streams.state not in (StreamsState.WRITING, StreamsState.VOICING):
            return
        if reply.writing:  # the voice failed while the model wrote: nothing will speak its text
            actions.append(CancelLlm(reply.id))
        reply.streams.fire(StreamsTrigger.VOICE_DONE)
        unheard = failed and not reply.playback.has_audio and self.agent.state is not A.HOLDING
        self._finish_if_heard_out(reply, actions)
        if (
            unheard
            and self._reply is None
            and self.phase.state is CallPhase.CONVERSING
            and reply.kind is not ReplyKind.APOLOGY
        ):
            # Section 6: never silence. Its context failed; a new one may not (the socket reconnects).
            actions.append(RecordMetric("TtsFailures", 1, Unit.COUNT, reply.id))
            self._say(self.rules.apology, ReplyKind.APOLOGY, actions)

    def _on_mark(self, event: MarkPlayed, actions: list[Action]) -> None:
        """Rule 3: the agent speaks until Twilio echoes the reply's last mark. Marks of a cleared reply
        (Twilio echoes them all on clear) name a reply that is no longer current and count for nothing."""
        reply_id, _, _ = event.name.partition(".")
        reply = self._current(reply_id)
        if reply is not None and reply.playback.mark_played(event.name, event.at_ms):
            if event.name == reply.last_mark and not reply.heard_out:
                self._cut_at_mark(reply, actions)
            else:
                self._finish_if_heard_out(reply, actions)

    def _finish_if_heard_out(self, reply: Reply, actions: list[Action]) -> None:
        """Rule 3, the one place a reply finishes: its voice is done and its last mark was played."""
        if reply.heard_out:
            self._reply_finished(reply, reply.text if reply.playback.has_audio else "", actions, interrupted=False)

    def _reply_finished(self, reply: Reply, heard: str, actions: list[Action], *, interrupted: bool) -> None:
        """The reply is over as the caller heard it: into the history, the floor back to the caller, and,
        when the call is closing, on to its next step."""
        self._commit_reply(reply, heard, interrupted=interrupted)
        self._reply = None
        self._agent_done_ms = self._now_ms
        self.hearing.listen_again(self._now_ms)
        self.agent.fire(AgentTrigger.REPLY_FINISHED)
        if self.phase.state is CallPhase.CLOSING:
            self._close(actions)

    def _clear_playback(self, actions: list[Action]) -> None:
        """Twilio drops what is queued for the caller; nothing sent before now plays any more."""
        actions.append(ClearPlayback())
        self._play_until_ms = self._now_ms
        self._echo.cleared(self._now_ms)

    # -- rule 6: what the caller heard enters the history --------------------------------------------------

    def _commit_reply(self, reply: Reply, heard: str, *, interrupted: bool) -> None:
        """Rule 6: the history keeps what the caller heard. A caller turn answered by nothing heard is
        joined to the next one, and a line of the agent's with no caller turn before it (a goodbye after
        the greeting) to the one before, so caller and agent messages alternate."""
        caller_text = reply.caller_text
        if caller_text:
            self.history = _joined(self.history, Role.USER, caller_text)
            self._turns.append(TurnRecord(Speaker.CALLER, caller_text, reply.speech_end_ms))
        if reply.rounds:  # section 2b: each tool call, then its result (pending until it comes)
            for message in reply.messages_after(heard):
                self.history = (
                    _joined(self.history, message.role, message.content)
                    if message.role is Role.ASSISTANT and not message.tool_calls
                    else [*self.history, message]
                )
        elif heard:
            self.history = _joined(self.history, Role.ASSISTANT, heard)
        first_audio = reply.playback.first_audio_at_ms
        latency = (
            first_audio - reply.speech_end_ms if first_audio is not None and reply.speech_end_ms is not None else None
        )
        self._turns.append(
            TurnRecord(
                Speaker.AGENT,
                heard,
                first_audio,
                reply_id=reply.id,
                kind=reply.kind,
                full_text=reply.text,
                interrupted=interrupted,
                reply_latency_ms=latency,
                tools=tuple(use for tool_round in reply.rounds for use in tool_round.uses()),
            )
        )
        if latency is not None:
            self._reply_latencies.append(latency)

    # -- section 6: a provider fails for good --------------------------------------------------------------

    def _on_provider_failed(self, event: ProviderFailed, actions: list[Action]) -> None:
        """Section 6: a provider that failed for good is never silence. A dead speech-to-text ends the call
        after a goodbye the caller hears whole (or transfers it to the `fallback` destination, when there
        is one); a dead voice ends or transfers it at once (it can say nothing more); a model that refuses
        is apologised for reply by reply (`_on_llm_failed`)."""
        failure = f"{event.role.value}: {event.reason}"
        if failure in self._provider_failures:
            return
        self._provider_failures.append(failure)
        actions.append(RecordMetric("ProviderFailures", 1, Unit.COUNT))
        if event.role is ProviderRole.CHAT or self.phase.state is not CallPhase.CONVERSING:
            return
        fallback = self.rules.transfer_destinations.get("fallback")
        if fallback is not None:
            next_step = NextStep("transfer", "fallback", fallback, f"The agent's {failure}")
            line = self.rules.cannot_hear_transfer
        else:
            next_step, line = NextStep("hangup"), self.rules.cannot_hear_goodbye
        voiceless = event.role is ProviderRole.TTS  # there is no voice left to say the line with
        self._begin_closing(_Closing("provider_failure", next_step, None if voiceless else line, False), actions)

    # -- the call phase: every way a call ends goes through CLOSING (section 2) ----------------------------

    def _interruptible(self) -> bool:
        """Rule 4 holds while conversing, and during a closing the caller may call off."""
        closing = self._closing
        return self.phase.state is CallPhase.CONVERSING or (
            self.phase.state is CallPhase.CLOSING and closing is not None and closing.cancellable
        )

    def _begin_closing(self, closing: _Closing, actions: list[Action], *, keep: Reply | None = None) -> None:
        """CLOSING: a reply not heard yet is given up (`keep` is the closing's own announcement), the one
        being heard is said to its end (or to the end of its sentence, at the duration cap), then the
        closing line, then the call's end."""
        self._closing = closing
        self.phase.fire(PhaseTrigger.CLOSE)
        reply, withdraw = self._reply, _WITHDRAW_UNHEARD.get(self.agent.state)
        if reply is not None and reply is not keep:
            if withdraw is not None:  # held, not playing yet, or stopped: never finished
                if self._stop is not None and self._stop.was_playing:
                    self._commit_reply(reply, self._stop.heard, interrupted=True)
                elif reply.rounds:
                    self._commit_reply(reply, "", interrupted=True)
                self._stop = None
                self._withdraw(reply, withdraw, actions)
            elif closing.cuts_speech:
                self._end_at_sentence(reply, actions)
        if self.agent.state is A.IDLE:
            self._close(actions)

    def _end_at_sentence(self, reply: Reply, actions: list[Action]) -> None:
        """Rule 12: the reply stops being written, and the caller hears the sentence being said and no
        more: playback is cleared when the mark that ends it is played (`_on_mark`)."""
        if reply.writing:
            actions.append(CancelLlm(reply.id))
        if reply.writing or reply.awaiting_tools:
            reply.streams.fire(StreamsTrigger.TEXT_DONE)
            reply.text = _through_last_sentence(reply.text)
            actions.append(FinishTts(reply.id, drop_unfinished=True))
        if self.agent.state is A.SPEAKING:
            reply.last_mark = reply.playback.mark_ending_what_plays(self._now_ms)
            if reply.last_mark is None:  # between two sentences: it has been said
                self._cut_at_mark(reply, actions)

    def _cut_at_mark(self, reply: Reply, actions: list[Action]) -> None:
        """The sentence that was playing has been heard: what is queued after it is dropped, and the
        reply ends there, as heard."""
        self._clear_playback(actions)
        self._stop_streams(reply, actions)
        heard = reply.playback.heard_text(reply.text, self._now_ms)
        self._reply_finished(reply, heard, actions, interrupted=True)

    def _close(self, actions: list[Action]) -> None:
        """CLOSING, the agent silent: say the last line, or, once it was heard, end the call."""
        closing = self._closing
        assert closing is not None, "closing with no reason to"
        if closing.line is not None:
            line, closing.line = closing.line, None
            self._say(line, ReplyKind.GOODBYE, actions)
        elif not self._end_requested:
            self._end_requested = True
            actions.append(EndCall(closing.outcome, closing.next))

    def _call_off_closing(self, reply: Reply) -> None:
        """The caller really interrupted the goodbye: they are there, the call goes on (section 2)."""
        closing = self._closing
        assert closing is not None, "calling off no closing"
        self._closing = None
        self.phase.fire(PhaseTrigger.CALLED_OFF)
        for call_id in closing.tool_calls:
            tool_round = reply.round_of(call_id)
            if tool_round is not None:
                tool_round.results[call_id] = error_result("not done: the caller interrupted; the call goes on")

    # -- rule 11: an idle caller; rule 12: the longest call --------------------------------------------

    def _check_idle(self, now: int, actions: list[Action]) -> None:
        """Rule 11: the agent has finished and the caller says nothing: reprompt, then say goodbye."""
        if (
            self.phase.state is not CallPhase.CONVERSING
            or self.agent.state is not A.IDLE
            or self.caller.state is not C.SILENT
            or self._caller_sounding
        ):
            return
        if now - max(self._agent_done_ms, self._activity_ms) < self.rules.idle_reprompt_ms:
            return
        if self._reprompts < self.rules.idle_max_reprompts:
            self._reprompts += 1
            self._say(self.rules.idle_reprompt, ReplyKind.REPROMPT, actions)
        else:
            self._begin_closing(_Closing("idle_hangup", NextStep("hangup"), self.rules.goodbye, True), actions)

    def _check_duration(self, now: int, actions: list[Action]) -> None:
        """Rule 12: at the cap the agent finishes its sentence, says goodbye and ends the call."""
        if self.phase.state is CallPhase.CONVERSING and self._elapsed_before_ms + now >= self.rules.max_call_ms:
            actions.append(RecordMetric("CallsAtDurationCap", 1, Unit.COUNT))
            closing = _Closing("max_duration", NextStep("hangup"), self.rules.goodbye, False, cuts_speech=True)
            self._begin_closing(closing, actions)

    # -- section 2b: tools ---------------------------------------------------------------------------------

    def _on_tool_calls(self, event: LlmToolCalls, actions: list[Action]) -> None:
        """The model's stream ended asking for tools. A held reply (rule 7) runs nothing until released:
        the caller may not have finished, and a tool may act on the world."""
        reply = self._current(event.reply_id)
        if reply is None or not reply.writing or not event.calls:
            return
        if reply.playback.held and self.agent.state is A.HOLDING:
            reply.parked_calls = event.calls
            return
        self._act_on_tool_calls(reply, event.calls, actions)

    def _act_on_tool_calls(self, reply: Reply, calls: tuple[ToolCall, ...], actions: list[Action]) -> None:
        tool_round = ToolRound(len(reply.text), calls, self._now_ms)
        reply.rounds.append(tool_round)
        http_tools = {tool.name for tool in self.rules.tools if tool.url is not None}
        closing: _Closing | None = None
        for call in calls:
            if call.name in (END_CALL, TRANSFER_CALL) and closing is None:
                closing, tool_round.results[call.id] = self._closing_for(call)
            elif call.name not in http_tools:
                tool_round.results[call.id] = error_result(f"there is no tool named {call.name!r}")
        actions.append(RecordMetric("ToolCalls", len(calls), Unit.COUNT, reply.id))
        if closing is not None:
            for call in calls:
                tool_round.results.setdefault(call.id, error_result("not run: the call is ending"))
            reply.streams.fire(StreamsTrigger.TEXT_DONE)
            if not reply.text.strip() and closing.line is not None:
                reply.text = closing.line  # the model said nothing before acting: the agent's own words
                actions.append(SendTtsText(reply.id, closing.line))
            closing.line = None  # this reply is the last line
            actions.append(FinishTts(reply.id))
            self._begin_closing(closing, actions, keep=reply)
            return
        waiting = [call for call in calls if call.id not in tool_round.results]
        if waiting:
            reply.streams.fire(StreamsTrigger.TOOLS_CALLED)
            actions.extend(RunTool(call) for call in waiting)
        else:
            self._next_round(reply, actions)

    def _next_round(self, reply: Reply, actions: list[Action]) -> None:
        """Every result of the round is in: the model goes on with them, in the same reply and voice."""
        if reply.text and not reply.text[-1].isspace():
            reply.text += " "  # the next round's words are a new sentence, not glued to the last
            actions.append(SendTtsText(reply.id, " "))
        actions.append(StartLlm(reply.id, self._reply_messages(reply), self._offered_tools(reply)))

    def _closing_for(self, call: ToolCall) -> tuple[_Closing | None, str]:
        """A built-in tool's closing (None when its arguments are wrong), and its result for the model."""
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            return None, error_result("the arguments were not a JSON object; call the tool again")
        if call.name == END_CALL:
            closing = _Closing("completed_by_agent", NextStep("hangup"), self.rules.goodbye, True, (call.id,))
            return closing, json.dumps({"ok": True, "note": "the call ends after your goodbye"})
        destination, summary = arguments.get("destination"), str(arguments.get("summary", ""))
        number = self.rules.transfer_destinations.get(destination) if isinstance(destination, str) else None
        if number is None:
            known = ", ".join(sorted(self.rules.transfer_destinations)) or "none"
            return None, error_result(f"there is no destination named {destination!r}; the destinations are: {known}")
        assert isinstance(destination, str)
        next_step = NextStep("transfer", destination, number, summary)
        closing = _Closing("transferred", next_step, self.rules.transfer_line, True, (call.id,))
        return closing, json.dumps({"ok": True, "note": f"transferring to {destination} after your announcement"})

    def _on_tool_answered(self, event: ToolAnswered, actions: list[Action]) -> None:
        """An HTTP tool answered. Its reply goes on when every call of the round is in; a result that
        comes after the reply was given up still enters the history (a barge-in does not undo a tool)."""
        reply = self._reply
        tool_round = reply.round_of(event.call_id) if reply is not None else None
        if reply is not None and tool_round is not None:
            tool_round.results[event.call_id] = event.result
            if reply.awaiting_tools and tool_round is reply.rounds[-1] and tool_round.answered:
                reply.streams.fire(StreamsTrigger.RESULTS_IN)
                self._next_round(reply, actions)
            return
        self.history = [
            dataclasses.replace(message, content=event.result) if message.tool_call_id == event.call_id else message
            for message in self.history
        ]
        self._turns = [
            dataclasses.replace(
                turn,
                tools=tuple(
                    dataclasses.replace(use, result=event.result) if use.call_id == event.call_id else use
                    for use in turn.tools
                ),
            )
            if turn.tools
            else turn
            for turn in self._turns
        ]

    def _check_tool_filler(self, now: int, actions: list[Action]) -> None:
        """Section 2b: a tool slower than `tool_filler_ms`, and nothing playing: "One moment." """
        reply = self._reply
        if reply is None or not reply.awaiting_tools or self._stop is not None or reply.playback.held:
            return
        tool_round = reply.rounds[-1]
        if tool_round.filler_said or now - tool_round.asked_at_ms < self.rules.tool_filler_ms:
            return
        if self._play_until_ms > now:
            return  # what it said before asking still plays: the line is not silent
        tool_round.filler_said = True
        filler = f" {self.rules.tool_filler}" if reply.text and not reply.text[-1].isspace() else self.rules.tool_filler
        reply.text += filler
        actions.append(SendTtsText(reply.id, filler))
        actions.append(RecordMetric("ToolFillers", 1, Unit.COUNT, reply.id))

    # -- rule 10: call end -----------------------------------------------------------------------------

    def _on_end(self, event: CallEnded, actions: list[Action]) -> None:
        """Rule 10: everything is cancelled and closed, and the call's summary is saved."""
        reply, stop = self._reply, self._stop
        if reply is not None:
            self._stop_streams(reply, actions)
            if stop is not None and stop.was_playing:
                self._commit_reply(reply, stop.heard, interrupted=True)
            elif reply.playback.first_audio_at_ms is not None or reply.rounds:
                self._commit_reply(reply, reply.playback.heard_text(reply.text, self._now_ms), interrupted=True)
            elif reply.caller_text and self.agent.state is not A.HOLDING:  # a held reply's words are in _segments
                self._turns.append(TurnRecord(Speaker.CALLER, reply.caller_text, reply.speech_end_ms))
            self._reply, self._stop = None, None
        if join_segments(self._segments):
            self._turns.append(TurnRecord(Speaker.CALLER, join_segments(self._segments), self._activity_ms))
        self.caller.fire(CallerTrigger.CALL_ENDED)
        self.agent.fire(AgentTrigger.CALL_ENDED)
        self.phase.fire(PhaseTrigger.CALL_ENDED)
        actions.append(CloseProviders())
        actions.append(SaveSummary(self.summary(event.reason)))

    def summary(self, end_reason: str | None = None) -> CallSummary:
        """The call's record for the store: turns as heard, and the latency figures."""
        return CallSummary(
            turns=tuple(self._turns),
            end_reason=end_reason,
            duration_ms=self._now_ms,
            reply_latency_ms=tuple(self._reply_latencies),
            barge_in_ms=tuple(self._barge_ins),
            provider_failures=tuple(self._provider_failures),
            false_barge_ins=self._false_barge_ins,
            outcome=self._closing.outcome if self._closing is not None and self._end_requested else None,
            history=tuple(self.history),
        )


def _joined(history: list[ChatMessage], role: Role, text: str) -> list[ChatMessage]:
    """The history with a message added: joined to the last one if that has the same role, so the
    model sees caller and agent alternate."""
    last = history[-1] if history else None
    if last is not None and last.role is role:
        return [*history[:-1], ChatMessage(role, f"{last.content} {text}")]
    return [*history, ChatMessage(role, text)]


def _through_last_sentence(text: str) -> str:
    """`text` up to its last sentence end, or all of it if it has none."""
    ends = [index for index, char in enumerate(text) if char in ".!?" and text[index + 1 : index + 2] in ("", " ")]
    return text[: ends[-1] + 1] if ends else text
