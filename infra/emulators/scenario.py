"""What the emulators are scripted with: what the caller says, what the model answers, how fast and
how badly the providers behave.

The Deepgram emulator hears speech in the audio it receives and gives the n-th utterance it hears
the n-th caller text, placing the words in time over that utterance's known duration; the OpenAI
emulator answers the n-th caller turn with the n-th answer; the ElevenLabs emulator speaks any text
at `ms_per_char`. Latencies are those DESIGN.md section 5 measures against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from infra.wav import read_ulaw

VOICES = Path(__file__).parents[1] / "voices"


@dataclasses.dataclass(frozen=True)
class Utterance:
    text: str
    duration_ms: int
    voice: str | None = None  # the WAV file in infra/voices the simulated caller plays

    @classmethod
    def recorded(cls, name: str, text: str) -> Utterance:
        return cls(text, len(read_ulaw(VOICES / f"{name}.wav")) // 8, name)


@dataclasses.dataclass(frozen=True)
class Answer:
    """A model turn that uses a tool: `text`, then a call of `tool` with `arguments` when the request
    offers that tool; once the tool's result is in, the model goes on with `then`."""

    text: str
    tool: str
    arguments: Mapping[str, object]
    then: str = ""


@dataclasses.dataclass(frozen=True)
class Latency:
    stt_final_ms: int = 150  # after the end of speech
    llm_first_text_ms: int = 300
    llm_token_interval_ms: int = 10
    tts_first_audio_ms: int = 150
    # Deepgram processes audio at most this many times real time ("if you send a large buffer of
    # audio, the stream may wind up being significantly delayed"); None for tests that push audio
    # faster than a call would and do not measure catching up.
    deepgram_max_speed: float | None = 1.25


@dataclasses.dataclass(frozen=True)
class Faults:
    deepgram_drop_after_ms: int | None = None  # first socket of a call closes after this much audio
    deepgram_outage_ms: int = 0  # after that drop, the call's new sockets are refused (HTTP 503) this long
    # Whether Finalize with nothing pending gets a reply: Deepgram's documentation says one "is not
    # guaranteed if there is no significant amount of audio data", so by default it gets none.
    deepgram_answers_idle_finalize: bool = False
    deepgram_idle_timeout_s: float = 10.0
    elevenlabs_drop_after_chars: int | None = None  # first socket closes after voicing this much text
    elevenlabs_quota_exceeded: bool = False  # every socket answers text with an error and a 1008 close
    openai_fail_first: int = 0  # requests answered with `openai_fail_status` before any succeeds
    openai_fail_status: int = 500
    openai_midstream_error: bool = False
    openai_content_filter: bool = False  # the stream ends at once with finish_reason content_filter
    garbage: bool = False  # providers also send a malformed message now and then


@dataclasses.dataclass(frozen=True)
class Scenario:
    caller: tuple[Utterance, ...]
    answers: tuple[str | Answer, ...]
    latency: Latency = Latency()
    faults: Faults = Faults()
    ms_per_char: float = 55.0
    # Calls whose caller says something else, by CallSid (the Deepgram emulator reads the stream's tag).
    per_call: tuple[tuple[str, tuple[Utterance, ...]], ...] = ()
    deepgram_key: str = "dg-test-key"
    openai_key: str = "sk-test-key"
    elevenlabs_key: str = "el-test-key"

    def for_call(self, call_sid: str) -> Scenario:
        """The scenario as one call lives it: its own caller lines if it has any."""
        for sid, caller in self.per_call:
            if sid == call_sid:
                return dataclasses.replace(self, caller=caller, per_call=())
        return self

    def caller_text(self, index: int) -> Utterance | None:
        return self.caller[index] if index < len(self.caller) else None

    # What the model says when it speaks first after a transfer nobody answered (told so by a system message).
    back_from_transfer: str = "I'm sorry, nobody could take your call just now. Is there anything I can do?"

    def answer(self, turn: int) -> str | Answer:
        return self.answers[min(turn, len(self.answers) - 1)] if self.answers else ""


