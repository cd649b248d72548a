"""Telephone audio: G.711 µ-law, decimation to 8 kHz, and a voice-activity detector.

Everything here runs once per 20 ms frame of every live call, so it is numpy table look-ups and
short vector operations, with no per-sample Python. `audioop` is gone in Python 3.13; the µ-law
tables below are built to be bit-exact with it (`lin2ulaw` is CPython's 14-bit variant, not the
classic 16-bit g711.c, which differs by one step at 381 negative inputs).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 8000
FRAME_MS = 20
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000  # µ-law: one byte a sample
ULAW_SILENCE = 0xFF

Int16Array = npt.NDArray[np.int16]


def _build_decode_table() -> Int16Array:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _build_encode_table() -> npt.NDArray[np.uint8]:
    """lin2ulaw for every int16, as CPython's st_14linear2ulaw(sample >> 2).

    Indexed by the sample's bits read as uint16 (0..32767, then -32768..-1), so encoding is one
    look-up on a view of the samples with no arithmetic.
    """
    v = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32) >> 2
    mask = np.where(v < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(v), 8159) + 33
    segment_ends = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
    segment = np.searchsorted(segment_ends, magnitude)  # first end >= magnitude
    code = (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F)
    code = np.where(segment >= len(segment_ends), 0x7F, code)  # past the last segment: clip
    return (code ^ mask).astype(np.uint8)


_DECODE = _build_decode_table()
_ENCODE = _build_encode_table()


def ulaw_to_pcm16(ulaw: bytes) -> bytes:
    """µ-law bytes to little-endian 16-bit PCM."""
    return _DECODE[np.frombuffer(ulaw, np.uint8)].astype("<i2").tobytes()


def ulaw_to_samples(ulaw: bytes) -> Int16Array:
    """µ-law bytes to an int16 sample array (native order, for analysis)."""
    return _DECODE[np.frombuffer(ulaw, np.uint8)]


def pcm16_to_ulaw(pcm: bytes) -> bytes:
    """Little-endian 16-bit PCM to µ-law bytes; the byte count must be even."""
    encoded: bytes = _ENCODE[np.frombuffer(pcm, "<u2")].tobytes()
    return encoded


def samples_to_ulaw(samples: npt.NDArray[np.int16]) -> bytes:
    return _ENCODE[samples.astype(np.int16, copy=False).view(np.uint16)].tobytes()


def ulaw_silence(duration_ms: int) -> bytes:
    return bytes([ULAW_SILENCE]) * (SAMPLE_RATE * duration_ms // 1000)


# -- decimation -------------------------------------------------------------------------------------


class Decimator:
    """Streaming low-pass + decimation of 16-bit PCM at 16 or 24 kHz down to 8 kHz.

    A Kaiser-windowed sinc FIR (cut-off 3.7 kHz, about 80 dB stop band from 3.95 kHz) keeps the
    telephone band and removes what would alias. State (filter history, decimation phase and an odd
    trailing byte) carries across chunks, so any chunking gives the same samples as one call. Hand
    written rather than soxr: integer ratios need no polyphase machinery, and soxr's good qualities
    buffer 60-100 ms and release bursts, which is latency a caller hears.
    """

    def __init__(self, in_rate: int, taps_per_output_sample: int = 80, cutoff_hz: float = 3700.0) -> None:
        if in_rate % SAMPLE_RATE or in_rate <= SAMPLE_RATE:
            raise ValueError(f"in_rate {in_rate} is not a multiple of {SAMPLE_RATE} above it")
        self.factor = in_rate // SAMPLE_RATE
        taps = taps_per_output_sample * self.factor + 1
        n = np.arange(taps) - (taps - 1) / 2
        kernel = np.sinc(2 * cutoff_hz / in_rate * n) * np.kaiser(taps, 8.0)
        self._kernel = kernel / kernel.sum()
        self._history = np.zeros(taps - 1)
        self._phase = 0
        self._carry = b""

    def process(self, pcm: bytes) -> bytes:
        """Take S16LE at the input rate (any byte count), return S16LE at 8 kHz."""
        data = self._carry + pcm
        usable = len(data) & ~1
        self._carry = data[usable:]
        if not usable:
            return b""
        x = np.concatenate([self._history, np.frombuffer(data[:usable], "<i2")])
        self._history = x[len(x) - len(self._history) :]
        filtered = np.convolve(x, self._kernel, mode="valid")
        out = filtered[self._phase :: self.factor]
        self._phase = (self._phase - (usable // 2)) % self.factor
        return np.clip(np.round(out), -32768, 32767).astype("<i2").tobytes()

    def reset(self) -> None:
        """Forget state (a new utterance: nothing of the last one should bleed in)."""
        self._history[:] = 0
        self._phase = 0
        self._carry = b""


class TtsAudioConverter:
    """Turns the provider's output format into µ-law 8 kHz; µ-law passes through untouched."""

    def __init__(self, output_format: str) -> None:
        if output_format == "ulaw_8000":
            self._decimator: Decimator | None = None
        elif output_format in ("pcm_16000", "pcm_24000"):
            self._decimator = Decimator(int(output_format.removeprefix("pcm_")))
        else:
            raise ValueError(f"unsupported output format {output_format!r}")

    def convert(self, audio: bytes) -> bytes:
        if self._decimator is None:
            return audio
        return pcm16_to_ulaw(self._decimator.process(audio))

    def reset(self) -> None:
        if self._decimator is not None:
            self._decimator.reset()


