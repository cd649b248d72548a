"""One reply, and the bookkeeping of what the caller has heard of it.

A `Reply` is what the agent is saying: its id, what kind of reply it is, the caller words it answers,
the text the model has written, and its streams machine (`core/engine/machines.py`). Its `Playback`
is the ledger of its audio on the caller's line (DESIGN.md section 2, rules 3 and 6):

* Audio is cut where a sentence ends (from ElevenLabs' alignment) so every sentence has a mark, and
  each mark is named `<reply id>.<n>` and remembers how much of the reply's audio precedes it.
* While the reply is held (a speculation, rule 7) its audio and marks wait here, and go out in order
  when it is released.
* Twilio echoes a mark when playback reaches it, and echoes *every* pending mark when it clears; the
  engine drops a cleared reply before those echoes arrive, so only marks that really played move
  `played_ms`.
* What was heard of an interrupted reply is the text up to the playback position: by alignment where
  ElevenLabs sent it, else in proportion to the audio played; never a half-heard word.
* A reply has been heard out when its voice is done and its last mark was played: `heard_out`.
* A barge-in stops playback (rule 4) but keeps the reply: all its audio stays here, and if the
  interruption was a cough it is played again from the start of the word the caller was hearing,
  with new marks (the old ones, echoed by the clear, name nothing any more).
"""

from __future__ import annotations

import dataclasses
import itertools

from core.audio import SAMPLE_RATE
from core.engine.machines import STREAMS_TRANSITIONS, Machine, StreamsState, StreamsTrigger
from core.events import AlignedChar
from core.records import ChatMessage, ReplyKind, Role, ToolCall, ToolUse

_SENTENCE_ENDS = frozenset(".!?")


