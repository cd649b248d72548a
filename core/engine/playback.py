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
"""

from __future__ import annotations

import dataclasses
import itertools

from core.audio import SAMPLE_RATE
from core.engine.machines import STREAMS_TRANSITIONS, Machine, StreamsState, StreamsTrigger
from core.events import AlignedChar
from core.records import ReplyKind

_SENTENCE_ENDS = frozenset(".!?")


class Playback:
    __slots__ = (
        "aligned",
        "audio_ms",
        "first_audio_at_ms",
        "held",
        "held_audio",
        "mark_count",
        "mark_offsets",
        "played_mark_at_ms",
        "played_ms",
        "reply_id",
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
            self.audio_ms += len(piece) * 1000 / SAMPLE_RATE
            self.mark_count += 1
            name = f"{self.reply_id}.{self.mark_count}"
            self.mark_offsets[name] = self.audio_ms
            pieces.append((piece, name))
        if self.held:
            self.held_audio.extend(pieces)
            return []
        return pieces

    def release(self) -> list[tuple[bytes, str]]:
        """The speculation is committed: everything held goes out now, in order."""
        self.held = False
        held, self.held_audio = self.held_audio, []
        return held

    def started_playing(self, now_ms: int) -> bool:
        """Note audio going out; True for the reply's first audio."""
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

    def heard_text(self, text: str, now_ms: int) -> str:
        """What the caller heard of `text` if playback stops at `now_ms` (rule 6)."""
        if self.first_audio_at_ms is None:
            return ""
        if self.played_mark_at_ms is not None:
            played = self.played_ms + (now_ms - self.played_mark_at_ms)
        else:
            played = now_ms - self.first_audio_at_ms
        played = min(played, self.audio_ms)
        if self.aligned:
            heard = [char for _, end, char in self.aligned if end <= played]
            unheard = [char for _, end, char in self.aligned if end > played]
            spoken, next_char = "".join(heard), (unheard[0] if unheard else "")
        else:
            cut = int(len(text) * played / self.audio_ms) if self.audio_ms > 0 else 0
            spoken, next_char = text[:cut], text[cut : cut + 1]
        if next_char and not next_char.isspace() and spoken and not spoken[-1].isspace():
            spoken = spoken.rsplit(" ", 1)[0] if " " in spoken else ""  # no half-heard word
        return spoken.strip()


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
