"""Regenerate the caller's recorded utterances: espeak-ng speech as 8 kHz µ-law WAV.

Run by hand (`python -m infra.voices.make`) when the list changes; the WAV files are committed so
tests and the demo need neither espeak-ng nor a resampler. Needs espeak-ng (Debian) and soxr.
"""

from __future__ import annotations

import io
import subprocess
import wave
from pathlib import Path

import numpy as np
import soxr

from core.audio import samples_to_ulaw
from infra.wav import write_ulaw

UTTERANCES = {
    "book_table": "Hi, I would like to book a table for two.",
    "tomorrow": "Tomorrow at seven, please.",
    "actually": "Actually, wait, make it four people.",
    "goodbye": "Thank you, goodbye.",
    "yes": "Yes.",
    "hello": "Hello there, is anybody listening?",
}


def synthesize(text: str, voice: str = "en-us", speed: int = 165) -> bytes:
    wav_bytes = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], check=True, capture_output=True
    ).stdout
    with wave.open(io.BytesIO(wav_bytes)) as source:
        rate = source.getframerate()
        samples = np.frombuffer(source.readframes(source.getnframes()), "<i2").astype(np.float64)
    resampled = soxr.resample(samples, rate, 8000, quality="HQ")
    # Trim espeak's leading/trailing near-silence so a file's edges are its speech's edges.
    loud = np.flatnonzero(np.abs(resampled) > 300)
    trimmed = resampled[loud[0] : loud[-1] + 1] if loud.size else resampled
    return samples_to_ulaw(np.clip(np.round(trimmed * 0.7), -32768, 32767).astype(np.int16))


def main() -> None:
    here = Path(__file__).parent
    for name, text in UTTERANCES.items():
        write_ulaw(here / f"{name}.wav", synthesize(text))
        print(f"{name}.wav: {text}")


if __name__ == "__main__":
    main()
