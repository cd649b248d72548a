"""Every state machine of the conversation engine, as data: states, triggers and transition tables.

Rules of this file
==================
1. A machine's whole behaviour is its table: `{state: {trigger: next state}}`. Code elsewhere decides
   *when* a trigger fires; only the table decides *where it leads*. A trigger the table does not
   allow in the current state raises `ConversationError`, which names the machine, the state and
   the trigger: it is a bug in the engine's guards, never a caller's or a provider's fault.
2. No clock, no I/O, no actions here. `core/engine/conversation.py` fires triggers and returns actions.
3. Every machine but the per-reply one can end from any live state (`CALL_ENDED`), because a call
   can end at any moment (DESIGN.md section 2, rule 10).

Theory of operation
===================
6 machines. Yes, 6. (The voice activity detector in `core/audio.py` is a seventh, but it belongs to the
audio, not to the conversation, and the engine only reads its verdicts.)

* **Caller** (one per call): SILENT (no turn open) -> SPEAKING <-> PAUSED -> SILENT. A turn opens with
  speech, a key, or words the detector missed, and closes when a pause reaches the silence threshold
  (rule 1).
* **Agent** (one per call): IDLE -> HOLDING (a speculative reply whose audio is held back, rule 7) ->
  THINKING (committed, no audio out yet) -> SPEAKING (until the reply's last mark is echoed, rule 3)
  -> IDLE. Barge-in (rule 4) is THINKING or SPEAKING -> STOPPED: playback cleared, the reply kept
  alive; then CONFIRMED -> IDLE (a real interruption) or RESUME -> SPEAKING (or THINKING, if nothing
  had played yet) when it was a cough, a click or an "mm-hm". The caller going on sends HOLDING -> IDLE.
* **Call phase** (one per call, DESIGN.md section 2): OPENING -> CONVERSING -> CLOSING -> ENDED. An
  inbound call is CONVERSING from `start`; CLOSING is where the last words play out to their last mark
  (nothing the caller says starts a reply any more), after which the engine asks for the call's end.
  Hang-up, transfer, idle, the duration cap and a dead provider all close this way. A closing the
  model chose (`end_call`, `transfer_call`, or the idle goodbye) is CALLED_OFF back to CONVERSING when
  the caller really interrupts it: they are still there and have something to say.
* **STT flush** (one per call): IDLE -> PENDING (`Finalize` sent, Deepgram's `from_finalize` answer not
  yet in) -> FLUSHED when it answers, or when `finalize_wait_ms` pass without an answer (GAVE_UP:
  Deepgram does not promise one when little audio is pending); any new caller activity RESETs it.
  Speculation waits for FLUSHED, so it answers every word said so far (rule 7); words that still come
  later drop the speculation.
* **Hearing** (one per call): OPEN -> DEAF when the agent takes the floor; DEAF -> OPEN when it gives the
  floor back (its reply finished, or the caller barged in); OPEN -> DEAF again, from the same start,
  when a barge-in turns out to be a cough and the agent resumes. Words said while DEAF are discarded
  (rule 5); the window's bounds are on the audio clock, so late transcripts are judged by when they
  were said.
* **Reply streams** (one per reply): WRITING (the model streams text to the voice) -> VOICING (all text
  sent, the voice's last audio on its way) -> VOICED; or CANCELLED. A greeting starts VOICING: it has
  no model. A model that asks for tools sends WRITING -> AWAITING_TOOLS (its voice stays open, what it
  said so far plays on) -> WRITING again when every result is in and its next round starts
  (DESIGN.md section 2b): one reply, one voice context, however many tool rounds.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

# -- caller (rule 1) ---------------------------------------------------------------------------------


class CallerState(enum.Enum):
    SILENT = "SILENT"
    SPEAKING = "SPEAKING"
    PAUSED = "PAUSED"
    ENDED = "ENDED"


class CallerTrigger(enum.Enum):
    SPEECH_STARTED = "speech_started"
    SPEECH_ENDED = "speech_ended"
    WORDS_HEARD = "words_heard"
    KEY_PRESSED = "key_pressed"
    TURN_ENDED = "turn_ended"
    SOUND_DISMISSED = "sound_dismissed"
    CALL_ENDED = "call_ended"


# -- agent (rules 3, 4, 7, 8) ------------------------------------------------------------------------


class AgentState(enum.Enum):
    IDLE = "IDLE"
    HOLDING = "HOLDING"
    THINKING = "THINKING"
    SPEAKING = "SPEAKING"
    STOPPED = "STOPPED"
    ENDED = "ENDED"


class AgentTrigger(enum.Enum):
    SAY = "say"  # a line whose words are known: the greeting, an apology, the goodbye
    SPECULATE = "speculate"
    ANSWER = "answer"
    CALLER_RESUMED = "caller_resumed"
    RELEASE = "release"
    FIRST_AUDIO = "first_audio"
    CALLER_INTERRUPTED = "caller_interrupted"
    REPLY_FINISHED = "reply_finished"
    BARGE_IN = "barge_in"
    CONFIRMED = "confirmed"
    RESUME = "resume"
    RESUME_BEFORE_AUDIO = "resume_before_audio"
    CALL_ENDED = "call_ended"


# -- call phase (section 2) --------------------------------------------------------------------------


class CallPhase(enum.Enum):
    OPENING = "OPENING"
    CONVERSING = "CONVERSING"
    CLOSING = "CLOSING"
    ENDED = "ENDED"


class PhaseTrigger(enum.Enum):
    ANSWERED = "answered"
    CLOSE = "close"
    CALLED_OFF = "called_off"
    CALL_ENDED = "call_ended"


# -- STT flush (rules 1 and 7) -----------------------------------------------------------------------


class FlushState(enum.Enum):
    IDLE = "IDLE"
    PENDING = "PENDING"
    FLUSHED = "FLUSHED"


class FlushTrigger(enum.Enum):
    FINALIZE_SENT = "finalize_sent"
    FLUSHED = "flushed"
    GAVE_UP = "gave_up"
    RESET = "reset"


# -- hearing (rule 5) --------------------------------------------------------------------------------


class HearingState(enum.Enum):
    OPEN = "OPEN"
    DEAF = "DEAF"


class HearingTrigger(enum.Enum):
    AGENT_TOOK_FLOOR = "agent_took_floor"
    LISTEN_AGAIN = "listen_again"
    AGENT_RESUMED = "agent_resumed"


# -- reply streams (one per reply) -------------------------------------------------------------------


class StreamsState(enum.Enum):
    WRITING = "WRITING"
    AWAITING_TOOLS = "AWAITING_TOOLS"
    VOICING = "VOICING"
    VOICED = "VOICED"
    CANCELLED = "CANCELLED"


class StreamsTrigger(enum.Enum):
    TOOLS_CALLED = "tools_called"
    RESULTS_IN = "results_in"
    TEXT_DONE = "text_done"
    VOICE_DONE = "voice_done"
    CANCEL = "cancel"


C, CT = CallerState, CallerTrigger
A, AT = AgentState, AgentTrigger
P, PT = CallPhase, PhaseTrigger
F, FT = FlushState, FlushTrigger
H, HT = HearingState, HearingTrigger
R, RT = StreamsState, StreamsTrigger

CALLER_TRANSITIONS: dict[CallerState, dict[CallerTrigger, CallerState]] = {
    C.SILENT: {
        CT.SPEECH_STARTED: C.SPEAKING,
        CT.WORDS_HEARD: C.PAUSED,
        CT.KEY_PRESSED: C.PAUSED,
        CT.SOUND_DISMISSED: C.SILENT,
        CT.CALL_ENDED: C.ENDED,
    },
    C.SPEAKING: {
        CT.SPEECH_ENDED: C.PAUSED,
        CT.WORDS_HEARD: C.SPEAKING,
        CT.KEY_PRESSED: C.SPEAKING,
        CT.SOUND_DISMISSED: C.SILENT,
        CT.CALL_ENDED: C.ENDED,
    },
    C.PAUSED: {
        CT.SPEECH_STARTED: C.SPEAKING,
        CT.WORDS_HEARD: C.PAUSED,
        CT.KEY_PRESSED: C.PAUSED,
        CT.TURN_ENDED: C.SILENT,
        CT.SOUND_DISMISSED: C.SILENT,
        CT.CALL_ENDED: C.ENDED,
    },
    C.ENDED: {},
}

AGENT_TRANSITIONS: dict[AgentState, dict[AgentTrigger, AgentState]] = {
    A.IDLE: {AT.SAY: A.THINKING, AT.SPECULATE: A.HOLDING, AT.ANSWER: A.THINKING, AT.CALL_ENDED: A.ENDED},
    A.HOLDING: {AT.CALLER_RESUMED: A.IDLE, AT.RELEASE: A.THINKING, AT.CALL_ENDED: A.ENDED},
    A.THINKING: {
        AT.FIRST_AUDIO: A.SPEAKING,
        AT.CALLER_INTERRUPTED: A.IDLE,
        AT.BARGE_IN: A.STOPPED,
        AT.REPLY_FINISHED: A.IDLE,
        AT.CALL_ENDED: A.ENDED,
    },
    A.SPEAKING: {AT.REPLY_FINISHED: A.IDLE, AT.BARGE_IN: A.STOPPED, AT.CALL_ENDED: A.ENDED},
    A.STOPPED: {
        AT.CONFIRMED: A.IDLE,
        AT.RESUME: A.SPEAKING,
        AT.RESUME_BEFORE_AUDIO: A.THINKING,
        AT.CALL_ENDED: A.ENDED,
    },
    A.ENDED: {},
}

PHASE_TRANSITIONS: dict[CallPhase, dict[PhaseTrigger, CallPhase]] = {
    P.OPENING: {PT.ANSWERED: P.CONVERSING, PT.CALL_ENDED: P.ENDED},
    P.CONVERSING: {PT.CLOSE: P.CLOSING, PT.CALL_ENDED: P.ENDED},
    P.CLOSING: {PT.CALLED_OFF: P.CONVERSING, PT.CALL_ENDED: P.ENDED},
    P.ENDED: {},
}

FLUSH_TRANSITIONS: dict[FlushState, dict[FlushTrigger, FlushState]] = {
    F.IDLE: {FT.FINALIZE_SENT: F.PENDING, FT.RESET: F.IDLE},
    F.PENDING: {FT.FLUSHED: F.FLUSHED, FT.GAVE_UP: F.FLUSHED, FT.RESET: F.IDLE},
    F.FLUSHED: {FT.RESET: F.IDLE},
}

HEARING_TRANSITIONS: dict[HearingState, dict[HearingTrigger, HearingState]] = {
    H.OPEN: {HT.AGENT_TOOK_FLOOR: H.DEAF, HT.LISTEN_AGAIN: H.OPEN, HT.AGENT_RESUMED: H.DEAF},
    H.DEAF: {HT.AGENT_TOOK_FLOOR: H.DEAF, HT.LISTEN_AGAIN: H.OPEN},
}

STREAMS_TRANSITIONS: dict[StreamsState, dict[StreamsTrigger, StreamsState]] = {
    # The voice can end while the model still writes: ElevenLabs failed for good (TtsFailed).
    R.WRITING: {
        RT.TOOLS_CALLED: R.AWAITING_TOOLS,
        RT.TEXT_DONE: R.VOICING,
        RT.VOICE_DONE: R.VOICED,
        RT.CANCEL: R.CANCELLED,
    },
    R.AWAITING_TOOLS: {
        RT.RESULTS_IN: R.WRITING,
        RT.TEXT_DONE: R.VOICING,
        RT.VOICE_DONE: R.VOICED,
        RT.CANCEL: R.CANCELLED,
    },
    R.VOICING: {RT.VOICE_DONE: R.VOICED, RT.CANCEL: R.CANCELLED},
    R.VOICED: {},
    R.CANCELLED: {},
}


class ConversationError(Exception):
    """A trigger fired in a state whose table does not allow it: a bug in the engine's guards."""

    def __init__(self, machine: str, state: enum.Enum, trigger: enum.Enum) -> None:
        self.machine, self.state, self.trigger = machine, state, trigger
        super().__init__(f"the {machine} cannot {trigger.value!r} while {state.value}")


