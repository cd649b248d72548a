"""The call runner: the asyncio code that owns one call and moves its bytes.

It reads the Twilio media socket, builds the call's three providers (speech-to-text, chat model,
text-to-speech, `core/providers/roles.py`) as soon as `start` arrives and runs them in parallel, so
the greeting is not delayed; it feeds every event to the conversation engine stamped with the audio
clock, and carries out the actions it returns. It decides nothing itself and knows no vendor. Its
tasks live in one TaskGroup: when the call ends, by `stop`, by the socket closing or by shutdown,
everything of it is cancelled and closed, and the engine's summary goes to the call's item. A fault
in any provider or a malformed frame is logged with the call's ids and never ends the call, let
alone another one.

Outside code reaches a live call through `core/registry.py`: `inject` feeds it an event, `observe`
sees every event and the actions the engine answered with.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

import msgspec

from core import metrics
from core.audio import SAMPLE_RATE
from core.config import ConversationSettings, ProviderSettings
from core.engine import Conversation, TurnRules
from core.events import (
    Action,
    CallEnded,
    CallerAudio,
    CallStarted,
    CancelLlm,
    CancelTts,
    ClearPlayback,
    CloseProviders,
    DtmfPressed,
    EndCall,
    EndReason,
    Event,
    FinalizeStt,
    FinishTts,
    MarkPlayed,
    PlaceMark,
    PlayAudio,
    RecordMetric,
    RunTool,
    SaveConversation,
    SaveSummary,
    SendToStt,
    SendTtsText,
    StartLlm,
    ToolAnswered,
)
from core.logs import bind_call, logger
from core.providers.factory import VendorProviders
from core.providers.roles import CallContext, CallProviders, ProviderFactory
from core.records import CallSummary, NextStep, SavedConversation, ToolCall
from core.secrets import AuthToken
from core.tools import HttpTools, error_result
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
    stream_token_problem,
)

_CLOSE_TIMEOUT_S = 3.0
# The conversation is written at most this often per call, by one thread for the whole process: boto3
# holds the GIL for a few ms a write, and 50 calls' writes at once (every turn ends near the others in
# a burst) held the event loop long enough to add 60-80 ms to the barge-in p95 (parley bench, 50 calls).
_SAVE_SPACING_S = 1.0
_BOOKS = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="parley-books")
# A caller whose frames stop arriving for this long is gone, whatever the socket says.
_SILENT_SOCKET_TIMEOUT_S = 30.0


class TwilioSocket(Protocol):
    """What the runner needs of the media WebSocket (Litestar's WebSocket has exactly this)."""

    async def receive_text(self) -> str: ...

    async def send_text(self, data: str) -> None: ...

    async def close(self) -> None: ...


class CallRecorder(Protocol):
    """The call's books (`core.store.CallStore`): what the call does when its stream closes, and its summary."""

    def set_next(self, call_sid: str, next_step: NextStep, stream_sid: str) -> bool: ...

    def save_conversation(self, call_sid: str, conversation: SavedConversation) -> None: ...

    def load_conversation(self, call_sid: str) -> SavedConversation | None: ...

    def complete_call(
        self, call_sid: str, summary: CallSummary, parameters: Mapping[str, str] | None = None
    ) -> None: ...


Observer = Callable[[Event, list[Action]], None]


@dataclasses.dataclass
class CallServices:
    """What every call of a process shares: the rules, the providers' factory, the books."""

    rules: TurnRules
    providers: ProviderFactory
    store: CallRecorder | None
    tools: HttpTools | None = None  # a team's HTTP tools (TOOLS_FILE), shared by every call
    # The Auth Token that keys every stream's token (DESIGN.md section 2b); None admits any stream (tests).
    stream_token_key: AuthToken | None = None  # the webhook's signing key for stream tokens; None: no check

    async def aclose(self) -> None:
        await self.providers.aclose()
        if self.tools is not None:
            await self.tools.aclose()


class CallRunner:
    def __init__(self, socket: TwilioSocket, services: CallServices) -> None:
        self._socket = socket
        self._services = services
        self.engine = Conversation(services.rules)
        self.call_sid = ""
        self.stream_sid = ""
        self.parameters: dict[str, str] = {}
        self._clock_ms = 0
        self._frame_at_ms = 0
        self._outbox: collections.deque[str] = collections.deque()
        self._outbox_ready = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._last_frame = 0.0
        self._providers: CallProviders | None = None
        self._providers_closed: asyncio.Future[None] | None = None
        self._observers: list[Observer] = []
        self._ending = asyncio.Event()
        self._end_reason: EndReason = "closed"
        self._summary_saved: asyncio.Task[None] | None = None
        self._conversation_to_save: SavedConversation | None = None
        self._conversation_saver: asyncio.Task[None] | None = None
        self._over = asyncio.Event()  # the call has ended: no more spacing between writes
        self.malformed_frames = 0
        self.summary: CallSummary | None = None

    def now_ms(self) -> int:
        return self._clock_ms

    @property
    def live(self) -> bool:
        return self._group is not None and self._summary_saved is None

    def end(self, reason: EndReason = "shutdown") -> None:
        """Ask the call to end (drain deadline); the runner finishes it cleanly."""
        self._end_reason = reason
        self._ending.set()
        if self._reader is not None:
            self._reader.cancel()

    def inject(self, event: Event) -> bool:
        """Feed the live call an event from outside, stamped now on its audio clock; False once it ended."""
        if not self.live:
            return False
        self._feed(dataclasses.replace(event, at_ms=self._clock_ms))
        return True

    def observe(self, observer: Observer) -> Callable[[], None]:
        """Call `observer(event, actions)` for every event the engine handles; returns the way to stop."""
        self._observers.append(observer)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._observers.remove(observer)

        return stop

    # -- the call's life ------------------------------------------------------------------------

    async def run(self, on_started: Callable[[CallRunner], None] | None = None) -> None:
        start = await self._wait_for_start()
        if start is None:
            return
        restored = await self._restore(start)
        self._begin(start)
        providers = self._providers
        assert providers is not None
        started = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                if on_started is not None:
                    on_started(self)
                self._spawn(self._write(), "twilio-writer")
                self._spawn(self._watch_for_silence(), "watchdog")
                for provider in providers.all():
                    self._spawn(provider.run(), type(provider).__name__)
                self._feed(CallStarted(self._clock_ms, self.call_sid, self.stream_sid, self.parameters, restored))
                if not self._ending.is_set():
                    self._reader = group.create_task(self._read_until_end(), name="twilio-reader")
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._reader
                self._feed(CallEnded(self._clock_ms, self._end_reason))
                self._over.set()
                if self._end_reason == "agent":
                    # Twilio moves on (to /after-stream) only when the stream closes: close it now, and
                    # let the providers and the books finish after.
                    with contextlib.suppress(Exception):
                        await self._socket.close()
                await self._close_providers()
                if self._summary_saved is not None:
                    await self._summary_saved
                if self._conversation_saver is not None:
                    await self._conversation_saver
                for task in self._tasks:  # everything of this call ends with it
                    task.cancel()
        finally:
            self._group = None
            self._observers.clear()
            metrics.milliseconds("CallDuration", (time.monotonic() - started) * 1000)
            logger.info("call summary", extra=self._summary_line(providers, time.monotonic() - started))

    def _summary_line(self, providers: CallProviders, duration_s: float) -> dict[str, Any]:
        """The one line a team searches first (the template's Logs Insights queries read its fields)."""
        summary = self.summary
        replies = sorted(summary.reply_latency_ms) if summary else []
        barge_ins = sorted(summary.barge_in_ms) if summary else []
        return {
            "summary": True,
            "duration_s": round(duration_s, 1),
            "end_reason": self._end_reason,
            "outcome": summary.outcome if summary else None,
            "turns": summary.turn_count if summary else 0,
            "interruptions": summary.interruptions if summary else 0,
            "false_barge_ins": summary.false_barge_ins if summary else 0,
            "reply_latency_p50_ms": replies[(len(replies) - 1) // 2] if replies else None,
            "reply_latency_max_ms": replies[-1] if replies else None,
            "barge_in_p50_ms": barge_ins[(len(barge_ins) - 1) // 2] if barge_ins else None,
            "barge_in_max_ms": barge_ins[-1] if barge_ins else None,
            "provider_reconnects": providers.reconnects(),
            "provider_failures": list(summary.provider_failures) if summary else [],
            "malformed_frames": self.malformed_frames,
        }

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
                media_format = message.start.media_format
                if media_format is not None and (
                    media_format.encoding != "audio/x-mulaw"
                    or media_format.sample_rate != 8000
                    or media_format.channels != 1
                ):
                    # Everything downstream is µ-law 8 kHz mono; any other audio would be heard as noise.
                    bind_call(CallSid=message.start.call_sid, StreamSid=message.stream_sid)
                    metrics.count("StreamsRefused")
                    logger.error(
                        "refused a stream whose audio is not audio/x-mulaw, 8000 Hz, 1 channel; is this a Media "
                        "Stream from Twilio <Connect><Stream>?",
                        extra={"media_format": msgspec.structs.asdict(media_format)},
                    )
                    return None
                problem = await asyncio.to_thread(self._token_problem, message)  # may read the secret
                if problem is not None:
                    bind_call(CallSid=message.start.call_sid, StreamSid=message.stream_sid)
                    metrics.count("StreamsRefused")
                    logger.error(f"refused a stream before opening any provider: {problem}")
                    return None
                return message
            if isinstance(message, Stop):
                return None
            if not isinstance(message, Connected):
                logger.warning("ignored a frame that came before start", extra={"event": type(message).__name__})

    def _token_problem(self, start: Start) -> str | None:
        """Section 2b: a stream is admitted by the token the webhook put in its TwiML, for its CallSid.
        Blocking when the auth token is read from its secret: run it in a thread."""
        key = self._services.stream_token_key
        if key is None:
            return None
        token, call_sid, now = start.start.custom_parameters.get("token"), start.start.call_sid, time.time()
        # After a rotation the webhook may already sign with the new token.
        if key.accepts(lambda candidate: stream_token_problem(candidate, call_sid, token, now) is None):
            return None
        return stream_token_problem(key.current(), call_sid, token, now)

    async def _restore(self, start: Start) -> SavedConversation | None:
        """A stream that resumes a call gets the conversation its earlier streams saved."""
        store = self._services.store
        if not start.start.custom_parameters.get("resume") or store is None:
            return None
        try:
            return await asyncio.to_thread(store.load_conversation, start.start.call_sid)
        except Exception as error:  # the agent still answers, without its memory; say so loudly
            metrics.count("BookkeepingFailures")
            logger.error("could not restore the call's conversation", extra={"error": str(error)})
            return None

    def _begin(self, start: Start) -> None:
        info = start.start
        self.call_sid, self.stream_sid = info.call_sid, start.stream_sid
        self.parameters = {**info.custom_parameters, "StreamSid": start.stream_sid}
        bind_call(CallSid=self.call_sid, StreamSid=self.stream_sid)
        logger.info("call started", extra={"tracks": info.tracks})
        metrics.count("MediaStreamsStarted")
        self._providers = self._services.providers.for_call(
            CallContext(self.call_sid, self.engine.rules.silence_threshold_ms, self._feed, self.now_ms)
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
        actions = self.engine.handle(event)
        for action in actions:
            self._do(action)
        if self._observers:
            for observer in list(self._observers):
                try:
                    observer(event, actions)
                except Exception:  # an observer's bug must not touch the call
                    logger.exception("a call observer failed; it is removed")
                    self._observers.remove(observer)

    def _do(self, action: Action) -> None:
        providers = self._providers
        assert providers is not None
        match action:
            case SendToStt(ulaw=ulaw):
                providers.stt.send_audio(ulaw, self._frame_at_ms)
            case PlayAudio(ulaw=ulaw):
                self._send(encode_media(self.stream_sid, ulaw))
            case PlaceMark(name=name):
                self._send(encode_mark(self.stream_sid, name))
            case ClearPlayback():
                self._outbox.clear()  # audio not yet handed to Twilio need not be cleared there
                self._send(encode_clear(self.stream_sid))
            case SendTtsText(reply_id=reply_id, text=text):
                providers.tts.send_text(reply_id, text)
            case FinishTts(reply_id=reply_id, drop_unfinished=drop_unfinished):
                providers.tts.finish(reply_id, drop_unfinished)
            case CancelTts(reply_id=reply_id):
                providers.tts.cancel(reply_id)
            case StartLlm(reply_id=reply_id, messages=messages, tools=tools):
                providers.chat.start(reply_id, messages, tools)
            case CancelLlm(reply_id=reply_id):
                providers.chat.cancel(reply_id)
            case FinalizeStt():
                providers.stt.finalize()
            case RecordMetric(name=name, value=value, unit=unit):
                metrics.record(name, value, unit)
            case RunTool(call=call):
                self._spawn(self._run_tool(call), f"tool-{call.name}")
            case EndCall(outcome=outcome, next=next_step):
                logger.info("the agent ends the call", extra={"outcome": outcome, "next": next_step.action})
                self._spawn(self._end_with(next_step), "end-call")
            case CloseProviders():
                if self._providers_closed is None:
                    self._providers_closed = asyncio.ensure_future(self._close_all(providers))
            case SaveConversation(conversation=conversation):
                self._conversation_to_save = conversation
                if self._conversation_saver is None or self._conversation_saver.done():
                    self._conversation_saver = asyncio.ensure_future(self._save_conversations())
            case SaveSummary(summary=summary):
                self.summary = summary
                self._summary_saved = asyncio.ensure_future(self._save(summary))

    async def _run_tool(self, call: ToolCall) -> None:
        tools = self._services.tools
        if tools is None:
            result = error_result("no tools are configured")
        else:
            result = await tools.run(self.call_sid, call.name, call.arguments)
        if self.live:
            self._feed(ToolAnswered(self._clock_ms, call.id, result))

    async def _end_with(self, next_step: NextStep) -> None:
        """Section 2b: `next` goes on the item before the stream closes, so the webhook's `/after-stream`
        finds it when Twilio moves on; then the stream is closed."""
        store = self._services.store
        if store is not None and self.call_sid:
            try:
                if not await asyncio.to_thread(store.set_next, self.call_sid, next_step, self.stream_sid):
                    logger.warning("the call already had a next step; it was kept", extra={"next": next_step.action})
            except Exception as error:  # the caller still hears the stream close; /after-stream apologises
                metrics.count("BookkeepingFailures")
                logger.error("could not record the call's next step", extra={"error": str(error)})
        self.end("agent")

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

    async def _close_providers(self) -> None:
        if self._providers_closed is None and self._providers is not None:
            self._providers_closed = asyncio.ensure_future(self._close_all(self._providers))
        if self._providers_closed is not None:
            await self._providers_closed

    @staticmethod
    async def _close_all(providers: CallProviders) -> None:
        closers = [provider.close() for provider in providers.all()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closers, return_exceptions=True), timeout=_CLOSE_TIMEOUT_S)

    async def _save_conversations(self) -> None:
        """Write the latest conversation, then, at most once a `_SAVE_SPACING_S`, the newest one that came
        meanwhile: coalesced, in the books' thread, never on the audio path. A stream lost within that
        second resumes from the write before."""
        store = self._services.store
        loop = asyncio.get_running_loop()
        while self._conversation_to_save is not None:
            conversation, self._conversation_to_save = self._conversation_to_save, None
            if store is None or not self.call_sid:
                continue
            try:
                await loop.run_in_executor(_BOOKS, store.save_conversation, self.call_sid, conversation)
                logger.info("saved the conversation", extra={"messages": len(conversation.history)})
            except Exception as error:  # a lost stream would then restart the conversation; say so
                metrics.count("BookkeepingFailures")
                logger.error("could not save the conversation", extra={"error": str(error)})
            if self._conversation_to_save is None:
                return
            with contextlib.suppress(TimeoutError):  # spacing, not waiting for an event
                await asyncio.wait_for(self._over.wait(), timeout=_SAVE_SPACING_S)

    async def _save(self, summary: CallSummary) -> None:
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


def call_services(
    providers: ProviderSettings,
    conversation: ConversationSettings,
    store: CallRecorder | None,
    token_key: AuthToken | None = None,
) -> CallServices:
    """The production services: rules from the settings, the vendors' providers, the call's books."""
    rules = TurnRules.from_settings(conversation)
    http_tools = HttpTools(conversation.tools) if conversation.tools else None
    return CallServices(
        rules=rules, providers=VendorProviders(providers), store=store, tools=http_tools, stream_token_key=token_key
    )