# -- voice activity ---------------------------------------------------------------------------------

# Level is the energy above 250 Hz of a Hann-windowed frame: mains hum and its first harmonics fall
# below that, and so does rumble, while speech keeps nearly all its energy. (A pre-emphasis filter
# also removes hum, but lifts white noise and lowers voiced speech, costing about 13 dB of
# signal-to-noise ratio.) Rather than an FFT per frame, the energy of the five lowest DFT bins is
# subtracted from the windowed total (Parseval): two dot products and a 9x160 matrix-vector
# product, a fraction of numpy's FFT call on 160 samples.
_LOW_CUT_HZ = 250.0
_FULL_SCALE_POWER = 32768.0**2
_FLOOR_DB = -100.0
_band_cache: dict[int, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]] = {}


def _band_setup(length: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]:
    setup = _band_cache.get(length)
    if setup is None:
        window = np.hanning(length)
        first_kept_bin = math.ceil(_LOW_CUT_HZ * length / SAMPLE_RATE)
        n = np.arange(length)
        rows = []
        for k in range(first_kept_bin):
            # Energy of bin k in sum_n y[n]^2 terms: 1/N for DC and Nyquist, 2/N for the rest.
            edge = k == 0 or 2 * k == length
            weight = math.sqrt((1.0 if edge else 2.0) / length)
            rows.append(weight * np.cos(2 * np.pi * k * n / length))
            if not edge:
                rows.append(weight * np.sin(2 * np.pi * k * n / length))
        # The band's power, scaled so a full-scale sine in it reads about -3 dBFS.
        scale = 1.0 / (float(np.dot(window, window)) * _FULL_SCALE_POWER)
        setup = _band_cache[length] = (window, np.array(rows), scale)
    return setup


def voice_band_level_dbfs(samples: npt.NDArray[np.int16] | npt.NDArray[np.float64]) -> float:
    """Mean power above 250 Hz of one frame, in dB relative to full scale."""
    window, out_of_band, scale = _band_setup(len(samples))
    windowed = samples * window
    outside = out_of_band @ windowed
    power = (float(windowed @ windowed) - float(outside @ outside)) * scale
    return 10.0 * math.log10(power) if power > 1e-10 else _FLOOR_DB


@dataclasses.dataclass(frozen=True)
class VadConfig:
    margin_db: float = 12.0  # above the noise floor to count as voice
    min_level_dbfs: float = -50.0  # never voice below this, however quiet the line
    min_speech_ms: int = 60  # a louder stretch shorter than this is a click, not speech
    hangover_ms: int = 200  # quiet this long ends speech (syllable gaps are shorter)
    floor_fall: float = 0.3  # per-frame weight when the level drops below the floor
    floor_rise: float = 0.02  # per-frame weight when a quiet level is above the floor
    floor_rise_in_speech: float = 0.004  # slow, so long stationary noise still becomes floor