S = TypeVar("S", bound=enum.Enum)
T = TypeVar("T", bound=enum.Enum)


class Machine(Generic[S, T]):
    """One machine: its name (for errors), its table, and where it is now."""

    __slots__ = ("name", "state", "table")

    def __init__(self, name: str, table: Mapping[S, Mapping[T, S]], initial: S) -> None:
        self.name = name
        self.table = table
        self.state = initial

    def fire(self, trigger: T) -> S:
        try:
            self.state = self.table[self.state][trigger]
        except KeyError:
            raise ConversationError(self.name, self.state, trigger) from None
        return self.state


class Hearing:
    """Rule 5's windows: words said while the agent held the floor, [from, to) on the audio clock, do
    not count. Past windows are kept for a while: Deepgram's words can arrive after the agent has given
    the floor back and taken it again (a reply nobody heard, then an apology at once)."""

    __slots__ = ("machine", "windows")
    MEMORY_MS = 30_000  # no transcript comes this late

    def __init__(self) -> None:
        self.machine: Machine[HearingState, HearingTrigger] = Machine("hearing", HEARING_TRANSITIONS, H.OPEN)
        self.windows: list[list[float]] = []  # [from, to); the last one is open (to = inf) while DEAF

    def agent_took_floor(self, now_ms: int) -> None:
        # Already deaf (a reply restarted with late words): the floor was taken when it first was, and
        # moving the window's start would let words said in between count as a new turn.
        if self.machine.state is H.OPEN:
            self.windows = [w for w in self.windows if w[1] > now_ms - self.MEMORY_MS]
            self.windows.append([now_ms, float("inf")])
        self.machine.fire(HT.AGENT_TOOK_FLOOR)

    def listen_again(self, from_ms: float) -> None:
        """The agent gives the floor back: words said from `from_ms` count (it moves the last window's end)."""
        self.machine.fire(HT.LISTEN_AGAIN)
        if self.windows:
            self.windows[-1][1] = from_ms

    def agent_resumed(self) -> None:
        """The floor is the agent's again as if never given up: the last window reopens."""
        self.machine.fire(HT.AGENT_RESUMED)
        if self.windows:
            self.windows[-1][1] = float("inf")

    def hears(self, said_at_ms: float) -> bool:
        return not any(start <= said_at_ms < end for start, end in self.windows)
