"""OpenAI chat completions, streamed, through the official `openai` SDK.

A phone agent cannot wait ten minutes (the SDK's default timeout), so requests carry a short one,
and the first text must arrive within `first_text_timeout_s`. The SDK retries once before any byte
is streamed (connection errors, 429, 5xx); after that a failure surfaces as `LlmError` with a reason
a person can act on. Cancelling the consuming task closes the HTTP response at once, which is the
only way to stop a Chat Completions stream.

`OpenAiChat` is shared by every call of a process (one HTTP connection pool); `OpenAiReplies` is one
call's `ChatModel` role on top of it: a task per reply, whose text, end or failure become engine
events. A key or model the API refuses (HTTP 401, 403, 404) is also the role's `ProviderFailed`.

Tools (DESIGN.md section 2b) come in the same stream as the text: each tool call arrives in pieces,
by `index` (the first piece has its id and name, the rest add to its `arguments`), and the stream ends
with `finish_reason` "tool_calls". The pieces are joined here and the engine hears one `LlmToolCalls`
in place of `LlmDone`.

The SDK makes the request (auth, timeouts, the retry before any byte, errors by status), but the stream
is read here: the SDK builds a pydantic `ChatCompletionChunk` per chunk (~130 µs each, ~1.4 ms with its
SSE decoding, per `parley bench`), which for 50 replies at once was most of a burst's CPU. Lines are
read as server-sent events (WHATWG HTML, "Server-sent events", interpreting an event stream) and the
few fields we use decoded by msgspec (< 1 µs). An `error` object in the stream is a failure, as the SDK
reads it (`openai/_streaming.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import httpx
import msgspec
import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from core.events import LlmDone, LlmFailed, LlmText, LlmToolCalls, ProviderFailed, ProviderRole
from core.logs import logger
from core.providers.roles import Clock, EventSink
from core.records import ChatMessage, Role, ToolCall
from core.tools import ToolSpec

_PERMANENT = (401, 403, 404)


@dataclasses.dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the reply, or (with no text) why it ended: "stop", "length", "content_filter",
    "tool_calls" (with the calls, whole)."""

    text: str
    finish_reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallPiece(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallPiece] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _StreamError(msgspec.Struct):
    message: str | None = None


class _Chunk(msgspec.Struct):
    """The fields of a `chat.completion.chunk` the agent reads; the rest are skipped unparsed."""

    choices: list[_Choice] = []
    error: _StreamError | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """Each event's data: its `data:` lines (one leading space dropped) joined by newlines, an event
    ending at a blank line; other fields and comments are ignored."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


class _ToolCallPieces:
    """Tool calls as they stream: by index, an id and a name first, then their arguments in pieces."""

    def __init__(self) -> None:
        self._calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]

    def add(self, pieces: Sequence[Any]) -> None:
        for piece in pieces:
            call = self._calls.setdefault(piece.index, ["", "", ""])
            if piece.id:
                call[0] = piece.id
            if piece.function is not None:
                call[1] += piece.function.name or ""
                call[2] += piece.function.arguments or ""

    def whole(self) -> tuple[ToolCall, ...]:
        return tuple(
            ToolCall(call_id or f"call_{index}", name, arguments)
            for index, (call_id, name, arguments) in sorted(self._calls.items())
            if name
        )


class LlmError(Exception):
    """The model could not answer: what happened, in words fit for a log line."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent  # retrying will not help: a refused key, an unknown model


def wire_messages(messages: Sequence[ChatMessage]) -> list[ChatCompletionMessageParam]:
    """Our history in Chat Completions' form: tool calls on assistant messages, tool results by id."""
    wire: list[dict[str, Any]] = []
    for message in messages:
        entry: dict[str, Any] = {"role": message.role.value, "content": message.content}
        if message.tool_calls:
            entry["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in message.tool_calls
            ]
        if message.role is Role.TOOL:
            entry["tool_call_id"] = message.tool_call_id
        wire.append(entry)
    return cast("list[ChatCompletionMessageParam]", wire)


