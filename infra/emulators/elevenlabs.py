"""An ElevenLabs text-to-speech emulator: `ws://…/v1/text-to-speech/{voice}/multi-stream-input` and
`/stream-input`, speaking ElevenLabs' wire protocol.

It checks `xi-api-key` (401 at the handshake otherwise), voices each text message in its context
after `tts_first_audio_ms` (for a context's first audio), `ms_per_char` of audio a character, in
chunks with per-chunk alignment (`chars`, `charStartTimesMs`, `charDurationsMs`), sends
`{"isFinal": true, "contextId": …}` once a context that was flushed and closed has had all its
audio, stops voicing a context closed without a flush, allows five open contexts, and closes 1008
with ElevenLabs' JSON error after `inactivity_timeout` seconds without a message. The single-context
endpoint ends with `isFinal` after `{"text": ""}`. Audio is a voiced-sounding tone in the
requested `output_format` (µ-law 8 kHz or 16-bit PCM at 16/24 kHz).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from core.audio import samples_to_ulaw
from infra.emulators.scenario import Scenario

_CHUNK_MS = 250
_MAX_CONTEXTS = 5
_FORMATS = {"ulaw_8000": 8000, "pcm_16000": 16000, "pcm_24000": 24000, "pcm_8000": 8000}
_TIMEOUT_MESSAGE = (
    "Have not received a new text input within the timeout of {0:.1f} seconds. Streaming input terminated. "
    "Please make sure to either feed the input in the timely manner, or to send the end of input text "
    '(empty string "") when done.'
)


def synthesize(text: str, ms_per_char: float, output_format: str) -> bytes:
    """Audio lasting len(text) * ms_per_char: a 140 Hz buzz with a 4 Hz syllable envelope."""
    rate = _FORMATS[output_format]
    n = int(len(text) * ms_per_char * rate / 1000)
    t = np.arange(n) / rate
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t) ** 2
    wave = np.sin(2 * np.pi * 140 * t) + 0.5 * np.sin(2 * np.pi * 420 * t) + 0.25 * np.sin(2 * np.pi * 980 * t)
    samples = np.clip(np.round(6000 * envelope * wave), -32768, 32767).astype(np.int16)
    return samples_to_ulaw(samples) if output_format == "ulaw_8000" else samples.astype("<i2").tobytes()


@dataclasses.dataclass
class _Context:
    id: str
    queue: asyncio.Queue[str | None] = dataclasses.field(default_factory=asyncio.Queue)
    flushed: bool = False
    closed: bool = False
    voiced_any: bool = False
    worker: asyncio.Task[None] | None = None


class ElevenLabsEmulator:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.received: list[dict[str, Any]] = []  # every message clients sent, for tests
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # the same, to wait on
        self.sent: list[dict[str, Any]] = []  # every message it sent, for tests
        self.connections = 0
        self.voiced_chars = 0
        self._server: Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server = await serve(self._session, host, port, process_request=self._check, max_size=16 * 2**20)
        return f"ws://{host}:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path).path.strip("/").split("/")
        if (
            len(parts) != 4
            or parts[:2] != ["v1", "text-to-speech"]
            or parts[3]
            not in (
                "multi-stream-input",
                "stream-input",
            )
        ):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        if request.headers.get("xi-api-key") != self.scenario.elevenlabs_key:
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, '{"detail":{"status":"invalid_api_key"}}')
        query = {k: v[-1] for k, v in parse_qs(urlsplit(request.path).query).items()}
        if query.get("output_format", "mp3_44100_128") not in _FORMATS:
            return connection.respond(http.HTTPStatus.BAD_REQUEST, "Unsupported output_format in this emulator\n")
        return None

    async def _session(self, connection: ServerConnection) -> None:
        self.connections += 1
        request = connection.request
        assert request is not None
        query = {k: v[-1] for k, v in parse_qs(urlsplit(request.path).query).items()}
        multi = urlsplit(request.path).path.endswith("multi-stream-input")
        drop_after = self.scenario.faults.elevenlabs_drop_after_chars if self.connections == 1 else None
        session = _Session(self, connection, query, multi, drop_after)
        await session.run()


class _Session:
    def __init__(
        self,
        emulator: ElevenLabsEmulator,
        connection: ServerConnection,
        query: dict[str, str],
        multi: bool,
        drop_after_chars: int | None,
    ) -> None:
        self.emulator = emulator
        self.scenario = emulator.scenario
        self.connection = connection
        self.multi = multi
        self.output_format = query.get("output_format", "ulaw_8000")
        self.timeout_s = float(query.get("inactivity_timeout", "20"))
        self.drop_after_chars = drop_after_chars
        self.voiced = 0
        self.contexts: dict[str, _Context] = {}
        self.voice_settings: dict[str, Any] = {}

    async def run(self) -> None:
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(self.connection.recv(), timeout=self.timeout_s)
                except TimeoutError:
                    await self._send(
                        {
                            "message": _TIMEOUT_MESSAGE.format(self.timeout_s),
                            "error": "input_timeout_exceeded",
                            "code": 1008,
                        }
                    )
                    await self.connection.close(1008, "input_timeout_exceeded")
                    return
                if not await self._message(raw):
                    return
        except ConnectionClosed:
            pass
        finally:
            for context in self.contexts.values():
                if context.worker is not None:
                    context.worker.cancel()

    async def _message(self, raw: str | bytes) -> bool:
        try:
            message = json.loads(raw)
            assert isinstance(message, dict)
        except (ValueError, AssertionError):
            await self._send({"message": "Invalid JSON", "error": "invalid_request", "code": 1008})
            await self.connection.close(1008, "invalid_request")
            return False
        self.emulator.received.append(message)
        self.emulator.inbox.put_nowait(message)
        if self.scenario.faults.elevenlabs_quota_exceeded and message.get("text", "").strip():
            # What ElevenLabs does once the account is out of characters: an error, then a 1008 close,
            # on this socket and every new one.
            await self._send(
                {
                    "message": "This request exceeds your quota of characters.",
                    "error": "quota_exceeded",
                    "code": 1008,
                    "contextId": message.get("context_id"),
                }
            )
            await self.connection.close(1008, "quota_exceeded")
            return False
        if message.get("close_socket"):
            for context in self.contexts.values():
                context.flushed = context.closed = True
                context.queue.put_nowait(None)
            await asyncio.gather(*(c.worker for c in self.contexts.values() if c.worker), return_exceptions=True)
            await self.connection.close(1000)
            return False
        context_id = message.get("context_id", "default") if self.multi else "default"
        text = message.get("text")
        if "voice_settings" in message:
            previous = self.voice_settings.get(context_id)
            if previous is not None and previous != message["voice_settings"]:
                await self.connection.close(
                    1008,
                    "voice_settings field must be provided in the first message and "
                    "then either be not provided or not change",
                )
                return False
            self.voice_settings[context_id] = message["voice_settings"]
        context = self.contexts.get(context_id)
        if message.get("close_context"):
            if context is not None and not context.closed:
                context.closed = True
                context.queue.put_nowait(None)
            return True
        if text is not None and text != "" and context is None:
            if sum(1 for c in self.contexts.values() if not c.closed) >= _MAX_CONTEXTS:
                await self._send(
                    {
                        "message": "Maximum number of contexts reached",
                        "error": "max_contexts",
                        "code": 1008,
                        "contextId": context_id,
                    }
                )
                return True
            context = self.contexts[context_id] = _Context(context_id)
            context.worker = asyncio.create_task(self._voice(context))
        if context is None:
            return True  # a keep-alive ({"text": ""}) for no context
        if text == "" and not self.multi:  # single context: end of input
            context.flushed = context.closed = True
            context.queue.put_nowait(None)
            return True
        if text and text.strip():
            context.queue.put_nowait(text)
        if message.get("flush"):
            context.flushed = True
        return True

    async def _voice(self, context: _Context) -> None:
        first = True
        while True:
            text = await context.queue.get()
            if text is None:
                break
            if first:
                await asyncio.sleep(self.scenario.latency.tts_first_audio_ms / 1000)
                first = False
            if context.closed and not context.flushed:
                break  # closed without a flush: stop voicing
            await self._speak(context, text)
            if self.drop_after_chars is not None and self.voiced >= self.drop_after_chars:
                self.connection.transport.abort()
                return
        if context.flushed or not self.multi:
            await self._send({"isFinal": True, "contextId": context.id} if self.multi else {"isFinal": True})
        if not self.multi:
            await self.connection.close(1000)

    async def _speak(self, context: _Context, text: str) -> None:
        rate = _FORMATS[self.output_format]
        bytes_per_ms = rate / 1000 * (1 if self.output_format == "ulaw_8000" else 2)
        audio = synthesize(text, self.scenario.ms_per_char, self.output_format)
        chars_per_chunk = max(1, int(_CHUNK_MS / self.scenario.ms_per_char))
        for first_char in range(0, len(text), chars_per_chunk):
            chars = list(text[first_char : first_char + chars_per_chunk])
            start = int(first_char * self.scenario.ms_per_char * bytes_per_ms)
            end = int((first_char + len(chars)) * self.scenario.ms_per_char * bytes_per_ms)
            if self.output_format != "ulaw_8000":
                start, end = start - start % 2, end - end % 2
            alignment = {
                "chars": chars,
                "charStartTimesMs": [round(i * self.scenario.ms_per_char) for i in range(len(chars))],
                "charDurationsMs": [round(self.scenario.ms_per_char)] * len(chars),
            }
            message: dict[str, Any] = {
                "audio": base64.b64encode(audio[start:end]).decode(),
                "isFinal": None,
                "normalizedAlignment": alignment,
                "alignment": alignment,
            }
            if self.multi:
                message["contextId"] = context.id
            if context.closed and not context.flushed:
                return
            await self._send(message)
            self.voiced += len(chars)
            self.emulator.voiced_chars += len(chars)
            await asyncio.sleep(0)  # let a close_context in

    async def _send(self, message: dict[str, Any]) -> None:
        self.emulator.sent.append(message)
        await self.connection.send(json.dumps(message))
