"""The audio core: µ-law bit-exactness, decimation, and voice activity on real and synthetic lines."""

from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.audio import (
    Decimator,
    EchoGate,
    TtsAudioConverter,
    VadConfig,
    VoiceActivityDetector,
    pcm16_to_ulaw,
    samples_to_ulaw,
    ulaw_silence,
    ulaw_to_pcm16,
    ulaw_to_samples,
    voice_band_level_dbfs,
)
from infra.wav import read_ulaw

VOICES = Path(__file__).parents[2] / "infra" / "voices"

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    audioop = pytest.importorskip("audioop") if sys.version_info < (3, 13) else None


# -- µ-law ------------------------------------------------------------------------------------------


@pytest.mark.skipif(audioop is None, reason="audioop is the oracle and exists only before Python 3.13")
def test_decode_matches_audioop_for_all_256_codes() -> None:
    codes = bytes(range(256))
    assert ulaw_to_pcm16(codes) == audioop.ulaw2lin(codes, 2)


@pytest.mark.skipif(audioop is None, reason="audioop is the oracle and exists only before Python 3.13")
def test_encode_matches_audioop_for_all_65536_samples() -> None:
    pcm = np.arange(-32768, 32768, dtype="<i2").tobytes()
    assert pcm16_to_ulaw(pcm) == audioop.lin2ulaw(pcm, 2)


def test_known_codes() -> None:
    # Independent of audioop: the table facts of G.711 (0xFF is silence, 0x80/0x00 the extremes).
    decoded = np.frombuffer(ulaw_to_pcm16(bytes([0xFF, 0x7F, 0x80, 0x00])), "<i2").tolist()
    assert decoded == [0, 0, 32124, -32124]
    assert pcm16_to_ulaw(np.array([0, -1], "<i2").tobytes()) == bytes([0xFF, 0x7E])


def test_round_trip_is_stable() -> None:
    codes = bytes(range(256))
    assert pcm16_to_ulaw(ulaw_to_pcm16(codes)).replace(b"\x7f", b"\xff") == codes.replace(b"\x7f", b"\xff")


# -- decimation -------------------------------------------------------------------------------------


