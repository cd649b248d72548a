"""The labelled barge-in corpus: what a caller does over the agent's reply, and whether it means to interrupt.

`parley bench --barge-in` plays each item over the agent's first answer, through the real media
service, and counts what the agent did (DESIGN.md section 5). Items that are not interruptions:
coughs, clicks and breaths (shaped noise), backchannels (espeak-ng), the agent's own voice echoed back
(-10/-20/-30 dB, 50-400 ms late: the simulated caller mixes it in for the whole call) and line noise
(likewise, from the start). Interruptions: "wait", "stop", "no, that's wrong", a new question.

The recordings are made once by `python -m infra.corpus` (espeak-ng from Debian, numpy for the noise,
fixed seeds) and committed under infra/voices/corpus, so the bench needs neither.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
import numpy.typing as npt

from core.audio import samples_to_ulaw
from infra.emulators.scenario import VOICES, Utterance
from infra.wav import write_ulaw

CORPUS = VOICES / "corpus"


class Kind(enum.StrEnum):
    INTERRUPTION = "interruption"
    BACKCHANNEL = "backchannel"
    COUGH = "cough"
    CLICK = "click"
    BREATH = "breath"
    ECHO = "echo"
    LINE_NOISE = "line noise"


@dataclasses.dataclass(frozen=True)
class Item:
    name: str
    kind: Kind
    transcript: str = ""  # what the Deepgram emulator gives for it ("" for no words)
    echo: tuple[int, float] | None = None  # (delay ms, gain dB): the agent's voice mixed back all call
    noise_dbfs: float | None = None  # stationary noise on the line all call

    @property
    def voice(self) -> str | None:
        """The recording played over the agent's reply (None: the item is the line itself)."""
        return None if self.kind in (Kind.ECHO, Kind.LINE_NOISE) else f"corpus/{self.name}"

    @property
    def should_interrupt(self) -> bool:
        return self.kind is Kind.INTERRUPTION

    def utterance(self) -> Utterance:
        return Utterance.recorded(self.voice, self.transcript) if self.voice else Utterance("", 0)


SPOKEN = {
    "wait": ("Wait.", Kind.INTERRUPTION),
    "stop": ("Stop.", Kind.INTERRUPTION),
    "no_wrong": ("No, that's wrong.", Kind.INTERRUPTION),
    "question": ("What about Friday instead?", Kind.INTERRUPTION),
    "mm_hm": ("Mm-hmm.", Kind.BACKCHANNEL),
    "uh_huh": ("Uh-huh.", Kind.BACKCHANNEL),
    "yeah": ("Yeah.", Kind.BACKCHANNEL),
    "okay": ("Okay.", Kind.BACKCHANNEL),
    "right": ("Right.", Kind.BACKCHANNEL),
}

ITEMS: tuple[Item, ...] = (
    *(Item(name, kind, text) for name, (text, kind) in SPOKEN.items()),
    *(Item(f"cough_{n}", Kind.COUGH) for n in (1, 2, 3)),
    *(Item(f"click_{n}", Kind.CLICK) for n in (1, 2)),
    *(Item(f"breath_{n}", Kind.BREATH) for n in (1, 2)),
    *(
        Item(f"echo_{-int(gain)}db_{delay}ms", Kind.ECHO, echo=(delay, gain))
        for gain in (-10.0, -20.0, -30.0)
        for delay in (50, 200, 400)
    ),
    Item("line_noise", Kind.LINE_NOISE, noise_dbfs=-42.0),
)


# -- making the recordings -------------------------------------------------------------------------


def _shaped_noise(rng: np.random.Generator, ms: int, low_hz: float, high_hz: float) -> npt.NDArray[np.float64]:
    """White noise band-limited to [low_hz, high_hz] (in the frequency domain), unit RMS."""
    samples = rng.normal(0, 1, ms * 8)
    spectrum = np.fft.rfft(samples)
    freqs = np.fft.rfftfreq(len(samples), 1 / 8000)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    shaped: npt.NDArray[np.float64] = np.fft.irfft(spectrum, len(samples))
    return shaped / (float(np.sqrt(np.mean(shaped**2))) or 1.0)


def cough(rng: np.random.Generator, ms: int, peak: float) -> npt.NDArray[np.float64]:
    """A burst: a fast attack, a noisy body that decays, most energy 300-2,500 Hz."""
    body = _shaped_noise(rng, ms, 300, 2500)
    t = np.arange(len(body)) / 8000
    envelope = np.minimum(1.0, t / 0.015) * np.exp(-t / (ms / 1000 / 2.5))
    shaped: npt.NDArray[np.float64] = body * envelope * peak
    return shaped


def click(rng: np.random.Generator, ms: int, peak: float) -> npt.NDArray[np.float64]:
    samples = np.zeros(200 * 8)
    burst = _shaped_noise(rng, ms, 500, 3500) * np.exp(-np.arange(ms * 8) / (ms * 2)) * peak
    samples[400 : 400 + len(burst)] = burst
    return samples


def breath(rng: np.random.Generator, ms: int, peak: float) -> npt.NDArray[np.float64]:
    """Soft, slow-swelling noise, mostly above 1 kHz."""
    body = _shaped_noise(rng, ms, 900, 3500)
    envelope = np.sin(np.linspace(0, np.pi, len(body))) ** 2
    shaped: npt.NDArray[np.float64] = body * envelope * peak
    return shaped


def _write(name: str, samples: npt.NDArray[np.float64]) -> None:
    write_ulaw(CORPUS / f"{name}.wav", samples_to_ulaw(np.clip(np.round(samples), -32768, 32767).astype(np.int16)))


def make() -> None:
    from infra.voices.make import synthesize  # espeak-ng: only when the recordings are made

    CORPUS.mkdir(exist_ok=True)
    for name, (text, _) in SPOKEN.items():
        write_ulaw(CORPUS / f"{name}.wav", synthesize(text))
    rng = np.random.default_rng(2026)
    for n, (ms, peak) in enumerate(((300, 9000), (450, 12000), (220, 7000)), start=1):
        _write(f"cough_{n}", cough(rng, ms, peak))
    for n, (ms, peak) in enumerate(((6, 14000), (12, 9000)), start=1):
        _write(f"click_{n}", click(rng, ms, peak))
    for n, (ms, peak) in enumerate(((500, 1500), (700, 2500)), start=1):
        _write(f"breath_{n}", breath(rng, ms, peak))
    for item in ITEMS:
        print(f"{item.name}: {item.kind}" + (f" {item.transcript!r}" if item.transcript else ""))


if __name__ == "__main__":
    make()
