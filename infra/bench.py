"""`parley bench`: measurements for the README, never assertions.

The per-frame audio cost is measured here; the call-level figures (latency at the caller, CPU and
memory per live call) need the media service, emulators and simulated callers.
"""

from __future__ import annotations

import platform
import timeit
from pathlib import Path

from core.audio import VoiceActivityDetector, samples_to_ulaw, ulaw_to_samples
from infra.wav import read_ulaw

VOICES = Path(__file__).parent / "voices"


def frame_cost_us(repeats: int = 7, number: int = 20000) -> float:
    """Best-of-`repeats` cost of decode + detect + encode of one 20 ms µ-law frame, in µs."""
    frame = read_ulaw(VOICES / "hello.wav")[1600:1760]
    detector = VoiceActivityDetector()

    def one_frame() -> None:
        samples = ulaw_to_samples(frame)
        detector.process_samples(samples, 0)
        samples_to_ulaw(samples)

    return min(timeit.repeat(one_frame, number=number, repeat=repeats)) / number * 1e6


def report_frame_cost() -> None:
    print(f"machine: {platform.machine()}, Python {platform.python_version()}, {platform.processor() or '?'}")
    print(f"audio per 20 ms frame (decode + detect + encode): {frame_cost_us():.1f} µs")
