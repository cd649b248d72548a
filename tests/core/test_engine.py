"""The conversation engine, rule by rule (DESIGN.md section 2), as scenarios of events and actions.

`Call` drives a `Conversation` the way the call runner does, with pure stand-ins around it: a
Deepgram that answers `Finalize`, an LLM and a TTS that answer at once (50 ms of audio per
character, with alignment), and a Twilio that plays audio out on the audio clock, echoes each mark
when playback reaches it and, on `clear`, echoes every pending mark at once.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import pytest

from core.audio import samples_to_ulaw, ulaw_to_samples
from core.engine import (
    AGENT_TRANSITIONS,
    CALLER_TRANSITIONS,
    AgentState,
    CallerState,
    CallPhase,
    Conversation,
    ConversationError,
    TurnRules,
)
from core.engine.machines import AgentTrigger, CallerTrigger
from core.events import (
    Action,
    AlignedChar,
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
    SaveSummary,
    SendToStt,
    SendTtsText,
    StartLlm,
    Transcript,
    TtsAudio,
    TtsDone,
    TtsFailed,
    Unit,
    Word,
)
from core.records import ChatMessage, NextStep, Role, Speaker, ToolCall

_rng = np.random.default_rng(3)
SPEECH = [samples_to_ulaw(np.round(_rng.normal(0, 3000, 160)).astype(np.int16)) for _ in range(25)]
SILENCE = b"\xff" * 160
MS_PER_CHAR = 50
ANSWER = "Sure, I can help with that. What time would you like?"


class Call:
    def __init__(
        self,
        answer: str | list[str] = ANSWER,
        *,
        llm_finishes: bool = True,
        alignment: bool = True,
        llm_failures: int = 0,
        tts_answers: bool = True,
        finalize_answers: bool = True,
        loud_voice: bool = False,
        finish_reason: str = "stop",
        model: list[tuple[str, tuple[ToolCall, ...]]] | None = None,
        start: CallStarted | None = None,
        **rules: Any,
    ) -> None:
        self.engine = Conversation(TurnRules.defaults(**{"greeting": "", **rules}))
        self.answer = [answer] if isinstance(answer, str) else answer
        self.llm_finishes = llm_finishes
        self.alignment = alignment
        self.llm_failures = llm_failures
        self.tts_answers = tts_answers
        self.finalize_answers = finalize_answers
        self.loud_voice = loud_voice
        self.finish_reason = finish_reason
        # The model's rounds, one per StartLlm: its text, and the tools it then asks for (none: it is done).
        self.model = deque(model or [])
        self.tool_runs: list[ToolCall] = []
        self.timeline: list[tuple[float, bytes]] = []  # what the caller heard: (play start, audio)
        self.now = 0
        self.steps: list[tuple[int, list[Action]]] = []
        self.started: dict[str, tuple[ChatMessage, ...]] = {}
        self.cancelled_llm: set[str] = set()
        self.cancelled_tts: set[str] = set()
        self.media: list[tuple[int, bytes]] = []
        self.playout: deque[tuple[float, str]] = deque()
        self.play_until = 0.0
        self.echoed_on_clear: list[str] = []
        self._queue: deque[Event] = deque()
        self.feed(start or CallStarted(0, "CA1", "MZ1"))

    # -- driving ----------------------------------------------------------------------------------

    def feed(self, event: Event) -> list[Action]:
        self._queue.append(event)
        first: list[Action] | None = None
        while self._queue:
            actions = self.engine.handle(self._queue.popleft())
            first = actions if first is None else first
            self.steps.append((self.now, actions))
            for action in actions:
                self._carry_out(action)
        return first or []

    def frames(self, ms: int, frames: list[bytes]) -> None:
        for index in range(ms // 20):
            at = self.now
            self.now += 20
            self.feed(CallerAudio(at, frames[index % len(frames)]))
            while self.playout and self.playout[0][0] <= self.now:
                self.feed(MarkPlayed(self.now, self.playout.popleft()[1]))

    def played_back(self, at_ms: float) -> np.ndarray:
        """The 20 ms of agent audio the caller's line played from `at_ms` (silence where none)."""
        out = np.zeros(160)
        for start, ulaw in self.timeline:
            first, last = max(at_ms, start), min(at_ms + 20, start + len(ulaw) / 8)
            if last > first:
                piece = ulaw_to_samples(ulaw[int((first - start) * 8) : int((last - start) * 8)])
                out[int((first - at_ms) * 8) : int((first - at_ms) * 8) + len(piece)] = piece
        return out

    def echo(self, ms: int, delay_ms: int, gain_db: float, *, with_speech: bool = False) -> None:
        """The agent's own voice comes back on the line `delay_ms` later, `gain_db` quieter (or louder)."""
        for index in range(ms // 20):
            at = self.now
            samples = self.played_back(at - delay_ms) * 10 ** (gain_db / 20)
            if with_speech:
                samples = samples + ulaw_to_samples(SPEECH[index % len(SPEECH)])
            self.frames(20, [samples_to_ulaw(np.clip(np.round(samples), -32768, 32767).astype(np.int16))])

    def speak(self, ms: int) -> None:
        self.frames(ms, SPEECH)

    def silence(self, ms: int) -> None:
        self.frames(ms, [SILENCE])

    def words(self, text: str, start_ms: int, end_ms: int, **flags: bool) -> list[Action]:
        tokens = text.split()
        step = (end_ms - start_ms) / len(tokens)
        words = [Word(t, int(start_ms + i * step), int(start_ms + (i + 1) * step)) for i, t in enumerate(tokens)]
        return self.feed(Transcript(self.now, text, True, start_ms=start_ms, end_ms=end_ms, words=words, **flags))

    # -- the stand-ins --------------------------------------------------------------------------------

    def _carry_out(self, action: Action) -> None:
        match action:
            case FinalizeStt() if self.finalize_answers:
                self._queue.append(Transcript(self.now, "", True, from_finalize=True))
            case StartLlm(reply_id=reply_id, messages=messages):
                self.started[reply_id] = messages
                if self.llm_failures:
                    self.llm_failures -= 1
                    self._queue.append(LlmFailed(self.now, reply_id, "HTTP 500"))
                    return
                if self.model:
                    text, calls = self.model.popleft()
                    if text:
                        self._queue.append(LlmText(self.now, reply_id, text))
                    done: Event = LlmToolCalls(self.now, reply_id, calls) if calls else LlmDone(self.now, reply_id)
                    self._queue.append(done)
                    return
                self._queue.extend(LlmText(self.now, reply_id, piece) for piece in self.answer)
                if self.llm_finishes:
                    self._queue.append(LlmDone(self.now, reply_id, self.finish_reason))
            case RunTool(call=call):
                self.tool_runs.append(call)
            case CancelLlm(reply_id=reply_id):
                self.cancelled_llm.add(reply_id)
            case CancelTts(reply_id=reply_id):
                self.cancelled_tts.add(reply_id)
            case SendTtsText(reply_id=reply_id, text=text) if self.tts_answers:
                audio = _voice(text) if self.loud_voice else _audio(text)
                self._queue.append(TtsAudio(self.now, reply_id, audio, _align(text) if self.alignment else None))
            case FinishTts(reply_id=reply_id) if self.tts_answers:
                self._queue.append(TtsDone(self.now, reply_id))
            case PlayAudio(ulaw=ulaw):
                self.media.append((self.now, ulaw))
                self.timeline.append((max(self.play_until, self.now), ulaw))
                self.play_until = max(self.play_until, self.now) + len(ulaw) / 8
            case PlaceMark(name=name):
                self.playout.append((self.play_until, name))
            case ClearPlayback():
                self.play_until = self.now
                self.timeline = [(start, ulaw[: max(0, int((self.now - start) * 8))]) for start, ulaw in self.timeline]
                while self.playout:
                    name = self.playout.popleft()[1]
                    self.echoed_on_clear.append(name)
                    self._queue.append(MarkPlayed(self.now, name))

    # -- reading what happened --------------------------------------------------------------------

    def actions(self, kind: type) -> list[Any]:
        return [a for _, step in self.steps for a in step if isinstance(a, kind)]

    def step_with(self, kind: type) -> tuple[int, list[Action]]:
        return next((at, step) for at, step in self.steps if any(isinstance(a, kind) for a in step))

    def user_turns(self) -> list[str]:
        return [m.content for m in self.engine.history if m.role is Role.USER]

    def committed_prompts(self) -> list[str]:
        """The caller text of every reply that was started and not cancelled."""
        return [
            messages[-1].content
            for reply_id, messages in self.started.items()
            if reply_id not in self.cancelled_llm and reply_id not in self.cancelled_tts
        ]


def _voice(text: str) -> bytes:
    """Audio as loud as speech for `text`: what an echo of the agent is made of."""
    rng = np.random.default_rng(len(text))
    return samples_to_ulaw(np.round(rng.normal(0, 3000, len(text) * MS_PER_CHAR * 8)).astype(np.int16))


def _audio(text: str) -> bytes:
    return b"\x7f" * (len(text) * MS_PER_CHAR * 8)


def _align(text: str) -> list[AlignedChar]:
    return [AlignedChar(c, i * MS_PER_CHAR, MS_PER_CHAR) for i, c in enumerate(text)]


def caller_turn(call: Call, text: str, speech_ms: int = 800) -> tuple[int, int]:
    """The caller says `text` (speech, then its final transcript 100 ms later); returns its span."""
    start = call.now
    call.speak(speech_ms)
    call.silence(100)
    call.words(text, start, start + speech_ms)
    return start, start + speech_ms


# -- rule 1: caller turns ------------------------------------------------------------------------


def test_a_pause_shorter_than_the_threshold_keeps_one_turn() -> None:
    call = Call()
    call.silence(1000)
    caller_turn(call, "book a table")
    call.silence(1400)  # 1.5 s pause in all
    caller_turn(call, "for two")
    call.silence(5000)
    assert call.user_turns() == ["book a table for two"]
    assert call.engine.summary().turn_count == 1


def test_a_pause_at_the_threshold_or_longer_makes_two_turns() -> None:
    call = Call("OK.")
    call.silence(1000)
    caller_turn(call, "book a table")
    call.silence(2400)  # 2.5 s pause: the first turn ended, was answered and the answer played
    caller_turn(call, "for two")
    call.silence(3000)
    assert call.user_turns() == ["book a table", "for two"]


def test_the_turn_ends_exactly_at_the_threshold_on_the_audio_clock() -> None:
    call = Call(speculate_after_ms=10_000)  # no speculation: the reply starts at the turn's end
    call.silence(1000)
    caller_turn(call, "hello")  # speech 1000..1800
    call.silence(3000)
    at, step = call.step_with(StartLlm)
    assert at == 1800 + 2000
    assert any(isinstance(a, FinalizeStt) for a in step)  # pending words flushed at the turn end


def test_a_turn_without_words_sends_nothing() -> None:
    call = Call()
    call.silence(500)
    call.speak(300)  # a cough: speech, no words
    call.silence(4000)
    assert call.actions(StartLlm) == []
    assert call.engine.caller_state is CallerState.SILENT


def test_words_the_detector_missed_still_make_a_turn() -> None:
    call = Call(speculate_after_ms=10_000)
    call.silence(1000)
    call.words("quiet words", 400, 900)  # Deepgram heard what was too quiet for the detector
    call.silence(2500)
    assert call.committed_prompts() == ["quiet words"]
    assert call.step_with(StartLlm)[0] == 900 + 2000


# -- rules 3, 4, 5, 6: bot speaking, barge-in, discard, what was heard ---------------------------


def test_bot_speaking_lasts_until_the_last_mark_of_the_reply_is_played() -> None:
    call = Call("Fine.")  # 5 chars: 250 ms of audio
    call.silence(500)
    caller_turn(call, "hi")
    call.silence(2000)  # threshold passes here; the held reply goes out
    assert call.engine.agent_state is AgentState.SPEAKING
    marks = call.actions(PlaceMark)
    assert marks and all(m.name.startswith("r1.") for m in marks)
    call.silence(300)
    assert call.engine.agent_state is AgentState.IDLE
    assert call.engine.history[-1] == ChatMessage(Role.ASSISTANT, "Fine.")


def test_short_speech_while_the_bot_talks_is_discarded() -> None:
    call = Call()
    call.silence(500)
    caller_turn(call, "hello")
    call.silence(2100)  # the reply (2.7 s) is playing
    assert call.engine.agent_state is AgentState.SPEAKING
    start = call.now
    call.speak(100)  # "mm-hm": shorter than the barge-in minimum
    call.silence(100)
    call.words("mm-hm", start, start + 100)
    call.silence(4000)  # the reply ends; a long silence follows
    assert call.actions(ClearPlayback) == []
    assert call.user_turns() == ["hello"]
    caller_turn(call, "what about friday")
    call.silence(2500)
    assert call.committed_prompts()[-1] == "what about friday"


def test_barge_in_stops_playback_at_once_and_a_real_word_confirms_it_and_starts_the_next_turn() -> None:
    call = Call(["Sure, I can help with that. ", "What time would you like?"], llm_finishes=False)
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(2000)
    assert call.engine.agent_state is AgentState.SPEAKING
    call.silence(400)
    onset = call.now
    call.speak(200)
    at, step = call.step_with(ClearPlayback)
    assert at - onset == 160  # the first frame at which 150 ms of speech had been heard
    assert next(a.value for a in step if isinstance(a, RecordMetric) and a.name == "BargeIn") == 160
    assert not any(isinstance(a, CancelTts | CancelLlm) for a in step)  # kept alive until confirmed
    assert call.engine.agent_state is AgentState.STOPPED
    call.speak(200)
    step = call.words("actually", onset, onset + 300)  # a word that is not a backchannel: confirmed now
    assert {CancelTts, CancelLlm} <= {type(a) for a in step}
    assert call.engine.agent_state is AgentState.IDLE
    call.speak(200)
    call.silence(100)
    call.words("make it four", onset + 300, onset + 600)
    call.silence(6000)
    messages = call.actions(StartLlm)[-1].messages
    assert [m.role for m in messages] == [Role.SYSTEM, Role.USER, Role.ASSISTANT, Role.USER]
    assert messages[1].content == "book a table"
    assert ANSWER.startswith(messages[2].content) and messages[2].content != ANSWER
    assert messages[3].content == "actually make it four"


@pytest.mark.parametrize("alignment", [True, False])
def test_the_interrupted_reply_is_kept_as_far_as_it_was_heard(alignment: bool) -> None:
    call = Call(ANSWER, alignment=alignment)
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(2000)
    first_audio = call.media[0][0]
    call.silence(440)
    call.speak(800)  # barge-in decided 700 ms into playback, confirmed by 700 ms of speech
    clear_at = call.step_with(ClearPlayback)[0]
    assert clear_at - first_audio == 700
    heard = call.engine.history[-1]
    assert heard.role is Role.ASSISTANT
    # 700 ms at 50 ms a character is "Sure, I can he"; the half-heard word is dropped.
    assert heard.content == "Sure, I can"
    summary = call.engine.summary()
    assert summary.turns[-1].interrupted is True
    assert summary.turns[-1].full_text == ANSWER


def test_marks_echoed_by_a_clear_are_not_taken_as_played() -> None:
    call = Call(ANSWER)
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(2300)
    call.speak(800)
    assert call.echoed_on_clear  # Twilio echoed the unplayed marks on clear ...
    assert call.engine.history[-1].content != ANSWER  # ... and they did not count as played
    assert call.engine.agent_state is AgentState.IDLE


def test_late_audio_of_an_interrupted_reply_is_dropped() -> None:
    call = Call(ANSWER)
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(2300)
    call.speak(800)
    assert call.actions(ClearPlayback) and call.engine.agent_state is AgentState.IDLE  # confirmed
    reply_id = call.actions(PlaceMark)[0].name.split(".")[0]
    assert call.feed(TtsAudio(call.now, reply_id, b"\x7f" * 800)) == []


def test_marks_carry_the_reply_id_and_each_sentence_has_one() -> None:
    call = Call(ANSWER)
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(2100)
    names = [m.name for m in call.actions(PlaceMark)]
    assert names == ["r1.1", "r1.2"]  # the chunk is cut after "that." so each sentence has a mark
    first_piece = call.actions(PlayAudio)[0].ulaw
    assert len(first_piece) == len("Sure, I can help with that.") * MS_PER_CHAR * 8


# -- rule 7: speculation ------------------------------------------------------------------------


def test_speculation_holds_audio_and_releases_it_the_moment_the_threshold_passes() -> None:
    call = Call()
    call.silence(1000)
    _, speech_end = caller_turn(call, "book a table")
    call.silence(600)
    assert call.engine.agent_state is AgentState.HOLDING  # started at a 400 ms pause
    assert call.actions(StartLlm) and call.actions(PlayAudio) == []  # audio ready, held back
    call.silence(1400)
    at, step = call.step_with(PlayAudio)
    assert at == speech_end + 2000
    assert next(a.value for a in step if isinstance(a, RecordMetric) and a.name == "ReplyLatency") == 2000


def test_speculation_is_cancelled_when_the_caller_goes_on() -> None:
    call = Call(llm_finishes=False)
    call.silence(1000)
    caller_turn(call, "book a table")
    call.silence(600)
    speculative = call.actions(StartLlm)[0].reply_id
    caller_turn(call, "for two")
    assert speculative in call.cancelled_llm and speculative in call.cancelled_tts
    assert call.actions(PlayAudio) == []
    call.silence(2500)
    assert call.committed_prompts() == ["book a table for two"]


def test_speech_final_starts_the_speculation_before_the_local_pause() -> None:
    call = Call()
    call.silence(1000)
    start = call.now
    call.speak(800)
    call.silence(300)  # Deepgram's endpointing pause; the local 400 ms has not passed
    call.words("book a table", start, start + 800, speech_final=True)
    assert call.engine.agent_state is AgentState.HOLDING
    assert call.actions(FinalizeStt) == []


def test_late_words_of_a_closed_turn_restart_a_reply_not_yet_heard() -> None:
    call = Call(speculate_after_ms=10_000, tts_answers=False)  # the reply has no audio yet
    call.silence(1000)
    call.speak(800)
    call.silence(100)
    call.words("book a", 1000, 1400)
    call.silence(1900)  # the turn ended at 3800 with "book a"
    first = call.actions(StartLlm)[0].reply_id
    call.words("table", 1400, 1800)  # Deepgram's last words, late
    assert first in call.cancelled_tts
    assert call.committed_prompts() == ["book a table"]


def test_late_words_give_an_unheard_apology_another_try_with_the_whole_turn() -> None:
    """Found by the stateful test: the apology answers the turn too, so late words restart it."""
    call = Call(llm_failures=2, tts_answers=False, speculate_after_ms=10_000)
    call.silence(1000)
    call.speak(800)
    call.silence(100)
    call.words("book a", 1000, 1400)
    call.silence(1900)  # the turn ends with "book a"; the model fails twice: the apology is queued
    assert call.actions(SendTtsText)[-1].text == TurnRules.defaults().apology
    call.words("table", 1400, 1800)
    assert "r1" in call.cancelled_tts
    assert call.actions(StartLlm)[-1].messages[-1].content == "book a table"
    assert call.engine.agent_state is AgentState.THINKING and call.engine.caller_state is CallerState.SILENT


def test_a_reply_restarted_by_late_words_keeps_the_floor_it_took_at_the_turns_end() -> None:
    """Found by the stateful test: words said after the turn ended never open a turn while the agent answers."""
    call = Call(speculate_after_ms=10_000, tts_answers=False)
    call.silence(1000)
    call.speak(800)
    call.silence(100)
    call.words("book a", 1000, 1400)
    call.silence(1900)
    turn_end = call.step_with(StartLlm)[0]
    call.silence(40)
    call.words("table", 1400, 1800)  # late: the reply restarts now, 40 ms after the turn ended
    call.words("uh", turn_end + 10, turn_end + 30)  # said after the turn ended, before the restart
    call.silence(3000)
    assert call.engine.caller_state is CallerState.SILENT
    assert call.committed_prompts() == ["book a table"]


# -- rules 8, 9, 10: greeting, DTMF, call end ----------------------------------------------------


def test_the_greeting_is_spoken_on_start_and_can_be_interrupted() -> None:
    call = Call(greeting="Hello! Thanks for calling.")
    assert call.actions(SendTtsText)[0].text == "Hello! Thanks for calling."
    assert call.actions(PlayAudio)
    call.silence(300)
    call.speak(800)
    assert call.actions(ClearPlayback)
    assert call.engine.history == [ChatMessage(Role.ASSISTANT, "Hello!")]


def test_dtmf_digits_are_part_of_the_callers_turn() -> None:
    call = Call(speculate_after_ms=10_000)
    call.silence(500)
    caller_turn(call, "my code is")
    call.feed(DtmfPressed(call.now, "4"))
    call.silence(200)
    call.feed(DtmfPressed(call.now, "2"))
    call.silence(2500)
    assert call.committed_prompts() == ["my code is (pressed 4) (pressed 2)"]


def test_a_key_press_interrupts_the_bot() -> None:
    call = Call(ANSWER)
    call.silence(500)
    caller_turn(call, "hello")
    call.silence(2300)
    call.feed(DtmfPressed(call.now, "0"))
    assert call.actions(ClearPlayback)
    call.silence(2500)
    assert call.committed_prompts()[-1] == "(pressed 0)"


def test_call_end_cancels_everything_and_saves_the_summary() -> None:
    call = Call(llm_finishes=False)
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(2200)
    step = call.feed(CallEnded(call.now, "stop"))
    kinds = [type(a) for a in step]
    assert CancelLlm in kinds and CancelTts in kinds and CloseProviders in kinds
    summary = next(a.summary for a in step if isinstance(a, SaveSummary))
    assert summary.turn_count == 1
    assert summary.end_reason == "stop"
    assert "Caller: book a table" in summary.transcript
    assert summary.reply_latency_ms == (2000,)
    assert summary.barge_in_ms == ()
    assert call.engine.handle(CallerAudio(call.now, SPEECH[0])) == []  # nothing after the end


def test_a_hang_up_during_a_speculation_keeps_the_callers_words_once() -> None:
    call = Call()
    call.silence(500)
    caller_turn(call, "are you there")
    call.silence(600)
    assert call.engine.agent_state is AgentState.HOLDING
    summary = call.engine.handle(CallEnded(call.now, "closed"))[-1]
    assert isinstance(summary, SaveSummary)
    assert [t.text for t in summary.summary.turns] == ["are you there"]


# -- reliability: the model fails ------------------------------------------------------------------


def test_an_llm_error_is_retried_once() -> None:
    call = Call("Fine.", llm_failures=1, speculate_after_ms=10_000)
    call.silence(500)
    caller_turn(call, "hello")
    call.silence(2600)
    assert len(call.actions(StartLlm)) == 2
    assert call.engine.history[-1] == ChatMessage(Role.ASSISTANT, "Fine.")


def test_after_two_llm_errors_the_agent_apologises() -> None:
    call = Call("Fine.", llm_failures=2, speculate_after_ms=10_000)
    call.silence(500)
    caller_turn(call, "hello")
    call.silence(6000)
    assert call.engine.history[-1].content == TurnRules.defaults().apology


# -- the machines themselves ---------------------------------------------------------------------


def test_every_state_but_ended_can_end_the_call() -> None:
    for table, ended, trigger in (
        (CALLER_TRANSITIONS, CallerState.ENDED, CallerTrigger.CALL_ENDED),
        (AGENT_TRANSITIONS, AgentState.ENDED, AgentTrigger.CALL_ENDED),
    ):
        for state, moves in table.items():
            assert (state is ended) == (trigger not in moves)


def test_a_trigger_the_table_does_not_allow_names_the_state() -> None:
    engine = Conversation()
    with pytest.raises(ConversationError, match="the agent cannot 'barge_in' while IDLE"):
        engine.agent.fire(AgentTrigger.BARGE_IN)


def test_every_caller_frame_goes_to_stt() -> None:
    engine = Conversation(TurnRules.defaults(greeting=""))
    actions = engine.handle(CallerAudio(0, SPEECH[0]))
    assert actions[0] == SendToStt(SPEECH[0])


def test_a_stop_consonants_closure_does_not_delay_the_barge_in() -> None:
    call = Call(ANSWER)
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(2300)
    onset = call.now
    call.speak(140)
    call.silence(40)  # "ac-t-ually": the closure of the t
    call.speak(200)
    at, _ = call.step_with(ClearPlayback)
    assert at - onset == 160
    assert call.engine.summary().barge_in_ms == (160,)


# -- the call phase, the STT flush, failures -----------------------------------------------------------


def test_the_call_phase_opens_on_start_and_ends_with_the_call() -> None:
    engine = Conversation(TurnRules.defaults(greeting=""))
    assert engine.phase.state is CallPhase.OPENING
    engine.handle(CallStarted(0, "CA1", "MZ1"))
    assert engine.phase.state is CallPhase.CONVERSING
    engine.handle(CallEnded(20, "stop"))
    assert engine.phase.state is CallPhase.ENDED


@pytest.mark.parametrize("finalize_answers", [True, False])
def test_speculation_starts_at_the_pause_whether_or_not_deepgram_answers_finalize(finalize_answers: bool) -> None:
    """Deepgram's answer to `Finalize` "is not guaranteed if there is no significant amount of audio
    data": speculation waits for it at most `finalize_wait_ms`, then starts anyway."""
    call = Call(finalize_answers=finalize_answers)
    call.silence(1000)
    _, speech_end = caller_turn(call, "book a table")
    call.silence(1000)
    finalized = call.step_with(FinalizeStt)[0]
    assert finalized == speech_end + 400  # SPECULATE_AFTER_MS of pause
    speculated = call.step_with(StartLlm)[0]
    assert speculated == (finalized + 20 if finalize_answers else finalized + 160)  # the next frame, or the bound
    assert call.engine.agent_state is AgentState.HOLDING
    unanswered = [a for a in call.actions(RecordMetric) if a.name == "FinalizeUnanswered"]
    assert len(unanswered) == (0 if finalize_answers else 1)
    call.silence(1000)
    assert call.step_with(PlayAudio)[0] == speech_end + 2000  # the held reply goes out at the threshold


def test_words_that_come_after_an_unanswered_finalize_still_make_the_reply() -> None:
    call = Call(finalize_answers=False, llm_finishes=False)
    call.silence(1000)
    _, speech_end = caller_turn(call, "book a")
    call.silence(600)  # speculation on "book a" has started
    first = call.actions(StartLlm)[0].reply_id
    call.words("table", speech_end - 100, speech_end)  # Deepgram's last word, late
    assert first in call.cancelled_llm
    call.silence(2000)
    assert call.committed_prompts() == ["book a table"]


def test_a_provider_that_fails_for_good_is_on_the_record_once() -> None:
    call = Call()
    for _ in range(2):
        step = call.feed(ProviderFailed(call.now, ProviderRole.STT, "Deepgram refused the connection with HTTP 401"))
    assert call.actions(RecordMetric) == [RecordMetric("ProviderFailures", 1, Unit.COUNT)]
    assert step == []
    summary = call.engine.summary()
    assert summary.provider_failures == ("speech-to-text: Deepgram refused the connection with HTTP 401",)


def test_a_voice_that_fails_while_the_model_writes_closes_the_model_and_apologises_once() -> None:
    call = Call(llm_finishes=False, tts_answers=False, speculate_after_ms=10_000)
    call.silence(500)
    caller_turn(call, "hello")
    call.silence(2100)
    reply_id = call.actions(StartLlm)[0].reply_id
    step = call.feed(TtsFailed(call.now, reply_id, "quota_exceeded: out of characters"))
    assert CancelLlm(reply_id) in step
    apology = TurnRules.defaults().apology
    assert [a.text for a in step if isinstance(a, SendTtsText)] == [apology]  # never silence
    assert call.engine.agent_state is AgentState.THINKING
    again = call.feed(TtsFailed(call.now, "r2", "quota_exceeded: out of characters"))
    assert not any(isinstance(a, SendTtsText) for a in again)  # an apology that fails is not apologised for
    assert call.engine.agent_state is AgentState.IDLE


def test_a_dead_speech_to_text_ends_the_call_after_a_goodbye_heard_whole() -> None:
    call = Call(ANSWER)
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(2300)  # the answer is playing
    step = call.feed(ProviderFailed(call.now, ProviderRole.STT, "Deepgram closed the stream: 1008 DATA-0000"))
    assert call.engine.phase.state is CallPhase.CLOSING and not any(isinstance(a, EndCall) for a in step)
    call.speak(600)  # nothing the caller does changes it now: no barge-in, no turn
    assert call.actions(ClearPlayback) == []
    call.silence(8000)  # the answer plays out, then the goodbye, to its last mark
    goodbye = TurnRules.defaults().cannot_hear_goodbye
    assert call.actions(SendTtsText)[-1].text == goodbye
    assert call.actions(EndCall) == [EndCall("provider_failure", NextStep("hangup"))]
    ended_at = call.step_with(EndCall)[0]
    assert ended_at >= call.timeline[-1][0] + len(call.timeline[-1][1]) / 8  # after the goodbye played out
    assert [t.text for t in call.engine.summary().turns if t.speaker is Speaker.AGENT] == [ANSWER, goodbye]
    assert call.engine.history[-1] == ChatMessage(Role.ASSISTANT, f"{ANSWER} {goodbye}")  # one agent message
    assert call.engine.summary().provider_failures == ("speech-to-text: Deepgram closed the stream: 1008 DATA-0000",)


def test_a_goodbye_right_after_the_greeting_joins_it_so_messages_alternate() -> None:
    """Found by the stateful test: a dead speech-to-text before the caller said anything."""
    greeting = "Hello! How can I help?"
    call = Call(greeting=greeting)
    call.silence(1000)  # the greeting is heard
    call.feed(ProviderFailed(call.now, ProviderRole.STT, "Deepgram refused the connection with HTTP 402"))
    call.silence(8000)
    goodbye = TurnRules.defaults().cannot_hear_goodbye
    assert call.engine.history == [ChatMessage(Role.ASSISTANT, f"{greeting} {goodbye}")]
    assert [t.text for t in call.engine.summary().turns] == [greeting, goodbye]  # the record keeps both lines


def test_late_words_of_a_reply_nobody_heard_do_not_count_after_the_apology_takes_the_floor() -> None:
    """Found by the stateful test: the apology took the floor at once, and the deaf window of the reply
    before it was forgotten, so a late word from it opened a turn the agent could never answer."""
    call = Call(llm_finishes=False, tts_answers=False, speculate_after_ms=10_000)
    call.silence(500)
    caller_turn(call, "hello")
    call.silence(2100)
    reply_id = call.actions(StartLlm)[0].reply_id
    call.silence(200)
    call.feed(TtsFailed(call.now, reply_id, "quota_exceeded"))  # the apology takes the floor now
    call.words("uh", call.now - 100, call.now - 50)  # said while the failed reply held the floor
    call.silence(3000)
    assert call.engine.caller_state is CallerState.SILENT
    assert len(call.actions(StartLlm)) == 1


def test_a_dead_voice_ends_the_call_at_once() -> None:
    call = Call(llm_finishes=False, tts_answers=False, speculate_after_ms=10_000)
    call.silence(500)
    caller_turn(call, "hello")
    call.silence(2100)
    step = call.feed(ProviderFailed(call.now, ProviderRole.TTS, "ElevenLabs closed 3 sockets in a row: 1008"))
    assert EndCall("provider_failure", NextStep("hangup")) in step and CancelLlm("r1") in step


def test_a_model_that_refuses_the_key_is_on_the_record_and_the_call_goes_on() -> None:
    call = Call()
    step = call.feed(ProviderFailed(call.now, ProviderRole.CHAT, "gpt-4o-mini answered HTTP 401"))
    assert not any(isinstance(a, EndCall) for a in step) and call.engine.phase.state is CallPhase.CONVERSING


def test_a_reply_interrupted_before_a_word_was_heard_joins_the_callers_turns() -> None:
    call = Call(ANSWER)
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(1900)  # the threshold passes at the end of this: the reply's first audio goes out now
    assert call.media and call.media[0][0] == call.now
    onset = call.now
    call.speak(160)  # a barge-in before any of it could be heard
    assert call.actions(ClearPlayback)
    call.speak(400)
    call.silence(100)
    call.words("for four", onset, onset + 560)
    call.silence(6000)  # the second reply is asked for and heard out
    assert call.engine.summary().turns[1].text == ""  # the first reply: nothing of it was heard
    prompt = call.actions(StartLlm)[-1].messages
    assert [m.role for m in prompt] == [Role.SYSTEM, Role.USER]
    assert prompt[-1].content == "book a table for four"
    assert call.engine.history == [ChatMessage(Role.USER, "book a table for four"), ChatMessage(Role.ASSISTANT, ANSWER)]


# -- rule 4: stop at once, then confirm or resume ------------------------------------------------------


def replying(**options: Any) -> tuple[Call, int]:
    """A call whose agent is 440 ms into its answer to "book a table"; returns it and the first audio's time."""
    call = Call(**{"answer": ANSWER, **options})
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(1900)
    first_audio = call.media[0][0]
    call.silence(440)
    return call, first_audio


def word_start_ms(text: str, heard_ms: float) -> int:
    """Where the word being heard at `heard_ms` starts, at MS_PER_CHAR a character."""
    index = int(heard_ms // MS_PER_CHAR)
    while index > 0 and not text[index - 1].isspace():
        index -= 1
    return index * MS_PER_CHAR


def test_a_cough_stops_the_agent_which_resumes_from_the_word_being_heard_and_finishes() -> None:
    call, first_audio = replying()
    onset = call.now
    call.speak(300)  # a cough: loud, no words
    clear_at = call.step_with(ClearPlayback)[0]
    assert clear_at - onset == 160 and call.engine.agent_state is AgentState.STOPPED
    assert call.actions(CancelTts) == [] and call.actions(CancelLlm) == []  # the reply is kept alive
    call.silence(1100)
    resumed_at, resumed = next((at, ulaw) for at, ulaw in call.media if at > clear_at)
    assert resumed_at == onset + 1200  # RESUME_WINDOW_MS after the onset
    first_sentence = "Sure, I can help with that."
    restart = word_start_ms(ANSWER, clear_at - first_audio)
    assert len(resumed) == (len(first_sentence) * MS_PER_CHAR - restart) * 8  # from that word's start
    assert call.engine.agent_state is AgentState.SPEAKING
    call.silence(4000)  # heard out to its last (new) mark
    assert call.engine.agent_state is AgentState.IDLE
    assert call.engine.history == [ChatMessage(Role.USER, "book a table"), ChatMessage(Role.ASSISTANT, ANSWER)]
    summary = call.engine.summary()
    assert summary.false_barge_ins == 1 and summary.turn_count == 1
    assert summary.turns[-1].interrupted is False and summary.turns[-1].text == ANSWER
    metrics = {a.name: a.value for a in call.actions(RecordMetric)}
    assert metrics["FalseBargeIn"] == 1 and metrics["ResumeDelay"] == 1200


def test_an_mm_hm_with_its_words_resumes_and_never_enters_the_next_turn() -> None:
    call, _ = replying()
    onset = call.now
    call.speak(300)
    call.silence(100)
    call.words("Mm-hm.", onset, onset + 300)  # Deepgram's words of it: a backchannel confirms nothing
    assert call.engine.agent_state is AgentState.STOPPED
    call.silence(5000)
    assert call.engine.agent_state is AgentState.IDLE and call.engine.summary().false_barge_ins == 1
    call.words("mm-hm", onset, onset + 300)  # a late copy of the final changes nothing either
    caller_turn(call, "what about friday")
    call.silence(2500)
    assert call.committed_prompts() == ["book a table", "what about friday"]
    assert call.user_turns() == ["book a table"] and call.engine.history[-1] == ChatMessage(Role.ASSISTANT, ANSWER)


def test_wait_is_confirmed_at_its_first_word_and_starts_the_next_turn() -> None:
    call, _ = replying(answer=["Sure, I can help with that. ", "What time?"], llm_finishes=False)
    onset = call.now
    call.speak(300)
    assert not call.actions(CancelLlm)
    step = call.words("wait", onset, onset + 250)
    assert CancelLlm("r1") in step and CancelTts("r1") in step  # confirmed, cancelled now
    assert call.engine.agent_state is AgentState.IDLE
    call.silence(2500)
    assert call.committed_prompts()[-1] == "wait"
    assert call.engine.history[1].role is Role.ASSISTANT and call.engine.summary().turns[1].interrupted


def test_speech_without_words_is_confirmed_when_it_lasts_the_confirmation_time() -> None:
    call, _ = replying(llm_finishes=False)
    onset = call.now
    call.speak(1000)
    confirmed_at, step = call.step_with(CancelLlm)
    assert confirmed_at - onset == 700 and CancelTts("r1") in step  # BARGE_IN_CONFIRM_MS of speech
    assert call.engine.summary().false_barge_ins == 0


def test_a_cough_during_a_held_reply_keeps_it_and_it_goes_out_after_the_cough() -> None:
    call = Call()
    call.silence(1000)
    caller_turn(call, "book a table")
    call.silence(600)
    assert call.engine.agent_state is AgentState.HOLDING
    call.speak(300)  # a cough while the speculative answer waits
    cough_end = call.now
    assert call.engine.agent_state is AgentState.HOLDING
    call.silence(2500)
    assert len(call.actions(StartLlm)) == 1  # no second request to the model for a cough
    assert call.step_with(PlayAudio)[0] == cough_end + 2000  # the turn's pause counts from the cough
    assert call.committed_prompts() == ["book a table"]


def test_a_cough_during_the_greeting_resumes_it() -> None:
    greeting = "Hello! Thanks for calling Parley."
    call = Call(greeting=greeting)
    call.silence(300)
    call.speak(300)
    assert call.actions(ClearPlayback) and call.engine.agent_state is AgentState.STOPPED
    call.silence(4000)
    assert call.engine.history == [ChatMessage(Role.ASSISTANT, greeting)]
    assert call.engine.summary().false_barge_ins == 1


def test_a_key_press_is_confirmed_in_the_same_step() -> None:
    call, _ = replying()
    step = call.feed(DtmfPressed(call.now, "0"))
    assert ClearPlayback() in step and call.engine.agent_state is AgentState.IDLE


def test_a_cough_before_any_audio_holds_the_reply_then_lets_it_out() -> None:
    call = Call(speculate_after_ms=10_000, tts_answers=False)
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(2000)
    assert call.engine.agent_state is AgentState.THINKING
    call.speak(300)
    assert call.engine.agent_state is AgentState.STOPPED and call.actions(ClearPlayback) == []
    reply_id = call.actions(StartLlm)[0].reply_id
    assert call.feed(TtsAudio(call.now, reply_id, _audio("Sure."), _align("Sure."))) == []  # held
    call.silence(1200)
    assert call.engine.agent_state is AgentState.SPEAKING and call.actions(PlayAudio)


@pytest.mark.parametrize("delay_ms", [50, 200, 400])
@pytest.mark.parametrize("gain_db", [-10.0, -20.0, -30.0])
def test_the_agents_own_echo_is_not_a_barge_in(delay_ms: int, gain_db: float) -> None:
    call, _ = replying(loud_voice=True)
    call.echo(3000, delay_ms, gain_db)  # to the end of the reply and past it
    assert call.actions(ClearPlayback) == []
    assert call.engine.history[-1] == ChatMessage(Role.ASSISTANT, ANSWER)  # heard whole


def test_a_caller_talking_over_the_echo_still_barges_in() -> None:
    call, _ = replying(loud_voice=True)
    call.echo(400, 200, -10.0)
    onset = call.now
    call.echo(400, 200, -10.0, with_speech=True)
    assert call.step_with(ClearPlayback)[0] - onset <= 180


def test_what_was_heard_never_runs_past_a_gap_in_the_agents_audio() -> None:
    """Found by the stateful test: a slow voice leaves the line silent; the cut must not assume it played."""
    call = Call(tts_answers=False, speculate_after_ms=10_000)
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(2000)
    reply_id = call.actions(StartLlm)[0].reply_id
    call.feed(TtsAudio(call.now, reply_id, _audio("Sure. "), _align("Sure. ")))  # 300 ms, then nothing
    call.silence(1000)
    call.feed(TtsAudio(call.now, reply_id, _audio("I can help."), _align("I can help.")))
    call.silence(100)
    call.speak(1000)  # stopped 160 ms later: 260 ms into the second piece, in the space after "can"
    # Counting from the last mark as if playback never paused would say all of it was heard.
    assert call.engine.history[-1] == ChatMessage(Role.ASSISTANT, "Sure. I can")


# -- section 6: how the model's stream ended -------------------------------------------------------------


def test_a_model_that_refuses_with_content_filter_and_no_text_gets_the_apology_spoken() -> None:
    call = Call([], finish_reason="content_filter", speculate_after_ms=10_000)
    call.silence(500)
    caller_turn(call, "something the filter stops")
    call.silence(6000)
    assert call.actions(SendTtsText)[-1].text == TurnRules.defaults().apology
    assert call.engine.history[-1] == ChatMessage(Role.ASSISTANT, TurnRules.defaults().apology)
    assert len(call.actions(StartLlm)) == 1  # a refusal is not retried
    assert "LlmRefused" in [a.name for a in call.actions(RecordMetric)]


def test_an_answer_cut_by_the_token_limit_ends_at_its_last_whole_sentence() -> None:
    call = Call(["Sure, I can help with that. ", "What time would"], finish_reason="length", alignment=False)
    call.silence(500)
    caller_turn(call, "book a table")
    call.silence(6000)
    assert FinishTts("r1", drop_unfinished=True) in call.actions(FinishTts)
    assert call.engine.history[-1] == ChatMessage(Role.ASSISTANT, "Sure, I can help with that.")
