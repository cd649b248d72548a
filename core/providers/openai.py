"""OpenAI chat completions, streamed, through the official `openai` SDK.

A phone agent cannot wait ten minutes (the SDK's default timeout), so requests carry a short one,
and the first text must arrive within `first_text_timeout_s`. The SDK retries once before any byte
is streamed (connection errors, 429, 5xx); after that a failure surfaces as `LlmError` with a reason
a person can act on. Cancelling the consuming task closes the HTTP response at once, which is the
only way to stop a Chat Completions stream.

`OpenAiChat` is shared by every call of a process (one HTTP connection pool); `OpenAiReplies` is one
call's `ChatModel` role on top of it: a task per reply, whose text, end or failure become engine
events. A key or model the API refuses (HTTP 401, 403, 404) is also the role's `ProviderFailed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from core.events import LlmDone, LlmFailed, LlmText, ProviderFailed, ProviderRole
from core.logs import logger
from core.providers.roles import Clock, EventSink
from core.records import ChatMessage, Role

_PERMANENT = (401, 403, 404)


@dataclasses.dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the reply, or (with no text) why it ended: "stop", "length", "content_filter", ..."""

    text: str
    finish_reason: str | None = None


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

    async def deltas(self, messages: Sequence[ChatMessage]) -> AsyncIterator[Delta]:
        """The reply as it is written, ending with why it ended (`finish_reason`); raises `LlmError`."""
        try:
            async with asyncio.timeout(self._first_text_timeout_s) as deadline:
                stream = await self._client.chat.completions.create(
                    model=self.model,
                    messages=wire_messages(messages),
                    stream=True,
                    stream_options={"include_usage": True},
                    # `max_tokens` is deprecated, and refused by reasoning models (o-series).
                    max_completion_tokens=self._max_tokens,
                )
                async with stream:
                    async for chunk in stream:
                        if not chunk.choices:  # the usage chunk at the end has no choices
                            continue
                        choice = chunk.choices[0]
                        text = choice.delta.content
                        if text:
                            deadline.reschedule(None)  # the first text came in time
                            yield Delta(text)
                        if choice.finish_reason:
                            yield Delta("", choice.finish_reason)
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
        except openai.APIError as error:  # an error event in the middle of the stream
            raise LlmError(f"{self.model} failed mid-answer: {error.message}") from None

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

    def start(self, reply_id: str, messages: Sequence[ChatMessage]) -> None:
        self.cancel(reply_id)  # a retry replaces the failed attempt
        self._tasks[reply_id] = asyncio.get_running_loop().create_task(
            self._answer(reply_id, tuple(messages)), name=f"llm-{reply_id}"
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

    async def _answer(self, reply_id: str, messages: tuple[ChatMessage, ...]) -> None:
        finish_reason = "stop"
        try:
            async for delta in self._chat.deltas(messages):
                if delta.text:
                    self._on_event(LlmText(self._now_ms(), reply_id, delta.text))
                if delta.finish_reason:
                    finish_reason = delta.finish_reason
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
        if finish_reason != "stop":
            logger.warning(
                "the model's answer ended early", extra={"reply_id": reply_id, "finish_reason": finish_reason}
            )
        self._on_event(LlmDone(self._now_ms(), reply_id, finish_reason))