class VadFrame(NamedTuple):
    """What the detector concluded from one frame.

    `speaking` is true from a confirmed onset until the hangover ends it. `onset_ms` is the start of
    the current (or last) speech, back-dated to its first loud frame; `last_voice_ms` the end of the
    last loud frame. `started`/`ended` mark the frames where speech was confirmed / was over.
    """

    speaking: bool
    started: bool
    ended: bool
    onset_ms: int | None
    last_voice_ms: int | None
    level_dbfs: float
    noise_floor_dbfs: float


class VoiceActivityDetector:
    """Decides speech vs silence per 20 ms frame against a noise floor that adapts to the line."""

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        self.noise_floor_dbfs: float | None = None
        self._run_start_ms: int | None = None  # first loud frame of the current candidate run
        self._run_last_loud_ms = 0
        self._speaking = False
        self._onset_ms: int | None = None
        self._last_voice_ms: int | None = None

    def process(self, ulaw: bytes, timestamp_ms: int, echo: EchoGate | None = None) -> VadFrame:
        """Feed one frame of µ-law audio starting at `timestamp_ms` on the audio clock.

        With `echo`, a frame no louder than the agent's own echo could be now is explained by it, so it
        is neither voice nor line noise."""
        if not ulaw:
            return self._frame(False, False, _FLOOR_DB)
        return self.process_samples(_DECODE[np.frombuffer(ulaw, np.uint8)], timestamp_ms, echo)

    def process_samples(
        self, samples: npt.NDArray[np.int16], timestamp_ms: int, echo_gate: EchoGate | None = None
    ) -> VadFrame:
        """The same for a frame already decoded to samples (8 kHz)."""
        config = self.config
        level = voice_band_level_dbfs(samples)
        end_ms = timestamp_ms + len(samples) * 1000 // SAMPLE_RATE

        floor = level if self.noise_floor_dbfs is None else self.noise_floor_dbfs
        ceiling = echo_gate.observe(timestamp_ms, level) if echo_gate is not None else None
        echo = ceiling is not None and level <= ceiling
        loud = not echo and level >= max(floor + config.margin_db, config.min_level_dbfs)

        if echo:
            pass  # the agent's own voice coming back says nothing about the line's noise
        elif level < floor:
            floor += (level - floor) * config.floor_fall
        else:
            floor += (level - floor) * (config.floor_rise_in_speech if loud else config.floor_rise)
        self.noise_floor_dbfs = floor

        started = ended = False
        if loud:
            if self._run_start_ms is None:
                self._run_start_ms = timestamp_ms
            self._run_last_loud_ms = end_ms
            if not self._speaking and end_ms - self._run_start_ms >= config.min_speech_ms:
                self._speaking = started = True
                self._onset_ms = self._run_start_ms
            if self._speaking:
                self._last_voice_ms = end_ms
        elif self._run_start_ms is not None:
            quiet_for = end_ms - self._run_last_loud_ms
            if self._speaking and quiet_for >= config.hangover_ms:
                self._speaking = False
                ended = True
                self._run_start_ms = None
            elif not self._speaking and quiet_for >= 2 * FRAME_MS:
                # A loud stretch that never reached min_speech_ms was a transient (a click): forget it.
                self._run_start_ms = None
        return self._frame(started, ended, level)

    def _frame(self, started: bool, ended: bool, level: float) -> VadFrame:
        return VadFrame(
            speaking=self._speaking,
            started=started,
            ended=ended,
            onset_ms=self._onset_ms,
            last_voice_ms=self._last_voice_ms,
            level_dbfs=level,
            noise_floor_dbfs=self.noise_floor_dbfs if self.noise_floor_dbfs is not None else _FLOOR_DB,
        )


@dataclasses.dataclass(frozen=True)
class EchoConfig:
    min_delay_ms: int = 50  # the shortest path back: the line's and the handset's latency
    max_delay_ms: int = 400  # the longest (a speakerphone on a mobile network)
    min_loss_db: float = 10.0  # the loudest echo assumed possible: this far below what was played
    max_loss_db: float = 45.0  # on a line that has shown no echo, echo quieter than this is still assumed
    margin_db: float = 3.0  # level measurement noise between the two sides
    safety_db: float = 5.0  # the learned loss is trusted this much less than observed
    evidence_dbfs: float = -40.0  # played audio at least this loud tells how loud its echo is
    loss_fall: float = 0.5  # per-frame weight toward a smaller observed loss (an echo appears: fast)
    loss_rise_db: float = 0.5  # at most this much more loss per frame (no echo: slowly)