class Playback:
    __slots__ = (
        "aligned",
        "audio",
        "audio_ms",
        "first_audio_at_ms",
        "held",
        "held_audio",
        "mark_count",
        "mark_offsets",
        "played_mark_at_ms",
        "played_ms",
        "reply_id",
        "schedule",
    )

    def __init__(self, reply_id: str, *, held: bool) -> None:
        self.reply_id = reply_id
        self.held = held
        self.held_audio: list[tuple[bytes, str]] = []
        self.audio_ms = 0.0  # of audio received from the voice
        self.mark_count = 0
        self.mark_offsets: dict[str, float] = {}  # mark name -> reply audio before it, ms
        self.played_ms = 0.0  # reply audio before the last mark really played
        self.played_mark_at_ms: int | None = None  # when that mark was echoed
        self.first_audio_at_ms: int | None = None  # when the first audio went to the caller
        self.aligned: list[tuple[float, float, str]] = []  # (start, end, char), reply time
        self.audio: list[tuple[float, bytes]] = []  # every piece of the reply's audio, at its reply time
        # (audio-clock time it starts playing, reply time it starts at, duration) of every piece sent
        self.schedule: list[tuple[float, float, float]] = []

    @property
    def has_audio(self) -> bool:
        return self.mark_count > 0

    @property
    def played_through(self) -> bool:
        """The last mark so far was echoed as played: the caller heard all the audio received."""
        return self.played_mark_at_ms is not None and self.played_ms >= self.audio_ms

    def add_audio(self, ulaw: bytes, alignment: list[AlignedChar] | None) -> list[tuple[bytes, str]]:
        """New audio from the voice, cut at sentence ends and marked: the pieces to play now (none if held)."""
        chunk_start = self.audio_ms
        if alignment:
            self.aligned.extend(
                (chunk_start + c.start_ms, chunk_start + c.start_ms + c.duration_ms, c.char) for c in alignment
            )
        pieces: list[tuple[bytes, str]] = []
        for piece in _split_at_sentences(ulaw, alignment):
            self.audio.append((self.audio_ms, piece))
            self.audio_ms += len(piece) * 1000 / SAMPLE_RATE
            pieces.append((piece, self._new_mark(self.audio_ms)))
        if self.held:
            self.held_audio.extend(pieces)
            return []
        return pieces

    def _new_mark(self, offset_ms: float) -> str:
        self.mark_count += 1
        name = f"{self.reply_id}.{self.mark_count}"
        self.mark_offsets[name] = offset_ms
        return name

    def release(self) -> list[tuple[bytes, str]]:
        """The speculation is committed: everything held goes out now, in order."""
        self.held = False
        held, self.held_audio = self.held_audio, []
        return held

    def sent(self, mark: str, ulaw: bytes, plays_at_ms: float, now_ms: int) -> bool:
        """A piece went to the caller; it plays from `plays_at_ms` (after what is queued before it).
        True for the reply's first audio."""
        duration = len(ulaw) * 1000 / SAMPLE_RATE
        self.schedule.append((plays_at_ms, self.mark_offsets[mark] - duration, duration))
        if self.first_audio_at_ms is not None:
            return False
        self.first_audio_at_ms = now_ms
        return True

    def mark_played(self, name: str, at_ms: int) -> bool:
        """Twilio echoed one of this reply's marks; False for a name this reply never placed."""
        offset = self.mark_offsets.get(name)
        if offset is None:
            return False
        self.played_ms = max(self.played_ms, offset)
        self.played_mark_at_ms = at_ms
        return True

    def mark_ending_what_plays(self, now_ms: int) -> str | None:
        """The first mark at or after the playback position (the end of the sentence being heard, as
        audio is cut and marked at sentence ends), or None when playback has reached all audio sent."""
        position = self._position(now_ms)
        return next((name for name, offset in self.mark_offsets.items() if offset > position), None)

    def _position(self, now_ms: int) -> float:
        """How far into the reply's audio the caller's playback is at `now_ms`: where the schedule of
        what was sent says it is, but never past the last echoed mark plus the time since (Twilio may
        play later than sent) and never before that mark (it was heard)."""
        estimate = 0.0
        for plays_at, offset, duration in reversed(self.schedule):
            if plays_at <= now_ms:
                estimate = offset + min(duration, now_ms - plays_at)
                break
        if self.played_mark_at_ms is not None:
            estimate = max(self.played_ms, min(estimate, self.played_ms + (now_ms - self.played_mark_at_ms)))
        return min(estimate, self.audio_ms)

    def _word_being_heard(self, text: str, now_ms: int) -> tuple[str, float]:
        """The text heard before the word being heard at `now_ms`, and where that word starts."""
        played = self._position(now_ms)
        if self.aligned:
            index = next((i for i, (_, end, _) in enumerate(self.aligned) if end > played), len(self.aligned))
            if index == len(self.aligned):
                return "".join(char for _, _, char in self.aligned), self.audio_ms
            if not self.aligned[index][2].isspace():
                while index > 0 and not self.aligned[index - 1][2].isspace():
                    index -= 1  # no half-heard word: back to its start
            return "".join(char for _, _, char in self.aligned[:index]), self.aligned[index][0]
        if self.audio_ms <= 0 or not text:
            return "", 0.0
        cut = int(len(text) * played / self.audio_ms)
        if cut >= len(text):
            return text, self.audio_ms
        if not text[cut].isspace():
            while cut > 0 and not text[cut - 1].isspace():
                cut -= 1
        return text[:cut], cut / len(text) * self.audio_ms

    def heard_text(self, text: str, now_ms: int) -> str:
        """What the caller heard of `text` if playback stops at `now_ms` (rule 6): never a half-heard word."""
        if self.first_audio_at_ms is None:
            return ""
        return self._word_being_heard(text, now_ms)[0].strip()

    def stop(self, text: str, now_ms: int) -> float:
        """Playback was cleared at `now_ms` (rule 4): hold what comes next, forget the marks the clear
        echoes, and return where a resume starts (the start of the word being heard)."""
        resume_at = self._word_being_heard(text, now_ms)[1] if self.first_audio_at_ms is not None else 0.0
        self.held = True
        self.mark_offsets.clear()
        # What was queued behind the clear never played.
        self.schedule = [
            (plays_at, offset, min(duration, now_ms - plays_at))
            for plays_at, offset, duration in self.schedule
            if plays_at < now_ms
        ]
        return resume_at

    def resume_from(self, offset_ms: float, now_ms: int) -> list[tuple[bytes, str]]:
        """Play the reply again from `offset_ms` of its audio, starting now: the pieces, newly marked."""
        self.held = False
        self.held_audio = []
        pieces: list[tuple[bytes, str]] = []
        for start, piece in self.audio:
            end = start + len(piece) * 1000 / SAMPLE_RATE
            if end <= offset_ms:
                continue
            if start < offset_ms:
                piece = piece[int((offset_ms - start) * SAMPLE_RATE / 1000) :]
            if piece:
                pieces.append((piece, self._new_mark(end)))
        self.played_ms, self.played_mark_at_ms = offset_ms, now_ms
        return pieces