def demo_scenario(**changes: object) -> Scenario:
    """The call `make demo` runs: a turn with a short pause inside, a reply, a barge-in, goodbye."""
    scenario = Scenario(
        caller=(
            Utterance.recorded("book_table", "Hi, I would like to book a table for two."),
            Utterance.recorded("tomorrow", "Tomorrow at seven, please."),
            Utterance.recorded("actually", "Actually, wait, make it four people."),
            Utterance.recorded("goodbye", "Thank you, goodbye."),
        ),
        answers=(
            "Of course! A table for two, tomorrow at seven. Could I have a name for the booking, please? "
            "We also have a lovely terrace if the weather is nice.",
            "No problem, four people it is. Anything else I can do for you?",
            "You're welcome. Goodbye!",
        ),
    )
    return dataclasses.replace(scenario, **changes)  # type: ignore[arg-type]


def demo_call_scenario() -> Scenario:
    """`make demo`'s call: the demo's lines, with the agent checking availability with the team's tool
    before it answers, and ending the call itself after the caller's goodbye."""
    demo = demo_scenario()
    check = Answer(
        "Let me check that for you.",
        "check_availability",
        {"people": 2, "day": "tomorrow", "time": "19:00"},
        then=str(demo.answers[0]).replace("Of course! A table for two", "Good news, a table for two is free"),
    )
    goodbye = Answer("You're welcome. Goodbye!", "end_call", {"reason": "the caller said goodbye"})
    return dataclasses.replace(demo, answers=(check, demo.answers[1], goodbye))


def bench_scenario() -> Scenario:
    """The benchmark's call: a turn, a reply cut in on, a second turn and its reply."""
    demo = demo_scenario()
    caller, answers = (demo.caller[0], demo.caller[2]), (demo.answers[0], demo.answers[1])
    return dataclasses.replace(demo, caller=caller, answers=answers)


CORPUS_ROUNDS = 5


def corpus_call_sid(round_number: int, item: int) -> str:
    return f"CA{round_number:016x}{item:016x}"


def barge_in_scenario() -> Scenario:
    """`parley bench --barge-in`: each call says "book a table", then its corpus item over the long answer."""
    from infra.corpus import ITEMS

    demo = demo_scenario()
    per_call = tuple(
        (corpus_call_sid(round_number, n), (demo.caller[0], item.utterance()))
        for round_number in range(CORPUS_ROUNDS)
        for n, item in enumerate(ITEMS)
    )
    return dataclasses.replace(demo, caller=(demo.caller[0],), per_call=per_call)


def _control(*caller: Utterance, answers: tuple[str | Answer, ...]) -> Scenario:
    return dataclasses.replace(demo_scenario(), caller=caller, answers=answers)


def hangup_scenario() -> Scenario:
    """`parley bench --call-control`: the caller says goodbye, the agent ends the call."""
    goodbye = Utterance.recorded("goodbye", "Thank you, goodbye.")
    return _control(goodbye, answers=(Answer("Thank you for calling. Goodbye!", "end_call", {"reason": "done"}),))


def transfer_scenario() -> Scenario:
    """`parley bench --call-control`: the caller asks for a table, the agent transfers to support."""
    book = Utterance.recorded("book_table", "Hi, I would like to book a table for two.")
    arguments = {"destination": "support", "summary": "wants a table for two"}
    transfer = Answer("Let me put you through to our reservations team.", "transfer_call", arguments)
    return _control(book, answers=(transfer,))


def lost_stream_scenario() -> Scenario:
    """`parley bench --call-control`: two turns, the media task killed between them."""
    book = Utterance.recorded("book_table", "Hi, I would like to book a table for two.")
    tomorrow = Utterance.recorded("tomorrow", "Tomorrow at seven, please.")
    return _control(book, tomorrow, answers=("For when?", "Done, see you then."))


SCENARIOS = {
    "demo": demo_call_scenario,
    "bench": bench_scenario,
    "barge-in": barge_in_scenario,
    "hangup": hangup_scenario,
    "transfer": transfer_scenario,
    "lost-stream": lost_stream_scenario,
}
