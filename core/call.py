"""The call runner: the asyncio code that owns one call and moves its bytes.

It reads the Twilio media socket, opens the Deepgram and ElevenLabs sockets as soon as `start`
arrives (in parallel, so the greeting is not delayed), feeds every event to the conversation
engine stamped with the audio clock, and carries out the actions it returns. It decides nothing
itself. Its tasks live in one TaskGroup: when the call ends, by `stop`, by the socket closing or by
shutdown, everything of it is cancelled and closed, and the engine's summary goes to the call's
item in DynamoDB. A fault in any provider or a malformed frame is logged with the call's ids and
never ends the call, let alone another one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, Protocol

from core import metrics
from core.audio import SAMPLE_RATE, VadConfig
from core.config import ConversationSettings, ProviderSettings
from core.engine import Conversation, TurnRules
from core.events import (
    Action,
    CallEnded,
    CallerAudio,
    CallStarted,
    CancelLlm,
    CancelTts,
    CloseProviders,
    DtmfPressed,
    Event,
    FinalizeStt,
    FinishTts,
    LlmDone,
    LlmFailed,
    LlmText,
    MarkPlayed,
    RecordMetric,
    SaveSummary,
    SendClear,
    SendMark,
    SendMedia,
    SendToStt,
    SendTtsText,
    StartLlm,
)
from core.logs import bind_call, logger
from core.providers.deepgram import DeepgramStream, listen_url
from core.providers.elevenlabs import ElevenLabsStream, stream_url
from core.providers.openai import LlmError, OpenAiChat
from core.store import CallStore
from core.twilio import (
    Connected,
    Dtmf,
    MalformedMessage,
    Mark,
    Media,
    Start,
    Stop,
    decode_inbound,
    encode_clear,
    encode_mark,
    encode_media,
)

_CLOSE_TIMEOUT_S = 3.0
# A caller whose frames stop arriving for this long is gone, whatever the socket says.
_SILENT_SOCKET_TIMEOUT_S = 30.0


class TwilioSocket(Protocol):
    """What the runner needs of the media WebSocket (Litestar's WebSocket has exactly this)."""

    async def receive_text(self) -> str: ...

    async def send_text(self, data: str) -> None: ...


def turn_rules(settings: ConversationSettings) -> TurnRules:
    return TurnRules(
        silence_threshold_ms=round(settings.silence_threshold * 1000),
        barge_in_min_speech_ms=settings.barge_in_min_speech_ms,
        speculate_after_ms=settings.speculate_after_ms,
        greeting=settings.greeting,
        system_prompt=settings.system_prompt,
        vad=VadConfig(
            margin_db=settings.vad_margin_db,
            min_level_dbfs=settings.vad_min_level_dbfs,
            min_speech_ms=settings.vad_min_speech_ms,
        ),
    )


@dataclasses.dataclass
class CallServices:
    """What every call shares: settings, the model client, the store."""

    providers: ProviderSettings
    conversation: ConversationSettings
    chat: OpenAiChat
    store: CallStore | None


class CallRunner:
    def __init__(self, socket: TwilioSocket, services: CallServices) -> None:
        self._socket = socket
        self._services = services
        self.engine = Conversation(turn_rules(services.conversation))
        self.call_sid = ""
        self.stream_sid = ""
        self.parameters: dict[str, str] = {}
        self._clock_ms = 0
        self._frame_at_ms = 0
        self._outbox: collections.deque[str] = collections.deque()
        self._outbox_ready = asyncio.Event()
        self._llm_tasks: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._last_frame = 0.0
        self._deepgram: DeepgramStream | None = None
        self._elevenlabs: ElevenLabsStream | None = None
        self._ending = asyncio.Event()
        self._end_reason = "closed"
        self._summary_saved: asyncio.Task[None] | None = None
        self.malformed_frames = 0
        self.summary: dict[str, Any] | None = None

    def now_ms(self) -> int:
        return self._clock_ms

    def end(self, reason: str = "shutdown") -> None:
        """Ask the call to end (drain deadline); the runner finishes it cleanly."""
        self._end_reason = reason
        self._ending.set()
        if self._reader is not None:
            self._reader.cancel()

    # -- the call's life ------------------------------------------------------------------------

    async def run(self) -> None:
        start = await self._wait_for_start()
        if start is None:
            return
        self._begin(start)
        started = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._spawn(self._write(), "twilio-writer")
                self._spawn(self._watch_for_silence(), "watchdog")
                assert self._deepgram is not None and self._elevenlabs is not None
                self._spawn(self._deepgram.run(), "deepgram")
                self._spawn(self._elevenlabs.run(), "elevenlabs")
                self._feed(CallStarted(self._clock_ms, self.call_sid, self.stream_sid, self.parameters))
                if not self._ending.is_set():
                    self._reader = group.create_task(self._read_until_end(), name="twilio-reader")
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._reader
                self._feed(CallEnded(self._clock_ms, self._end_reason))  # type: ignore[arg-type]
                await self._close_providers()
                if self._summary_saved is not None:
                    await self._summary_saved
                for task in self._tasks:  # everything of this call ends with it
                    task.cancel()
        finally:
            self._group = None
            metrics.milliseconds("CallDuration", (time.monotonic() - started) * 1000)
            logger.info("call ended", extra={"reason": self._end_reason, "malformed_frames": self.malformed_frames})

    async def _wait_for_start(self) -> Start | None:
        while True:
            try:
                frame = await asyncio.wait_for(self._socket.receive_text(), timeout=_SILENT_SOCKET_TIMEOUT_S)
            except Exception as error:
                logger.info("media socket closed before the stream started", extra={"error": repr(error)})
                return None
            try:
                message = decode_inbound(frame)
            except MalformedMessage as error:
                self._malformed(error)
                continue
            if isinstance(message, Start):
                return message
            if isinstance(message, Stop):
                return None
            if not isinstance(message, Connected):
                logger.warning("ignored a frame that came before start", extra={"event": type(message).__name__})

    def _begin(self, start: Start) -> None:
        info = start.start
        self.call_sid, self.stream_sid = info.call_sid, start.stream_sid
        self.parameters = {**info.custom_parameters, "StreamSid": start.stream_sid}
        bind_call(CallSid=self.call_sid, StreamSid=self.stream_sid)
        logger.info("call started", extra={"tracks": info.tracks})
        metrics.count("MediaStreamsStarted")
        providers, rules = self._services.providers, self.engine.rules
        self._deepgram = DeepgramStream(
            listen_url(
                providers.deepgram_url,
                model=providers.deepgram_model,
                utterance_end_ms=rules.silence_threshold_ms,
                endpointing_ms=300,
                tag=self.call_sid,
            ),
            providers.deepgram_api_key,
            self._feed,
            self.now_ms,
        )
        self._elevenlabs = ElevenLabsStream(
            stream_url(
                providers.elevenlabs_url,
                providers.elevenlabs_voice_id,
                model_id=providers.elevenlabs_model_id,
                output_format=providers.elevenlabs_output_format,
                inactivity_timeout=180,
            ),
            providers.elevenlabs_api_key,
            providers.elevenlabs_output_format,
            self._feed,
            self.now_ms,
        )

    async def _read_until_end(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await self._socket.receive_text()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._end_reason = "closed"
                logger.info("media socket closed", extra={"error": type(error).__name__})
                return
            self._last_frame = loop.time()
            if self._handle_frame(frame):
                return

    async def _watch_for_silence(self) -> None:
        """A caller whose frames stopped is gone, even if the socket never said so."""
        loop = asyncio.get_running_loop()
        self._last_frame = loop.time()
        while True:
            await asyncio.sleep(_SILENT_SOCKET_TIMEOUT_S / 6)
            if loop.time() - self._last_frame > _SILENT_SOCKET_TIMEOUT_S:
                logger.warning("no frame from Twilio for a while; ending the call")
                self.end("closed")
                return

    def _handle_frame(self, frame: str) -> bool:
        """One frame from Twilio; True when it ends the call."""
        try:
            message = decode_inbound(frame)
        except MalformedMessage as error:
            self._malformed(error)
            return False
        if isinstance(message, Media):
            at_ms = message.media.timestamp
            payload = message.media.payload
            if at_ms + len(payload) * 1000 // SAMPLE_RATE <= self._frame_at_ms and self._clock_ms:
                return False  # a frame from the past: Twilio resent or reordered it
            self._frame_at_ms = at_ms
            self._clock_ms = at_ms + len(payload) * 1000 // SAMPLE_RATE
            self._feed(CallerAudio(at_ms, payload))
        elif isinstance(message, Mark):
            self._feed(MarkPlayed(self._clock_ms, message.mark.name))
        elif isinstance(message, Dtmf):
            self._feed(DtmfPressed(self._clock_ms, message.dtmf.digit))
        elif isinstance(message, Stop):
            self._end_reason = "stop"
            return True
        else:
            logger.warning("ignored an out-of-order frame", extra={"event": type(message).__name__})
        return False

    def _malformed(self, error: MalformedMessage) -> None:
        self.malformed_frames += 1
        metrics.count("MalformedFrames")
        if self.malformed_frames <= 10 or self.malformed_frames % 100 == 0:
            logger.warning(
                "ignored a malformed media frame", extra={"reason": error.reason, "count": self.malformed_frames}
            )

    # -- engine actions ---------------------------------------------------------------------------

    def _feed(self, event: Event) -> None:
        for action in self.engine.handle(event):
            self._do(action)

    def _do(self, action: Action) -> None:
        match action:
            case SendToStt(ulaw=ulaw):
                if self._deepgram is not None:
                    self._deepgram.send_audio(ulaw, self._frame_at_ms)
            case SendMedia(ulaw=ulaw):
                self._send(encode_media(self.stream_sid, ulaw))
            case SendMark(name=name):
                self._send(encode_mark(self.stream_sid, name))
            case SendClear():
                self._outbox.clear()  # audio not yet handed to Twilio need not be cleared there
                self._send(encode_clear(self.stream_sid))
            case SendTtsText(reply_id=reply_id, text=text):
                if self._elevenlabs is not None:
                    self._elevenlabs.send_text(reply_id, text)
            case FinishTts(reply_id=reply_id):
                if self._elevenlabs is not None:
                    self._elevenlabs.finish(reply_id)
            case CancelTts(reply_id=reply_id):
                if self._elevenlabs is not None:
                    self._elevenlabs.cancel(reply_id)
            case StartLlm(reply_id=reply_id, messages=messages):
                previous = self._llm_tasks.pop(reply_id, None)
                if previous is not None:
                    previous.cancel()
                self._llm_tasks[reply_id] = self._spawn(self._answer(reply_id, messages), f"llm-{reply_id}")
            case CancelLlm(reply_id=reply_id):
                task = self._llm_tasks.pop(reply_id, None)
                if task is not None:
                    task.cancel()
            case FinalizeStt():
                if self._deepgram is not None:
                    self._deepgram.finalize()
            case RecordMetric(name=name, value=value):
                if name.endswith("_ms"):
                    metrics.milliseconds(_metric_name(name), value)
                else:
                    metrics.count(_metric_name(name), value)
            case CloseProviders():
                for task in self._llm_tasks.values():
                    task.cancel()
                self._llm_tasks.clear()
            case SaveSummary(summary=summary):
                self.summary = summary
                self._summary_saved = asyncio.ensure_future(self._save(summary))

    def _send(self, frame: str) -> None:
        self._outbox.append(frame)
        self._outbox_ready.set()

    async def _write(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                try:
                    await self._socket.send_text(self._outbox.popleft())
                except Exception as error:  # the caller hung up: nothing more to say to Twilio
                    logger.info("could not send to Twilio", extra={"error": type(error).__name__})
                    self._outbox.clear()
                    return

    async def _answer(self, reply_id: str, messages: list[dict[str, str]]) -> None:
        try:
            async for text in self._services.chat.stream(messages):
                self._feed(LlmText(self._clock_ms, reply_id, text))
        except LlmError as error:
            logger.warning("the model failed", extra={"reply_id": reply_id, "error": str(error)})
            self._llm_tasks.pop(reply_id, None)
            self._feed(LlmFailed(self._clock_ms, reply_id, str(error)))
            return
        self._llm_tasks.pop(reply_id, None)
        self._feed(LlmDone(self._clock_ms, reply_id))

    async def _close_providers(self) -> None:
        closers = [stream.close() for stream in (self._deepgram, self._elevenlabs) if stream is not None]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closers, return_exceptions=True), timeout=_CLOSE_TIMEOUT_S)

    async def _save(self, summary: dict[str, Any]) -> None:
        store = self._services.store
        if store is None or not self.call_sid:
            return
        try:
            await asyncio.to_thread(store.complete_call, self.call_sid, summary, self.parameters)
        except Exception as error:  # the call is over either way; say so loudly
            metrics.count("BookkeepingFailures")
            logger.error("could not save the call summary", extra={"error": str(error)})

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        assert self._group is not None
        task = self._group.create_task(_guarded(work, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _guarded(work: Awaitable[None], name: str) -> None:
    """A child task whose failure is logged, never allowed to end the call's TaskGroup."""
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("a call task failed; the call goes on", extra={"task": name})


def _metric_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.removesuffix("_ms").split("_"))


class CallRegistry:
    """The live calls of one process: how many, and a way to end them all (the drain deadline)."""

    def __init__(self) -> None:
        self._runners: set[CallRunner] = set()
        self.idle = asyncio.Event()
        self.idle.set()

    def __len__(self) -> int:
        return len(self._runners)

    async def run(self, runner: CallRunner) -> None:
        self._runners.add(runner)
        self.idle.clear()
        try:
            await runner.run()
        finally:
            self._runners.discard(runner)
            if not self._runners:
                self.idle.set()

    def end_all(self, reason: str = "shutdown") -> None:
        for runner in list(self._runners):
            runner.end(reason)

    async def wait_idle(self) -> None:
        await self.idle.wait()


def call_services(
    providers: ProviderSettings, conversation: ConversationSettings, store: CallStore | None
) -> CallServices:
    return CallServices(
        providers=providers,
        conversation=conversation,
        chat=OpenAiChat(providers.openai_api_key, providers.openai_model, providers.openai_base_url),
        store=store,
    )