class EchoGate:
    """The agent's own voice coming back on the caller's line is not the caller (DESIGN.md rule 4).

    It remembers the voice-band level of every 20 ms of audio the caller was played, at the audio-clock
    time it played. An inbound frame can carry the echo of anything played `min_delay_ms` to
    `max_delay_ms` before it. How much quieter that echo is, is learned per call: while loud audio was
    played, the gap between it and what came back is tracked from below (an echo makes it small at
    once; a line without echo lets it grow slowly), and trusted `safety_db` less, between `min_loss_db`
    (the worst echo assumed before anything is known) and `max_loss_db`. A frame no louder than the
    loudest echo it could carry is explained by the echo: neither voice nor line noise. A caller talking
    over the echo is louder than it and still counts. Cost: one level per played frame, a dozen look-ups
    per inbound one.
    """

    def __init__(self, config: EchoConfig | None = None) -> None:
        self.config = config or EchoConfig()
        # 20 ms slot of the audio clock -> what played then. A slot is measured once, when it enters the
        # echo window, so a long reply released at once costs nothing at that moment (at the threshold,
        # when every call of a burst releases its reply): measuring is paced with playback.
        self._played: dict[int, list[bytes]] = {}
        self._window: collections.deque[tuple[int, float]] = collections.deque()  # (slot, level), levels falling
        self._next_slot: int | None = None  # the next slot to enter the window
        self.loss_db = self.config.min_loss_db + self.config.safety_db  # the observed loss, tracked from below

    def played(self, ulaw: bytes, start_ms: float) -> None:
        """`ulaw` starts playing to the caller at `start_ms` on the audio clock."""
        first = int(start_ms) // FRAME_MS
        if self._next_slot is None:
            self._next_slot = first
        for index in range(0, len(ulaw), FRAME_BYTES):
            self._played.setdefault(first + index // FRAME_BYTES, []).append(ulaw[index : index + FRAME_BYTES])

    def cleared(self, at_ms: float) -> None:
        """Playback stopped at `at_ms`: what was queued after it never played."""
        cut = int(at_ms) // FRAME_MS + 1
        for slot in [slot for slot in self._played if slot >= cut]:
            del self._played[slot]

    def _loudest_played(self, at_ms: int) -> float | None:
        """The loudest audio played that a frame starting at `at_ms` could carry the echo of."""
        if self._next_slot is None:
            return None
        config = self.config
        first = (at_ms - config.max_delay_ms) // FRAME_MS
        last = (at_ms + FRAME_MS - config.min_delay_ms) // FRAME_MS
        window, played = self._window, self._played
        slot = max(self._next_slot, first)
        while slot <= last:  # the slots entering the window: measured now, once
            chunks = played.pop(slot, None)
            if chunks:
                level = max(voice_band_level_dbfs(_DECODE[np.frombuffer(chunk, np.uint8)]) for chunk in chunks)
                while window and window[-1][1] <= level:
                    window.pop()
                window.append((slot, level))
            slot += 1
        self._next_slot = slot
        while window and window[0][0] < first:  # out of reach of any echo now
            window.popleft()
        return window[0][1] if window else None

    def observe(self, at_ms: int, level_dbfs: float) -> float | None:
        """The loudest echo an inbound frame could carry (None: nothing played), then learn from its level."""
        loudest = self._loudest_played(at_ms)
        if loudest is None:
            return None
        config = self.config
        loss = min(config.max_loss_db, max(config.min_loss_db, self.loss_db - config.safety_db))
        if loudest >= config.evidence_dbfs:
            observed = loudest - level_dbfs
            if observed < self.loss_db:
                self.loss_db += (observed - self.loss_db) * config.loss_fall
            else:
                ceiling = config.max_loss_db + config.safety_db
                self.loss_db = min(ceiling, self.loss_db + min(config.loss_rise_db, observed - self.loss_db))
        return loudest - loss + config.margin_db
