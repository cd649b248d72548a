"""WAV files of telephone audio: µ-law 8 kHz mono fixtures, and 16-bit PCM call recordings.

The standard library's `wave` reads and writes only PCM, and the fixtures are G.711 µ-law
(format tag 7) so that they are byte for byte what Twilio sends; this is the small part it lacks.
"""

from __future__ import annotations

import struct
import wave
from pathlib import Path

WAVE_FORMAT_PCM = 1
WAVE_FORMAT_MULAW = 7


def write_ulaw(path: str | Path, ulaw: bytes, sample_rate: int = 8000) -> None:
    fmt = struct.pack("<HHIIHHH", WAVE_FORMAT_MULAW, 1, sample_rate, sample_rate, 1, 8, 0)
    fact = struct.pack("<I", len(ulaw))
    pad = b"\x00" if len(ulaw) % 2 else b""
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"fact"
        + struct.pack("<I", len(fact))
        + fact
        + b"data"
        + struct.pack("<I", len(ulaw))
        + ulaw
        + pad
    )
    Path(path).write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def read_ulaw(path: str | Path) -> bytes:
    """The µ-law samples of a mono 8 kHz µ-law WAV file."""
    data = Path(path).read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a RIFF/WAVE file")
    offset, fmt = 12, None
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        payload = data[offset + 8 : offset + 8 + size]
        if chunk == b"fmt ":
            fmt = struct.unpack_from("<HHI", payload)
        elif chunk == b"data":
            if fmt != (WAVE_FORMAT_MULAW, 1, 8000):
                raise ValueError(f"{path}: expected mono 8 kHz µ-law, found format {fmt}")
            return payload
        offset += 8 + size + (size % 2)
    raise ValueError(f"{path}: no data chunk")


def write_pcm16(path: str | Path, frames: bytes, channels: int, sample_rate: int = 8000) -> None:
    """Interleaved little-endian 16-bit PCM, e.g. a two-channel call recording."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(frames)
