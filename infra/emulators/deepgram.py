"""A Deepgram live-transcription emulator: `ws://…/v1/listen`, speaking Deepgram's wire protocol.

It checks `Authorization: Token <key>` (401 at the handshake otherwise) and the query, hears
speech in the µ-law it receives (a plain level threshold, independent of Parley's detector), and
answers as Deepgram does: interim results while speech goes on, a final result with `speech_final`
`stt_final_ms` after speech stops, `UtteranceEnd` after `utterance_end_ms` without words,
`SpeechStarted` with `vad_events`, a `from_finalize` result for `Finalize`, `Metadata` and a close
for `CloseStream`, and close 1011 `NET-0001` after the idle timeout. Its clock is the audio it has
received, as Deepgram's is, and it works through that audio no faster than `deepgram_max_speed` times
real time (1.25x, as Deepgram does), with a half-second allowance so a live stream's batches are not
held back: a replayed backlog is worked through at that pace, so catching up takes real time here too.
A scripted outage refuses a call's new sockets with HTTP 503 for a while after its first socket drops.
Which words were said comes from the scenario: the n-th utterance it hears is the scenario's n-th
caller text, its words spread over that utterance's duration. Progress
is kept per `tag` (Parley tags each stream with its CallSid), so a reconnecting client continues
mid-utterance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import json
import math
import re
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from core.audio import ulaw_to_samples
from infra.emulators.scenario import Scenario

_FRAME = 160
_LOUD_DBFS = -45.0
_TOLERANCE_MS = 250
_BURST_MS = 500.0  # audio that may be worked through at once after an idle moment
_MODEL_INFO = {"name": "general-nova-3", "version": "2026-01-01.0", "arch": "nova-3"}


@dataclasses.dataclass
class _Progress:
    utterance: int = 0
    emitted: int = 0  # words of the current utterance already given as final
    connections: int = 0
    refused_until: float = 0.0  # loop time until which an outage refuses new sockets


@dataclasses.dataclass
class _Word:
    text: str
    start_ms: float
    end_ms: float


class DeepgramEmulator:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.progress: dict[str, _Progress] = {}
        self.received: list[dict[str, Any]] = []  # every text message clients sent, for tests
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # the same, to wait on
        self.queries: list[dict[str, str]] = []
        self.headers: list[Headers] = []
        self._server: Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server = await serve(self._session, host, port, process_request=self._check, max_size=2**20)
        bound = self._server.sockets[0].getsockname()
        return f"ws://{host}:{bound[1]}/v1/listen"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path)
        if path.path != "/v1/listen":
            return connection.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() not in ("token", "bearer") or key != self.scenario.deepgram_key:
            response = connection.respond(
                http.HTTPStatus.UNAUTHORIZED, "Websocket initialized with invalid credentials."
            )
            response.headers["dg-error"] = "Invalid credentials."
            return response
        query = {k: v[-1] for k, v in parse_qs(path.query).items()}
        progress = self.progress.get(query.get("tag", ""))
        if progress is not None and asyncio.get_running_loop().time() < progress.refused_until:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "Service Unavailable\n")
        if query.get("encoding", "mulaw") not in ("mulaw", "linear16") or query.get("sample_rate", "8000") != "8000":
            return connection.respond(http.HTTPStatus.BAD_REQUEST, "Unsupported encoding or sample_rate.\n")
        for name in ("interim_results", "vad_events", "smart_format", "punctuate"):
            if name in query and query[name] not in ("true", "false"):
                return connection.respond(http.HTTPStatus.BAD_REQUEST, f"{name} must be true or false.\n")
        self.queries.append(query)
        self.headers.append(request.headers)
        return None

    async def _session(self, connection: ServerConnection) -> None:
        query = {k: v[-1] for k, v in parse_qs(urlsplit(connection.request.path).query).items()}  # type: ignore[union-attr]
        tag = query.get("tag") or uuid.uuid4().hex
        progress = self.progress.setdefault(tag, _Progress())
        progress.connections += 1
        session = _Session(self, connection, query, progress, self.scenario.for_call(tag))
        await session.run()


class _Session:
    def __init__(
        self,
        emulator: DeepgramEmulator,
        connection: ServerConnection,
        query: dict[str, str],
        progress: _Progress,
        scenario: Scenario,
    ) -> None:
        self.emulator = emulator
        self.scenario = scenario
        self.connection = connection
        self.progress = progress
        self.request_id = str(uuid.uuid4())
        self.interim = query.get("interim_results") == "true"
        self.vad_events = query.get("vad_events") == "true"
        self.utterance_end_ms = int(query["utterance_end_ms"]) if query.get("utterance_end_ms", "").isdigit() else None
        self.linear16 = query.get("encoding") == "linear16"
        self.drop_after_ms = self.scenario.faults.deepgram_drop_after_ms if progress.connections == 1 else None
        self.audio_ms = 0.0
        self.carry = b""
        self.in_speech = False
        self.last_loud_end = 0.0
        self.words: list[_Word] = []  # the current utterance's words not yet final
        self.utterance_span: tuple[float, float] | None = None
        self.window_start_ms = 0.0  # where the next result's window begins
        self.last_interim_ms = 0.0
        self.last_word_end: float | None = None
        self.utterance_end_sent = True
        self.pause_answered = True
        self.garbage_sent = False
        self.max_speed = self.scenario.latency.deepgram_max_speed
        self.credit_ms = _BURST_MS  # audio it may work through now without falling behind its pace
        self.credit_at = asyncio.get_running_loop().time()

    async def run(self) -> None:
        timeout = self.scenario.faults.deepgram_idle_timeout_s
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.connection.recv(), timeout=timeout)
                except TimeoutError:
                    await self.connection.close(1011, "NET-0001")
                    return
                if isinstance(message, bytes):
                    if not message:
                        await self.connection.close(1000)  # an empty frame ends the stream
                        return
                    await self._audio(message)
                    if self.drop_after_ms is not None and self.audio_ms >= self.drop_after_ms:
                        outage_s = self.scenario.faults.deepgram_outage_ms / 1000
                        self.progress.refused_until = asyncio.get_running_loop().time() + outage_s
                        self.connection.transport.abort()  # a network drop, no close frame
                        return
                else:
                    if not await self._control(message):
                        return
        except ConnectionClosed:
            return

    async def _control(self, text: str) -> bool:
        try:
            message = json.loads(text)
            kind = message["type"]
        except (ValueError, KeyError, TypeError):
            await self._send(
                {"type": "Error", "variant": "SchemaError", "description": "Invalid message", "message": text[:100]}
            )
            return True
        self.emulator.received.append(message)
        self.emulator.inbox.put_nowait(message)
        if kind == "KeepAlive":
            return True
        if kind == "Finalize":
            if not await self._finalize(from_finalize=True, speech_final=False) and (
                self.scenario.faults.deepgram_answers_idle_finalize
            ):
                await self._result([], is_final=True, from_finalize=True)
            return True
        if kind == "CloseStream":
            await self._finalize(from_finalize=False, speech_final=True)
            await self._send(
                {
                    "type": "Metadata",
                    "transaction_key": "deprecated",
                    "request_id": self.request_id,
                    "sha256": "0" * 64,
                    "created": "2026-11-24T00:00:00.000Z",
                    "duration": round(self.audio_ms / 1000, 3),
                    "channels": 1,
                }
            )
            await self.connection.close(1000)
            return False
        await self._send({"type": "Error", "variant": "SchemaError", "description": f"Unknown type {kind!r}"})
        return True

    async def _audio(self, data: bytes) -> None:
        data = self.carry + data
        frame_bytes = _FRAME * (2 if self.linear16 else 1)
        usable = len(data) - len(data) % frame_bytes
        self.carry = data[usable:]
        for offset in range(0, usable, frame_bytes):
            frame = data[offset : offset + frame_bytes]
            samples = (np.frombuffer(frame, "<i2") if self.linear16 else ulaw_to_samples(frame)).astype(np.float64)
            power = float(np.mean(samples**2))
            level = 10 * math.log10(power / 32768**2) if power > 0 else -120.0
            await self._keep_pace()
            start = self.audio_ms
            self.audio_ms += 20
            await self._frame(start, level >= _LOUD_DBFS)

    async def _keep_pace(self) -> None:
        """Work through a frame no sooner than `max_speed` allows (a token bucket of audio time)."""
        if self.max_speed is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.credit_ms = min(_BURST_MS, self.credit_ms + (now - self.credit_at) * 1000 * self.max_speed)
        self.credit_at = now
        if self.credit_ms < 20:
            # Emulating Deepgram's processing time, not waiting for an event: the pace is the behaviour.
            await asyncio.sleep((20 - self.credit_ms) / (1000 * self.max_speed))
            self.credit_ms, self.credit_at = 20.0, loop.time()
        self.credit_ms -= 20

    async def _frame(self, start_ms: float, loud: bool) -> None:
        now = self.audio_ms
        if loud:
            if not self.in_speech:
                self.in_speech = True
                self.pause_answered = False
                self.utterance_end_sent = False
                if self.utterance_span is None:
                    self._begin_utterance(start_ms)
                if self.vad_events:
                    await self._send(
                        {"type": "SpeechStarted", "channel": [0, 1], "timestamp": round(start_ms / 1000, 3)}
                    )
            self.last_loud_end = now
            if self.interim and now - self.last_interim_ms >= 1000 and self.words:
                self.last_interim_ms = now
                heard = [w for w in self.words if w.end_ms <= now]
                if heard:
                    await self._result(heard, is_final=False)
            return
        silent_for = now - self.last_loud_end
        if self.in_speech and silent_for >= self.scenario.latency.stt_final_ms:
            self.in_speech = False
        if not self.pause_answered and silent_for >= self.scenario.latency.stt_final_ms:
            self.pause_answered = True
            await self._finalize(from_finalize=False, speech_final=True)
        if (
            self.utterance_end_ms is not None
            and not self.utterance_end_sent
            and self.last_word_end is not None
            and silent_for >= self.utterance_end_ms
            and now - self.last_word_end >= self.utterance_end_ms
        ):
            self.utterance_end_sent = True
            await self._send(
                {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": round(self.last_word_end / 1000, 3)}
            )

    def _begin_utterance(self, onset_ms: float) -> None:
        utterance = self.scenario.caller_text(self.progress.utterance)
        if utterance is None:
            self.utterance_span = (onset_ms, onset_ms)
            self.words = []
            return
        tokens = utterance.text.split()
        remaining = tokens[self.progress.emitted :]  # a reconnect resumes mid-utterance
        span = utterance.duration_ms * len(remaining) / max(1, len(tokens))
        step = span / max(1, len(remaining))
        self.words = [_Word(t, onset_ms + i * step, onset_ms + (i + 1) * step - 20) for i, t in enumerate(remaining)]
        self.utterance_span = (onset_ms, onset_ms + span)

    async def _finalize(self, *, from_finalize: bool, speech_final: bool) -> bool:
        """Give as final the words spoken so far; True if there were any."""
        if self.utterance_span is None:
            return False
        complete = self.last_loud_end >= self.utterance_span[1] - 300
        final = self.words if complete else [w for w in self.words if w.end_ms <= self.last_loud_end + _TOLERANCE_MS]
        self.words = self.words[len(final) :]
        if final:
            self.progress.emitted += len(final)
            self.last_word_end = final[-1].end_ms
            await self._result(final, is_final=True, speech_final=speech_final, from_finalize=from_finalize)
        if complete or not self.words:
            self.progress.utterance += 1 if self.scenario.caller_text(self.progress.utterance) else 0
            self.progress.emitted = 0
            self.utterance_span = None
            self.words = []
        if final and self.scenario.faults.garbage and not self.garbage_sent:
            self.garbage_sent = True
            await self.connection.send("{this is not json")
        return bool(final)

    async def _result(
        self, words: list[_Word], *, is_final: bool, speech_final: bool = False, from_finalize: bool = False
    ) -> None:
        start = self.window_start_ms
        end = self.audio_ms
        if is_final:
            self.window_start_ms = end
        await self._send(
            {
                "type": "Results",
                "channel_index": [0, 1],
                "duration": round((end - start) / 1000, 3),
                "start": round(start / 1000, 3),
                "is_final": is_final,
                "speech_final": speech_final,
                "from_finalize": from_finalize,
                "channel": {
                    "alternatives": [
                        {
                            "transcript": " ".join(w.text for w in words),
                            "confidence": 0.99 if words else 0.0,
                            "words": [
                                {
                                    "word": re.sub(r"[^\w']", "", w.text).lower(),
                                    "start": round(w.start_ms / 1000, 3),
                                    "end": round(w.end_ms / 1000, 3),
                                    "confidence": 0.99,
                                    "punctuated_word": w.text,
                                }
                                for w in words
                            ],
                        }
                    ]
                },
                "metadata": {
                    "request_id": self.request_id,
                    "model_info": _MODEL_INFO,
                    "model_uuid": str(uuid.uuid5(uuid.NAMESPACE_DNS, "nova-3")),
                },
            }
        )

    async def _send(self, message: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(message))
