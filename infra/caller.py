"""A simulated Twilio caller: behaves as Twilio's side of a bidirectional Media Stream.

It can dial (post a signed voice webhook and read the TwiML's `<Stream>`), then connects to the
stream URL with a signed upgrade, sends `connected` and `start`, and then a 20 ms µ-law frame every
20 ms in real time (sent when its 20 ms have passed, as Twilio does; counters as JSON strings). What
it sends comes from a script: recorded utterances, pauses, key presses, waits for the agent, a
hang-up. It plays the agent's audio out in real time, echoes each `mark` when playback reaches it,
and on `clear` drops what is queued and echoes every pending mark at once.

It records both sides on one timeline (milliseconds since the stream began) and measures, where a
caller would: each reply latency (end of the caller's speech to the first agent audio received) and
each barge-in latency (onset of interrupting speech to `clear` received).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import websockets

from core.audio import samples_to_ulaw, ulaw_to_samples
from core.twilio import (
    SIGNATURE_HEADER,
    OutboundClear,
    OutboundMark,
    OutboundMedia,
    compute_signature,
    decode_outbound,
    stream_token,
)
from infra.wav import read_ulaw, write_pcm16

VOICES = Path(__file__).parent / "voices"
FRAME_MS = 20
FRAME_BYTES = 160
SILENCE = b"\xff" * FRAME_BYTES


# -- the script -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Say:
    voice: str  # a WAV in infra/voices
    after_agent_ms: int | None = None  # a barge-in: start once the agent has been heard this long
    timeout_ms: int = 20_000  # a barge-in whose agent never speaks is said anyway, and reported


@dataclasses.dataclass(frozen=True)
class Pause:
    ms: int


@dataclasses.dataclass(frozen=True)
class WaitForAgent:
    """Until the agent has answered and its audio has played out, then `quiet_ms` more."""

    quiet_ms: int = 500
    timeout_ms: int = 20_000


@dataclasses.dataclass(frozen=True)
class Press:
    digit: str


@dataclasses.dataclass(frozen=True)
class HangUp:
    after_agent_ms: int | None = None  # hang up while the agent talks, this far into its reply


@dataclasses.dataclass(frozen=True)
class SendRaw:
    """A frame exactly as given (malformed-input tests)."""

    text: str


Step = Say | Pause | WaitForAgent | Press | HangUp | SendRaw


@dataclasses.dataclass
class CallReport:
    call_sid: str
    stream_sid: str
    reply_latencies_ms: list[float] = dataclasses.field(default_factory=list)
    barge_in_latencies_ms: list[float] = dataclasses.field(default_factory=list)
    speech: list[tuple[str, float, float]] = dataclasses.field(default_factory=list)  # voice, start, end
    clears_received: int = 0
    clear_times_ms: list[float] = dataclasses.field(default_factory=list)
    resumed_at_ms: list[float] = dataclasses.field(default_factory=list)  # agent audio again after a clear
    marks_echoed: int = 0
    media_received: int = 0
    agent_audio_ms: float = 0.0
    duration_ms: float = 0.0
    closed_by_server: bool = False
    timed_out: bool = False
    # On the machine's monotonic clock, to line up with other observers (the Twilio emulator's steps).
    first_audio_at: float | None = None
    last_mark_at: float | None = None
    closed_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- dialling ---------------------------------------------------------------------------------------


def dial(
    webhook_url: str, auth_token: str, form: dict[str, str], *, deliver_to: str | None = None
) -> tuple[str, dict[str, str]]:
    """Post the signed voice webhook as Twilio does; return the TwiML's stream URL and parameters.

    Twilio signs the public `webhook_url`; `deliver_to` is where the request really goes when that
    public name does not resolve here (a local run).
    """
    body = urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(
        deliver_to or webhook_url,
        data=body,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            SIGNATURE_HEADER: compute_signature(auth_token, webhook_url, form),
            "User-Agent": "TwilioProxy/1.1",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        twiml = response.read().decode()
    stream = ET.fromstring(twiml).find("./Connect/Stream")
    if stream is None:
        raise ValueError(f"the TwiML has no <Connect><Stream>: {twiml}")
    parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    return stream.get("url", ""), parameters


# -- the caller -------------------------------------------------------------------------------------


class SimulatedCaller:
    def __init__(
        self,
        connect_url: str,
        auth_token: str,
        script: list[Step],
        *,
        signed_url: str | None = None,
        call_sid: str = "CA" + "0" * 32,
        stream_sid: str = "MZ" + "0" * 32,
        parameters: dict[str, str] | None = None,
        signature: str | None = None,
        echo: tuple[int, float] | None = None,
        noise_dbfs: float | None = None,
        mint_token: bool = True,
    ) -> None:
        """`echo` = (delay ms, gain dB): the agent's voice comes back on the line, as on a speakerphone;
        `noise_dbfs`: stationary noise on the line for the whole call. Without `parameters` from a
        dialled TwiML, the stream's `token` is made as the webhook would make it (`mint_token`), so a
        caller that skips the webhook (the benchmarks) is still admitted."""
        self._connect_url = connect_url
        self._signed_url = signed_url or connect_url
        self._auth_token = auth_token
        self._script = list(script)
        self._signature = signature
        self._echo = echo
        self._noise_rms = 32768 * 10 ** (noise_dbfs / 20) if noise_dbfs is not None else None
        self._noise = np.random.default_rng(7)
        self.report = CallReport(call_sid, stream_sid)
        self._parameters = dict(parameters or {"CallSid": call_sid})
        if mint_token and "token" not in self._parameters:
            self._parameters["token"] = stream_token(auth_token, call_sid, int(time.time()) + 600)
        self._sequence = 0
        self._socket: websockets.ClientConnection | None = None
        self._t0 = 0.0
        # playout, on the caller's timeline (ms since the stream began)
        self._play_end = 0.0
        self._reply_started = 0.0  # when the agent audio now playing began to play
        self._pending_marks: list[tuple[float, str, asyncio.TimerHandle]] = []
        self._echoes: set[asyncio.Future[None]] = set()
        self._agent_chunks: list[tuple[float, bytes]] = []
        self._sent = bytearray()
        self._awaiting_reply_since: float | None = None
        self._barge_in_onset: float | None = None
        self._heard_since: float | None = None  # first agent audio after the caller last spoke
        self.heard_agent = asyncio.Event()  # set at the first agent audio of the call
        self._stop_requested = False

    def stop(self) -> None:
        """End the stream from Twilio's side now (a REST update of the call sends `stop` first)."""
        self._stop_requested = True

    def now(self) -> float:
        return (time.monotonic() - self._t0) * 1000

    async def run(self) -> CallReport:
        headers = {}
        signature = (
            self._signature
            if self._signature is not None
            else compute_signature(self._auth_token, self._signed_url, None)
        )
        if signature:
            headers[SIGNATURE_HEADER] = signature
        async with websockets.connect(self._connect_url, additional_headers=headers, max_size=2**22) as socket:
            self._socket = socket
            await socket.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            self._t0 = time.monotonic()
            await self._send_event(
                "start",
                start={
                    "accountSid": "AC" + "0" * 32,
                    "streamSid": self.report.stream_sid,
                    "callSid": self.report.call_sid,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": self._parameters,
                },
            )
            reader = asyncio.create_task(self._read(socket))
            try:
                await self._speak(socket, reader)
            finally:
                reader.cancel()
                for _, _, handle in self._pending_marks:
                    handle.cancel()
        self.report.duration_ms = self.now()
        return self.report

    async def _send_event(self, event: str, **body: Any) -> None:
        assert self._socket is not None
        self._sequence += 1
        message = {"event": event, "sequenceNumber": str(self._sequence), **body, "streamSid": self.report.stream_sid}
        try:
            await self._socket.send(json.dumps(message))
        except websockets.ConnectionClosed:
            self._closed_by_server()

    def _closed_by_server(self) -> None:
        """Whichever notices first, the sender or the reader: the moment the server's socket went away."""
        self.report.closed_by_server = True
        if self.report.closed_at is None:
            self.report.closed_at = time.monotonic()

    async def _speak(self, socket: websockets.ClientConnection, reader: asyncio.Task[None]) -> None:
        frame_index = 0
        audio = b""
        speaking: tuple[str, float] | None = None
        steps = list(self._script)
        step_started = 0.0

        while True:
            now = self.now()
            if not audio and steps:
                step = steps[0]
                started_now = step_started == 0.0
                if started_now:
                    step_started = now
                if isinstance(step, Say):
                    waited_too_long = step.after_agent_ms is not None and now - step_started >= step.timeout_ms
                    self.report.timed_out |= waited_too_long
                    if (
                        step.after_agent_ms is None
                        or waited_too_long
                        or (self._agent_playing(now) and now - self._reply_started >= step.after_agent_ms)
                    ):
                        audio = read_ulaw(VOICES / f"{step.voice}.wav")
                        audio += SILENCE[: (-len(audio)) % FRAME_BYTES]
                        onset = float(frame_index * FRAME_MS)
                        speaking = (step.voice, onset)
                        if step.after_agent_ms is not None:
                            self._barge_in_onset = onset
                        steps.pop(0)
                        step_started = 0.0
                elif isinstance(step, Pause):
                    if now - step_started >= step.ms:
                        steps.pop(0)
                        step_started = 0.0
                        continue
                elif isinstance(step, WaitForAgent):
                    answered = self._heard_since is not None and not self._agent_playing(now)
                    if (answered and now - self._play_end >= step.quiet_ms) or now - step_started >= step.timeout_ms:
                        self.report.timed_out |= not answered
                        steps.pop(0)
                        step_started = 0.0
                        continue
                elif isinstance(step, Press):
                    await self._send_event("dtmf", dtmf={"track": "inbound_track", "digit": step.digit})
                    steps.pop(0)
                    step_started = 0.0
                    continue
                elif isinstance(step, SendRaw):
                    await socket.send(step.text)
                    steps.pop(0)
                    step_started = 0.0
                    continue
                elif isinstance(step, HangUp) and (
                    step.after_agent_ms is None
                    or (self._agent_playing(now) and now - self._reply_started >= step.after_agent_ms)
                ):
                    await self._send_event(
                        "stop", stop={"accountSid": "AC" + "0" * 32, "callSid": self.report.call_sid}
                    )
                    return
            if (not steps and not audio) or self._stop_requested:
                await self._send_event("stop", stop={"accountSid": "AC" + "0" * 32, "callSid": self.report.call_sid})
                return
            if reader.done() or self.report.closed_by_server:
                self._closed_by_server()
                return

            frame, audio = (audio[:FRAME_BYTES], audio[FRAME_BYTES:]) if audio else (SILENCE, b"")
            frame = self._on_the_line(frame, float(frame_index * FRAME_MS))
            # Twilio sends a frame once its 20 ms have been captured.
            await asyncio.sleep(max(0.0, self._t0 + (frame_index + 1) * FRAME_MS / 1000 - time.monotonic()))
            await self._send_event(
                "media",
                media={
                    "track": "inbound",
                    "chunk": str(frame_index + 1),
                    "timestamp": str(frame_index * FRAME_MS),
                    "payload": _b64(frame),
                },
            )
            self._sent += frame
            frame_index += 1
            if speaking is not None and not audio:
                voice, onset = speaking
                end = float(frame_index * FRAME_MS)
                self.report.speech.append((voice, onset, end))
                self._awaiting_reply_since = end
                self._heard_since = None
                speaking = None

    def _on_the_line(self, frame: bytes, at_ms: float) -> bytes:
        """What Twilio hears: the caller, plus the agent's echo and the line's noise where configured."""
        if self._echo is None and self._noise_rms is None:
            return frame
        samples = ulaw_to_samples(frame).astype(np.float64)
        if self._echo is not None:
            delay_ms, gain_db = self._echo
            samples += self._agent_audio(at_ms - delay_ms) * 10 ** (gain_db / 20)
        if self._noise_rms is not None:
            samples += self._noise.normal(0, self._noise_rms, len(samples))
        return samples_to_ulaw(np.clip(np.round(samples), -32768, 32767).astype(np.int16))

    def _agent_audio(self, start_ms: float) -> np.ndarray:
        """The 20 ms of agent audio that played from `start_ms` (what was cleared never played)."""
        out = np.zeros(FRAME_BYTES)
        for chunk_start, chunk in self._agent_chunks:
            first, last = max(start_ms, chunk_start), min(start_ms + FRAME_MS, chunk_start + len(chunk) / 8)
            if last > first:
                piece = ulaw_to_samples(chunk[int((first - chunk_start) * 8) : int((last - chunk_start) * 8)])
                at = int((first - start_ms) * 8)
                out[at : at + len(piece)] = piece[: FRAME_BYTES - at]
        return out

    def _agent_playing(self, now: float) -> bool:
        return self._play_end > now

    async def _read(self, socket: websockets.ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for raw in socket:
                message = decode_outbound(raw)
                now = self.now()
                if isinstance(message, OutboundMedia):
                    self._on_media(now, message.media.payload)
                elif isinstance(message, OutboundMark):
                    at = max(self._play_end, now)
                    handle = loop.call_at(self._t0 + at / 1000, self._echo_mark, message.mark.name)
                    self._pending_marks.append((at, message.mark.name, handle))
                elif isinstance(message, OutboundClear):
                    self._on_clear(now)
        except websockets.ConnectionClosed:
            pass
        self._closed_by_server()

    def _on_media(self, now: float, ulaw: bytes) -> None:
        self.report.media_received += 1
        if self.report.first_audio_at is None:
            self.report.first_audio_at = time.monotonic()
        self.heard_agent.set()
        if self._awaiting_reply_since is not None and now > self._awaiting_reply_since:
            self.report.reply_latencies_ms.append(now - self._awaiting_reply_since)
            self._awaiting_reply_since = None
        if self._heard_since is None:
            self._heard_since = now
        start = max(now, self._play_end)
        if self.report.clear_times_ms and len(self.report.resumed_at_ms) < len(self.report.clear_times_ms):
            self.report.resumed_at_ms.append(start)
        if self._play_end <= now:
            self._reply_started = start
        self._play_end = start + len(ulaw) / 8
        self._agent_chunks.append((start, ulaw))

    def _on_clear(self, now: float) -> None:
        self.report.clears_received += 1
        self.report.clear_times_ms.append(now)
        if self._barge_in_onset is not None:
            self.report.barge_in_latencies_ms.append(now - self._barge_in_onset)
            self._barge_in_onset = None
        # Drop what has not been played: cut the recording at `now`.
        kept = []
        for start, chunk in self._agent_chunks:
            if start >= now:
                continue
            played = int((now - start) * 8)
            kept.append((start, chunk[:played]))
        self._agent_chunks = kept
        self._play_end = now
        for _, name, handle in self._pending_marks:
            handle.cancel()
            self._echo_mark(name)
        self._pending_marks = []

    def _echo_mark(self, name: str) -> None:
        self._pending_marks = [entry for entry in self._pending_marks if entry[1] != name]
        self.report.marks_echoed += 1
        self.report.last_mark_at = time.monotonic()
        echo = asyncio.ensure_future(self._send_event("mark", mark={"name": name}))
        self._echoes.add(echo)
        echo.add_done_callback(self._echoes.discard)

    # -- the recording ----------------------------------------------------------------------------

    def recording(self) -> tuple[np.ndarray, np.ndarray]:
        """The caller's and the agent's audio as int16 samples on one timeline."""
        caller = ulaw_to_samples(bytes(self._sent)).astype(np.int16)
        end = max([len(caller)] + [int(s * 8) + len(c) for s, c in self._agent_chunks])
        agent = np.zeros(end, dtype=np.int16)
        for start, chunk in self._agent_chunks:
            offset = int(start * 8)
            samples = ulaw_to_samples(chunk)
            agent[offset : offset + len(samples)] = samples[: max(0, end - offset)]
        self.report.agent_audio_ms = sum(len(c) for _, c in self._agent_chunks) / 8
        return np.pad(caller, (0, end - len(caller))), agent

    def write_recording(self, path: Path) -> None:
        caller, agent = self.recording()
        write_pcm16(path, np.column_stack([caller, agent]).astype("<i2").tobytes(), channels=2)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