class OpenAiChat:
    def __init__(
        self,
        api_key: str,
        model: str,
        base_url: str | None = None,
        *,
        timeout_s: float = 20.0,
        first_text_timeout_s: float = 6.0,
        max_retries: int = 1,
        max_tokens: int = 300,
    ) -> None:
        self.model = model
        self._first_text_timeout_s = first_text_timeout_s
        self._max_tokens = max_tokens
        self._client = AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=openai.Timeout(timeout_s, connect=3.0),
            max_retries=max_retries,
        )

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        """The reply's text as it is written; raises `LlmError` when the model fails."""
        async for delta in self.deltas(messages):
            if delta.text:
                yield delta.text

    async def deltas(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> AsyncIterator[Delta]:
        """The reply as it is written, ending with why it ended (`finish_reason`, and the tool calls when
        it asks for tools); raises `LlmError`."""
        calls = _ToolCallPieces()
        offered: dict[str, Any] = {"tools": [tool.wire() for tool in tools]} if tools else {}
        try:
            async with asyncio.timeout(self._first_text_timeout_s) as deadline:
                request = self._client.chat.completions.with_streaming_response.create(
                    model=self.model,
                    messages=wire_messages(messages),
                    stream=True,
                    stream_options={"include_usage": True},
                    # `max_tokens` is deprecated, and refused by reasoning models (o-series).
                    max_completion_tokens=self._max_tokens,
                    **offered,
                )
                async with request as response:
                    async for data in sse_data(response.iter_lines()):
                        if data.startswith("[DONE]"):
                            break
                        chunk = _decode_chunk(data)
                        if chunk.error is not None:
                            raise LlmError(f"{self.model} failed mid-answer: {chunk.error.message or 'no message'}")
                        if not chunk.choices:  # the usage chunk at the end has no choices
                            continue
                        choice = chunk.choices[0]
                        text = choice.delta.content
                        if text:
                            deadline.reschedule(None)  # the first text came in time
                            yield Delta(text)
                        if choice.delta.tool_calls:
                            deadline.reschedule(None)  # a tool call is an answer too
                            calls.add(choice.delta.tool_calls)
                        if choice.finish_reason:
                            yield Delta("", choice.finish_reason, calls.whole())
        except TimeoutError:
            raise LlmError(f"no text from {self.model} within {self._first_text_timeout_s:.0f} s") from None
        except openai.APIStatusError as error:
            raise LlmError(
                f"{self.model} answered HTTP {error.status_code}: {error.message}",
                permanent=error.status_code in _PERMANENT,
            ) from None
        except openai.APITimeoutError:
            raise LlmError(f"{self.model} timed out") from None
        except openai.APIConnectionError as error:
            raise LlmError(f"could not reach the model's endpoint: {error}") from None
        except openai.APIError as error:
            raise LlmError(f"{self.model} failed: {error.message}") from None
        except msgspec.DecodeError as error:
            raise LlmError(f"{self.model} sent a chunk that is not a chat.completion.chunk: {error}") from None
        except httpx.TimeoutException:  # while reading the stream, where the SDK no longer maps errors
            raise LlmError(f"{self.model} timed out mid-answer") from None
        except httpx.TransportError as error:
            raise LlmError(f"the model's stream broke: {error!r}") from None

    async def complete_once(self, prompt: str, max_tokens: int = 1) -> Any:
        """The smallest real exchange, for `parley check`."""
        return await self._client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": prompt}], max_completion_tokens=max_tokens
        )

    async def close(self) -> None:
        await self._client.close()


class OpenAiReplies:
    """One call's `ChatModel`: each reply streams in a task of its own over the shared client."""

    def __init__(self, chat: OpenAiChat, on_event: EventSink, now_ms: Clock) -> None:
        self._chat = chat
        self._on_event = on_event
        self._now_ms = now_ms
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = asyncio.Event()
        self.failure: str | None = None

    def start(self, reply_id: str, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> None:
        self.cancel(reply_id)  # a retry (or the round after a tool's answer) replaces the last stream
        self._tasks[reply_id] = asyncio.get_running_loop().create_task(
            self._answer(reply_id, tuple(messages), tuple(tools)), name=f"llm-{reply_id}"
        )

    def cancel(self, reply_id: str) -> None:
        task = self._tasks.pop(reply_id, None)
        if task is not None:
            task.cancel()

    async def run(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._closed.set()

    async def _answer(self, reply_id: str, messages: tuple[ChatMessage, ...], tools: tuple[ToolSpec, ...]) -> None:
        finish_reason = "stop"
        tool_calls: tuple[ToolCall, ...] = ()
        try:
            async for delta in self._chat.deltas(messages, tools):
                if delta.text:
                    self._on_event(LlmText(self._now_ms(), reply_id, delta.text))
                if delta.finish_reason:
                    finish_reason, tool_calls = delta.finish_reason, delta.tool_calls
        except LlmError as error:
            logger.warning("the model failed", extra={"reply_id": reply_id, "error": str(error)})
            self._tasks.pop(reply_id, None)
            if error.permanent and self.failure is None:
                self.failure = str(error)
                self._on_event(ProviderFailed(self._now_ms(), ProviderRole.CHAT, str(error)))
            self._on_event(LlmFailed(self._now_ms(), reply_id, str(error)))
            return
        except Exception:  # a bug or an SDK surprise must not leave the reply silent
            logger.exception("the model's stream failed unexpectedly", extra={"reply_id": reply_id})
            self._tasks.pop(reply_id, None)
            self._on_event(LlmFailed(self._now_ms(), reply_id, "unexpected error"))
            return
        self._tasks.pop(reply_id, None)
        if tool_calls:
            logger.info(
                "the model asked for tools", extra={"reply_id": reply_id, "tools": [c.name for c in tool_calls]}
            )
            self._on_event(LlmToolCalls(self._now_ms(), reply_id, tool_calls))
            return
        if finish_reason != "stop":
            logger.warning(
                "the model's answer ended early", extra={"reply_id": reply_id, "finish_reason": finish_reason}
            )
        self._on_event(LlmDone(self._now_ms(), reply_id, finish_reason))