# A tool result not in yet when the history is written (DESIGN.md section 2b: every tool call is followed
# by its result, as OpenAI requires); the real one replaces it when it arrives.
PENDING_RESULT = '{"status": "pending", "note": "no answer yet; it will be added when it comes"}'


@dataclasses.dataclass
class ToolRound:
    """One round of tool calls inside a reply: where in its text the model asked, what, and the answers."""

    text_at: int  # len(reply.text) when the model asked
    calls: tuple[ToolCall, ...]
    asked_at_ms: int
    results: dict[str, str] = dataclasses.field(default_factory=dict)  # call id -> result
    filler_said: bool = False

    @property
    def answered(self) -> bool:
        return all(call.id in self.results for call in self.calls)

    def messages(self, said: str) -> list[ChatMessage]:
        """The assistant's tool calls (with what it said before them) and a result for each."""
        return [
            ChatMessage(Role.ASSISTANT, said, tool_calls=self.calls),
            *(ChatMessage(Role.TOOL, self.results.get(c.id, PENDING_RESULT), tool_call_id=c.id) for c in self.calls),
        ]

    def uses(self) -> tuple[ToolUse, ...]:
        return tuple(ToolUse(c.name, c.arguments, self.results.get(c.id, PENDING_RESULT), c.id) for c in self.calls)


@dataclasses.dataclass
class Reply:
    """What the agent is saying now, and the caller's words it answers."""

    id: str
    kind: ReplyKind
    caller_segments: list[tuple[int, str]]
    speech_end_ms: int | None  # end of the caller speech it answers (the reply latency's start)
    started_at_ms: int
    streams: Machine[StreamsState, StreamsTrigger]
    playback: Playback
    text: str = ""
    attempts: int = 1
    first_text_at_ms: int | None = None
    rounds: list[ToolRound] = dataclasses.field(default_factory=list)
    parked_calls: tuple[ToolCall, ...] = ()  # asked for while held (rule 7): nothing runs before release
    note: str | None = None  # a system message for the model with this reply (why the agent is back)
    last_mark: str | None = None  # playback stops at this mark (rule 12: the sentence being said, no more)

    def messages_after(self, text: str) -> list[ChatMessage]:
        """The reply as messages, its `text` (all of it, or what was heard) cut where each tool round
        was asked for: the rounds' calls and results, then what was said after the last one."""
        messages: list[ChatMessage] = []
        said_from = 0
        for tool_round in self.rounds:
            cut = min(len(text), tool_round.text_at)
            messages.extend(tool_round.messages(text[said_from:cut].strip()))
            said_from = max(said_from, cut)
        rest = text[said_from:].strip()
        if rest:
            messages.append(ChatMessage(Role.ASSISTANT, rest))
        return messages

    @classmethod
    def create(
        cls,
        reply_id: str,
        kind: ReplyKind,
        *,
        caller_segments: list[tuple[int, str]],
        speech_end_ms: int | None,
        now_ms: int,
        held: bool = False,
        text: str = "",
    ) -> Reply:
        initial = StreamsState.WRITING if kind is ReplyKind.ANSWER else StreamsState.VOICING
        return cls(
            id=reply_id,
            kind=kind,
            caller_segments=list(caller_segments),
            speech_end_ms=speech_end_ms,
            started_at_ms=now_ms,
            streams=Machine(f"reply {reply_id}'s streams", STREAMS_TRANSITIONS, initial),
            playback=Playback(reply_id, held=held),
            text=text,
        )

    @property
    def caller_text(self) -> str:
        return join_segments(self.caller_segments)

    @property
    def writing(self) -> bool:
        return self.streams.state is StreamsState.WRITING

    @property
    def awaiting_tools(self) -> bool:
        return self.streams.state is StreamsState.AWAITING_TOOLS

    def round_of(self, call_id: str) -> ToolRound | None:
        return next((r for r in self.rounds if any(c.id == call_id for c in r.calls)), None)

    @property
    def heard_out(self) -> bool:
        """Rule 3: the voice is done and the caller heard the last of it (or there was nothing to hear)."""
        playback = self.playback
        return (
            self.streams.state is StreamsState.VOICED
            and not playback.held
            and (not playback.has_audio or playback.played_through)
        )


def join_segments(segments: list[tuple[int, str]]) -> str:
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