def tone(freq: float, rate: int, seconds: float = 0.5, amplitude: float = 16000) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(amplitude * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def rms(pcm: bytes, skip_samples: int = 200) -> float:
    x = np.frombuffer(pcm, "<i2").astype(np.float64)[skip_samples:]
    return float(np.sqrt(np.mean(x**2)))


@pytest.mark.parametrize("rate", [16000, 24000])
@pytest.mark.parametrize("freq", [300, 1000, 3000, 3400])
def test_telephone_band_passes(rate: int, freq: float) -> None:
    out = Decimator(rate).process(tone(freq, rate))
    assert len(out) == 2 * 4000  # 0.5 s at 8 kHz
    assert rms(out) == pytest.approx(16000 / np.sqrt(2), rel=0.03)


@pytest.mark.parametrize("rate", [16000, 24000])
@pytest.mark.parametrize("freq", [4500, 5000, 6000, 7500])
def test_what_would_alias_is_suppressed(rate: int, freq: float) -> None:
    out = Decimator(rate).process(tone(freq, rate))
    assert rms(out) < 16000 / np.sqrt(2) / 1000  # at least 60 dB down


@settings(max_examples=60, deadline=None)
@given(
    rate=st.sampled_from([16000, 24000]),
    cuts=st.lists(st.integers(min_value=0, max_value=4801), max_size=12),
)
def test_chunked_equals_one_shot(rate: int, cuts: list[int]) -> None:
    rng = np.random.default_rng(7)
    pcm = rng.integers(-20000, 20000, 2400, dtype=np.int16).astype("<i2").tobytes()  # odd cuts too
    one_shot = Decimator(rate).process(pcm)
    streaming = Decimator(rate)
    bounds = [0, *sorted(cuts), len(pcm)]
    chunked = b"".join(streaming.process(pcm[a:b]) for a, b in itertools.pairwise(bounds))
    assert chunked == one_shot


def test_reset_forgets_history() -> None:
    decimator = Decimator(16000)
    first = decimator.process(tone(1000, 16000, 0.1))
    decimator.process(tone(2000, 16000, 0.1) + b"\x01")  # leaves history, phase and an odd byte
    decimator.reset()
    assert decimator.process(tone(1000, 16000, 0.1)) == first


def test_tts_converter_passes_ulaw_and_converts_pcm() -> None:
    assert TtsAudioConverter("ulaw_8000").convert(b"\x01\x02") == b"\x01\x02"
    ulaw = TtsAudioConverter("pcm_24000").convert(tone(1000, 24000, 0.02))
    assert len(ulaw) == 160
    with pytest.raises(ValueError, match="mp3_44100"):
        TtsAudioConverter("mp3_44100")


# -- voice activity ---------------------------------------------------------------------------------


def frames(ulaw: bytes, frame_bytes: int = 160) -> list[bytes]:
    return [ulaw[i : i + frame_bytes] for i in range(0, len(ulaw) - frame_bytes + 1, frame_bytes)]


def run(vad: VoiceActivityDetector, ulaw: bytes, start_ms: int = 0) -> list[tuple[int, bool]]:
    results = []
    for index, frame in enumerate(frames(ulaw)):
        at = start_ms + index * 20
        results.append((at, vad.process(frame, at).speaking))
    return results


def white_noise(seconds: float, dbfs: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 32768 * 10 ** (dbfs / 20), int(8000 * seconds))


def pink_noise(seconds: float, dbfs: float, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(8000 * seconds)
    spectrum = np.fft.rfft(rng.normal(size=n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    x = np.fft.irfft(spectrum, n)
    return x / np.sqrt(np.mean(x**2)) * 32768 * 10 ** (dbfs / 20)


def hum(seconds: float, dbfs: float, mains_hz: float = 50) -> np.ndarray:
    t = np.arange(int(8000 * seconds)) / 8000
    x = sum(np.sin(2 * np.pi * mains_hz * k * t) / k for k in (1, 2, 3))
    return x / np.sqrt(np.mean(x**2)) * 32768 * 10 ** (dbfs / 20)


def to_ulaw(x: np.ndarray) -> bytes:
    return samples_to_ulaw(np.clip(np.round(x), -32768, 32767).astype(np.int16))


def speech(name: str) -> np.ndarray:
    from core.audio import ulaw_to_samples

    return ulaw_to_samples(read_ulaw(VOICES / f"{name}.wav")).astype(np.float64)


@pytest.mark.parametrize("dbfs", [-60, -45, -35, -25])
@pytest.mark.parametrize("noise", [white_noise, pink_noise])
def test_stationary_noise_is_not_speech(noise, dbfs: float) -> None:  # type: ignore[no-untyped-def]
    results = run(VoiceActivityDetector(), to_ulaw(noise(6.0, dbfs)))
    assert not any(speaking for _, speaking in results)


@pytest.mark.parametrize("mains_hz", [50, 60])
@pytest.mark.parametrize("dbfs", [-40, -20])
def test_mains_hum_is_not_speech(mains_hz: float, dbfs: float) -> None:
    results = run(VoiceActivityDetector(), to_ulaw(hum(5.0, dbfs, mains_hz)))
    assert not any(speaking for _, speaking in results)


def test_clicks_shorter_than_the_minimum_are_ignored() -> None:
    line = white_noise(4.0, -55)
    for start in (0.5, 1.3, 2.2, 3.1):  # 5 ms and 30 ms clicks, well above the floor
        i = int(start * 8000)
        line[i : i + 40] += 20000
        line[i + 2000 : i + 2240] += 12000 * np.sign(np.sin(np.arange(240)))
    results = run(VoiceActivityDetector(VadConfig(min_speech_ms=60)), to_ulaw(line))
    assert not any(speaking for _, speaking in results)


@pytest.mark.parametrize("name", ["book_table", "tomorrow", "actually", "goodbye", "yes", "hello"])
@pytest.mark.parametrize("background", [None, "white", "pink", "hum"])
def test_speech_is_found_where_it_is(name: str, background: str | None) -> None:
    voice = speech(name)
    lead, tail = 1.5, 1.0
    line = np.concatenate([np.zeros(int(8000 * lead)), voice, np.zeros(int(8000 * tail))])
    noise = {
        None: lambda n: white_noise(n / 8000, -70),
        "white": lambda n: white_noise(n / 8000, -40),
        "pink": lambda n: pink_noise(n / 8000, -40),
        "hum": lambda n: hum(n / 8000, -35),
    }[background]
    line = line + noise(len(line))
    vad = VoiceActivityDetector()
    onsets, ends = [], []
    for index, frame in enumerate(frames(to_ulaw(line))):
        result = vad.process(frame, index * 20)
        if result.started:
            onsets.append(result.onset_ms)
        if result.ended:
            ends.append(result.last_voice_ms)
    speech_start, speech_end = lead * 1000, (lead + len(voice) / 8000) * 1000
    # Soft consonants at the edges ("y", a final "s") sink below a -40 dBFS noise floor.
    onset_slack, end_slack = (60, 120) if background is None else (100, 200)
    assert onsets, "speech was never detected"
    assert abs(onsets[0] - speech_start) <= onset_slack  # back-dated to the first loud frame
    assert all(speech_start - onset_slack <= t <= speech_end for t in onsets)
    assert ends and abs(ends[-1] - speech_end) <= end_slack
    assert vad.process(ulaw_silence(20), int(speech_end) + 900).speaking is False


def test_onset_is_reported_once_min_speech_has_passed() -> None:
    voice = to_ulaw(np.concatenate([np.zeros(8000), speech("hello")]))
    vad = VoiceActivityDetector(VadConfig(min_speech_ms=60))
    for index, frame in enumerate(frames(voice)):
        result = vad.process(frame, index * 20)
        if result.started:
            assert result.onset_ms is not None
            assert 40 <= index * 20 + 20 - result.onset_ms <= 80
            return
    pytest.fail("no onset")


def test_speech_over_noise_that_started_with_the_call() -> None:
    line = white_noise(5.0, -35)
    voice = speech("book_table")
    line[16000 : 16000 + len(voice)] += voice
    results = run(VoiceActivityDetector(), to_ulaw(line))
    assert any(speaking for at, speaking in results if 2000 <= at <= 2000 + len(voice) / 8)
    assert not any(speaking for at, speaking in results if at < 1900)


# -- the echo gate ------------------------------------------------------------------------------------


def _tone(level_dbfs: float, ms: int = 20) -> bytes:
    amplitude = 32768 * 10 ** (level_dbfs / 20) * np.sqrt(2)
    t = np.arange(ms * 8) / 8000
    return samples_to_ulaw(np.round(amplitude * np.sin(2 * np.pi * 1000 * t)).astype(np.int16))


def test_the_echo_gate_assumes_the_worst_echo_until_the_line_shows_its_own() -> None:
    gate = EchoGate()
    played = voice_band_level_dbfs(ulaw_to_samples(_tone(-20)))
    assert gate.observe(0, -100.0) is None  # nothing played: nothing to explain
    gate.played(_tone(-20, 2000), 0)
    first = gate.observe(100, -100.0)
    assert first is not None and abs(first - (played - 10 + 3)) < 0.6  # before evidence: 10 dB down
    for at in range(120, 1900, 20):  # a line that stays silent while the agent talks has no echo
        ceiling = gate.observe(at, -100.0)
    assert ceiling is not None and abs(ceiling - (played - 45 + 3)) < 0.6
    assert ceiling < -46.0  # a caller's quiet first consonant ("s") is heard at once


def test_an_echo_that_appears_pulls_the_gate_back_at_once() -> None:
    gate = EchoGate()
    gate.played(_tone(-20, 3000), 0)
    for at in range(0, 1000, 20):
        gate.observe(at, -100.0)  # no echo yet: the gate relaxes
    played = voice_band_level_dbfs(ulaw_to_samples(_tone(-20)))
    unexplained = 0
    for at in range(1000, 2000, 20):  # now the agent comes back 10 dB down
        ceiling = gate.observe(at, played - 10)
        assert ceiling is not None
        unexplained += played - 10 > ceiling
    assert unexplained <= 3  # caught within 60 ms: far short of a barge-in's 150 ms


def test_what_was_cleared_never_echoes() -> None:
    gate = EchoGate()
    gate.played(_tone(-20, 1000), 0)
    gate.cleared(200)
    assert gate.observe(700, -100.0) is None  # everything played before 200 ms is out of the window
