"""The engine under random, well-formed event streams (Hypothesis stateful testing).

The world around the engine is modelled as the call runner sees it: caller audio on a monotone
audio clock, Deepgram finals for speech already said (and `Finalize` answered or not: both readings
of an UNCONFIRMED vendor behaviour), a model that streams, finishes or fails whenever it likes, a
voice that voices sent text in order and finishes only after `FinishTts`, and a Twilio that plays
audio on the audio clock, echoes each mark when playback reaches it, and echoes every pending mark
at once on `clear`. Whatever the order, these must hold:

* no `ConversationError` (a trigger a table does not allow) and no other exception;
* at most one live reply, and at most one open model stream;
* every model stream that was started is ended or cancelled before the summary is saved;
* a reply committed as heard whole had its last mark really played, not echoed by a clear;
* caller and agent messages alternate in the history, which starts after the system prompt (an agent
  turn that used tools counts once: its tool calls, their results, what it said after them);
* every tool call in the history is followed at once by its results, one per call, as OpenAI requires;
* the agent machine and the current reply agree.

The model may also ask for tools (an HTTP tool, `end_call`, `transfer_call`) whenever a stream is
open, and an HTTP tool answers whenever it likes, even after its reply was given up; when the engine
ends the call itself (`EndCall`) the runner's `CallEnded("agent")` follows.
"""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from core.audio import samples_to_ulaw
from core.engine import AgentState, CallPhase, Conversation, TurnRules
from core.events import (
    Action,
    AlignedChar,
    CallEnded,
    CallerAudio,
    CallStarted,
    CancelLlm,
    CancelTts,
    ClearPlayback,
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
    RunTool,
    SaveSummary,
    SendTtsText,
    StartLlm,
    ToolAnswered,
    Transcript,
    TtsAudio,
    TtsDone,
    TtsFailed,
    Word,
)
from core.records import ChatMessage, Role, Speaker, ToolCall
from core.tools import ToolSpec, builtin_tools

_rng = np.random.default_rng(5)
SPEECH = [samples_to_ulaw(np.round(_rng.normal(0, 3000, 160)).astype(np.int16)) for _ in range(8)]
SILENCE = b"\xff" * 160
MS_PER_CHAR = 20
ANSWERS = ["Sure. ", "I can help with that. ", "What time would you like? ", "Okay"]
WORDS = ["book", "a", "table", "for", "two", "wait", "yes", "no"]
DESTINATIONS = {"support": "+15551230000"}
LOOKUP = ToolSpec("lookup", "Look it up", {"type": "object", "properties": {}}, url="http://tools.invalid/lookup")
TOOL_CALLS = {
    "lookup": ("lookup", "{}"),
    "end_call": ("end_call", '{"reason": "done"}'),
    "transfer": ("transfer_call", '{"destination": "support", "summary": "a person"}'),
    "nowhere": ("transfer_call", '{"destination": "sales", "summary": "a person"}'),
}


def voiced_audio(now: int, reply_id: str, text: str, aligned: bool) -> TtsAudio:
    alignment = [AlignedChar(c, i * MS_PER_CHAR, MS_PER_CHAR) for i, c in enumerate(text)] if aligned else None
    return TtsAudio(now, reply_id, b"\x7f" * (len(text) * MS_PER_CHAR * 8), alignment)


class ConversationModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine: Conversation | None = None
        self.now = 0
        self.queue: deque[Event] = deque()
        self.llm_open: dict[str, list[str]] = {}  # reply id -> pieces still to stream
        self.tts_unvoiced: dict[str, str] = {}
        self.tts_finished: set[str] = set()
        self.finalize_pending = False
        self.playout: deque[tuple[float, str]] = deque()
        self.play_until = 0.0
        self.placed: dict[str, list[str]] = {}  # reply id -> its marks, in order
        self.played: set[str] = set()  # marks echoed because playback reached them
        self.saved = False
        self.tools_running: list[str] = []  # ids of HTTP tool calls not answered yet
        self.tool_ids = itertools.count(1)

    # -- the world ---------------------------------------------------------------------------------

    @rule(greeting=st.sampled_from(["", "Hello! How can I help?"]))
    @precondition(lambda self: self.engine is None)
    def start(self, greeting: str) -> None:
        rules = TurnRules.defaults(
            greeting=greeting,
            silence_threshold_ms=1000,
            transfer_destinations=DESTINATIONS,
            tools=(*builtin_tools(DESTINATIONS), LOOKUP),
            tool_filler_ms=300,
            idle_reprompt_ms=3000,
            max_call_ms=8000,  # the duration cap, within the model's reach
        )
        self.engine = Conversation(rules)
        self.feed(CallStarted(0, "CA1", "MZ1"))

    def feed(self, event: Event) -> None:
        assert self.engine is not None
        self.queue.append(event)
        while self.queue:
            for action in self.engine.handle(self.queue.popleft()):
                self.carry_out(action)

    def carry_out(self, action: Action) -> None:
        match action:
            case StartLlm(reply_id=reply_id):
                self.llm_open[reply_id] = list(ANSWERS)
            case CancelLlm(reply_id=reply_id):
                self.llm_open.pop(reply_id, None)
            case SendTtsText(reply_id=reply_id, text=text):
                self.tts_unvoiced[reply_id] = self.tts_unvoiced.get(reply_id, "") + text
            case FinishTts(reply_id=reply_id) if reply_id not in self.tts_unvoiced:
                self.queue.append(TtsDone(self.now, reply_id))  # no text was ever sent: as ElevenLabsStream does
            case FinishTts(reply_id=reply_id):
                self.tts_finished.add(reply_id)
            case CancelTts(reply_id=reply_id):
                self.tts_unvoiced.pop(reply_id, None)
                self.tts_finished.discard(reply_id)
            case FinalizeStt():
                self.finalize_pending = True
            case PlayAudio(ulaw=ulaw):
                self.play_until = max(self.play_until, self.now) + len(ulaw) / 8
            case PlaceMark(name=name):
                self.playout.append((self.play_until, name))
                self.placed.setdefault(name.partition(".")[0], []).append(name)
            case ClearPlayback():
                self.play_until = self.now
                while self.playout:  # Twilio echoes every pending mark at once, unplayed
                    self.queue.append(MarkPlayed(self.now, self.playout.popleft()[1]))
            case RunTool(call=call):
                self.tools_running.append(call.id)
            case EndCall():
                self.queue.append(CallEnded(self.now, "agent"))  # the runner closes the stream
            case SaveSummary(summary=summary):
                assert not self.llm_open, f"model streams left open at the call's end: {sorted(self.llm_open)}"
                for turn in summary.turns:
                    if turn.speaker is Speaker.AGENT and turn.text and not turn.interrupted:
                        last_mark = self.placed[turn.reply_id or ""][-1]
                        assert last_mark in self.played, f"{turn.reply_id} counted as heard, {last_mark} never played"
                self.saved = True

    def frames(self, count: int, audio: list[bytes]) -> None:
        for index in range(count):
            at = self.now
            self.now += 20
            self.feed(CallerAudio(at, audio[index % len(audio)]))
            while self.playout and self.playout[0][0] <= self.now:
                name = self.playout.popleft()[1]
                self.played.add(name)
                self.feed(MarkPlayed(self.now, name))

    def live(self) -> bool:
        return self.engine is not None and not self.saved

    # -- the caller --------------------------------------------------------------------------------

    @rule(count=st.integers(1, 40))
    @precondition(live)
    def speak(self, count: int) -> None:
        self.frames(count, SPEECH)

    @rule(count=st.integers(1, 120))
    @precondition(live)
    def pause(self, count: int) -> None:
        self.frames(count, [SILENCE])

    @rule(digit=st.sampled_from("0123456789*#"))
    @precondition(live)
    def press(self, digit: str) -> None:
        self.feed(DtmfPressed(self.now, digit))

    # -- Deepgram ------------------------------------------------------------------------------------

    @rule(
        back_ms=st.integers(0, 3000),
        length_ms=st.integers(100, 1500),
        words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4),
        speech_final=st.booleans(),
    )
    @precondition(live)
    def final_words(self, back_ms: int, length_ms: int, words: list[str], speech_final: bool) -> None:
        start = max(0, self.now - back_ms)
        end = min(self.now, start + length_ms)
        step = max(1, (end - start) // len(words))
        timed = [Word(w, start + i * step, start + (i + 1) * step) for i, w in enumerate(words)]
        self.feed(
            Transcript(
                self.now, " ".join(words), True, speech_final=speech_final, start_ms=start, end_ms=end, words=timed
            )
        )

    @rule()
    @precondition(lambda self: self.live() and self.finalize_pending)
    def finalize_answered(self) -> None:
        self.finalize_pending = False
        self.feed(Transcript(self.now, "", True, from_finalize=True, start_ms=self.now, end_ms=self.now))

    # -- the model -----------------------------------------------------------------------------------

    @rule(data=st.data())
    @precondition(lambda self: self.live() and bool(self.llm_open))
    def model_writes(self, data: st.DataObject) -> None:
        reply_id = data.draw(st.sampled_from(sorted(self.llm_open)))
        pieces = self.llm_open[reply_id]
        if pieces:
            self.feed(LlmText(self.now, reply_id, pieces.pop(0)))
        else:
            del self.llm_open[reply_id]
            self.feed(LlmDone(self.now, reply_id))

    @rule(data=st.data())
    @precondition(lambda self: self.live() and bool(self.llm_open))
    def model_fails(self, data: st.DataObject) -> None:
        reply_id = data.draw(st.sampled_from(sorted(self.llm_open)))
        del self.llm_open[reply_id]
        self.feed(LlmFailed(self.now, reply_id, "HTTP 500"))

    @rule(data=st.data(), tool=st.sampled_from(sorted(TOOL_CALLS)))
    @precondition(lambda self: self.live() and bool(self.llm_open))
    def model_asks_for_a_tool(self, data: st.DataObject, tool: str) -> None:
        reply_id = data.draw(st.sampled_from(sorted(self.llm_open)))
        del self.llm_open[reply_id]
        name, arguments = TOOL_CALLS[tool]
        self.feed(LlmToolCalls(self.now, reply_id, (ToolCall(f"call_{next(self.tool_ids)}", name, arguments),)))

    @rule(data=st.data())
    @precondition(lambda self: self.live() and bool(self.tools_running))
    def tool_answers(self, data: st.DataObject) -> None:
        call_id = data.draw(st.sampled_from(self.tools_running))
        self.tools_running.remove(call_id)
        self.feed(ToolAnswered(self.now, call_id, '{"found": true}'))

    # -- the voice -----------------------------------------------------------------------------------

    @rule(data=st.data(), aligned=st.booleans())
    @precondition(lambda self: self.live() and any(self.tts_unvoiced.values()))
    def voice_speaks(self, data: st.DataObject, aligned: bool) -> None:
        reply_id = data.draw(st.sampled_from(sorted(r for r, text in self.tts_unvoiced.items() if text)))
        text = self.tts_unvoiced[reply_id]
        count = data.draw(st.integers(1, len(text)))
        voiced, self.tts_unvoiced[reply_id] = text[:count], text[count:]
        self.feed(voiced_audio(self.now, reply_id, voiced, aligned))

    def voiced_out(self) -> list[str]:
        """Replies whose text is all sent (`FinishTts`) and all voiced: only their `TtsDone` is left."""
        return sorted(r for r in self.tts_finished if r in self.tts_unvoiced and not self.tts_unvoiced[r])

    @rule(data=st.data())
    @precondition(lambda self: self.live() and bool(self.voiced_out()))
    def voice_finishes(self, data: st.DataObject) -> None:
        done = self.voiced_out()
        reply_id = data.draw(st.sampled_from(done))
        del self.tts_unvoiced[reply_id]
        self.tts_finished.discard(reply_id)
        self.feed(TtsDone(self.now, reply_id))

    @rule(data=st.data())
    @precondition(lambda self: self.live() and bool(self.tts_unvoiced))
    def voice_fails(self, data: st.DataObject) -> None:
        reply_id = data.draw(st.sampled_from(sorted(self.tts_unvoiced)))
        del self.tts_unvoiced[reply_id]
        self.tts_finished.discard(reply_id)
        self.feed(TtsFailed(self.now, reply_id, "HTTP 401"))

    @rule(aligned=st.booleans())
    @precondition(lambda self: self.live() and bool(self.llm_open or self.tts_unvoiced))
    def providers_catch_up(self, aligned: bool) -> None:
        """The model writes its whole answer and the voice voices everything sent, as fast providers do."""
        for reply_id in sorted(self.llm_open):
            while self.llm_open.get(reply_id):
                self.feed(LlmText(self.now, reply_id, self.llm_open[reply_id].pop(0)))
            if reply_id in self.llm_open:
                del self.llm_open[reply_id]
                self.feed(LlmDone(self.now, reply_id))
        for reply_id in sorted(self.tts_unvoiced):
            text = self.tts_unvoiced.get(reply_id, "")
            if text:
                self.tts_unvoiced[reply_id] = ""
                alignment = (
                    [AlignedChar(c, i * MS_PER_CHAR, MS_PER_CHAR) for i, c in enumerate(text)] if aligned else None
                )
                self.feed(TtsAudio(self.now, reply_id, b"\x7f" * (len(text) * MS_PER_CHAR * 8), alignment))
        for reply_id in self.voiced_out():
            del self.tts_unvoiced[reply_id]
            self.tts_finished.discard(reply_id)
            self.feed(TtsDone(self.now, reply_id))

    @rule(role=st.sampled_from(ProviderRole))
    @precondition(live)
    def provider_fails_for_good(self, role: ProviderRole) -> None:
        self.feed(ProviderFailed(self.now, role, "refused"))

    # -- the end -------------------------------------------------------------------------------------

    @rule(reason=st.sampled_from(["stop", "closed", "shutdown"]))
    @precondition(live)
    def hang_up(self, reason: str) -> None:
        self.feed(CallEnded(self.now, reason))  # type: ignore[arg-type]
        assert self.saved

    @rule(late=st.sampled_from(["audio", "mark", "text", "voice"]))
    @precondition(lambda self: self.saved)
    def late_events_after_the_end(self, late: str) -> None:
        """Provider events still arrive after a hang-up; the engine answers them with nothing."""
        assert self.engine is not None
        event: Event = {
            "audio": CallerAudio(self.now, SPEECH[0]),
            "mark": MarkPlayed(self.now, "r1.1"),
            "text": LlmText(self.now, "r1", "late"),
            "voice": TtsAudio(self.now, "r1", b"\x7f" * 160),
        }[late]
        assert self.engine.handle(event) == []

    def teardown(self) -> None:
        if self.live():
            self.hang_up("stop")

    # -- invariants ----------------------------------------------------------------------------------

    @invariant()
    def at_most_one_model_stream(self) -> None:
        assert len(self.llm_open) <= 1, f"two model streams open: {sorted(self.llm_open)}"

    @invariant()
    def history_alternates(self) -> None:
        if self.engine is None:
            return
        history = self.engine.history
        assert Role.SYSTEM not in [message.role for message in history]
        turns: list[Role] = []
        for index, message in enumerate(history):
            if message.tool_calls:  # its results follow at once, one per call
                results = history[index + 1 : index + 1 + len(message.tool_calls)]
                assert [r.tool_call_id for r in results] == [c.id for c in message.tool_calls], history
            if message.role is Role.TOOL:
                previous = history[index - 1]
                assert previous.role is Role.TOOL or previous.tool_calls, history
                continue
            if (
                message.role is Role.ASSISTANT
                and turns
                and turns[-1] is Role.ASSISTANT
                and _after_tools(history, index)
            ):
                continue  # what the agent said after its tools is the same turn
            turns.append(message.role)
        assert all(a is not b for a, b in itertools.pairwise(turns)), [m.role for m in history]

    @invariant()
    def agent_and_reply_agree(self) -> None:
        engine = self.engine
        if engine is None:
            return
        reply = engine._reply
        state = engine.agent_state
        if state in (AgentState.IDLE, AgentState.ENDED):
            assert reply is None
        else:
            assert reply is not None
            assert reply.playback.held == (state in (AgentState.HOLDING, AgentState.STOPPED))
            if state is not AgentState.STOPPED:
                assert (reply.playback.first_audio_at_ms is not None) == (state is AgentState.SPEAKING)
        assert (engine._stop is not None) == (state is AgentState.STOPPED)
        assert (engine.phase.state is CallPhase.ENDED) == self.saved


ConversationModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestConversationModel = ConversationModel.TestCase


def _after_tools(history: list[ChatMessage], index: int) -> bool:
    """The message at `index` comes right after a tool result."""
    return index > 0 and history[index - 1].role is Role.TOOL
