"""OpenAI chat completions, streamed, through the official `openai` SDK.

A phone agent cannot wait ten minutes (the SDK's default timeout), so requests carry a short one,
and the first text must arrive within `first_text_timeout_s`. The SDK retries once before any byte
is streamed (connection errors, 429, 5xx); after that a failure surfaces as `LlmError` with a reason
a person can act on. Cancelling the consuming task closes the HTTP response at once, which is the
only way to stop a Chat Completions stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam


class LlmError(Exception):
    """The model could not answer: what happened, in words fit for a log line."""


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

    async def stream(self, messages: Sequence[dict[str, str]]) -> AsyncIterator[str]:
        """The reply's text as it is written; raises `LlmError` when the model fails."""
        try:
            async with asyncio.timeout(self._first_text_timeout_s) as deadline:
                stream = await self._client.chat.completions.create(
                    model=self.model,
                    messages=cast("list[ChatCompletionMessageParam]", list(messages)),  # role/content dicts
                    stream=True,
                    stream_options={"include_usage": True},
                    max_tokens=self._max_tokens,
                )
                async with stream:
                    async for chunk in stream:
                        if not chunk.choices:  # the usage chunk at the end has no choices
                            continue
                        text = chunk.choices[0].delta.content
                        if text:
                            deadline.reschedule(None)  # the first text came in time
                            yield text
        except TimeoutError:
            raise LlmError(f"no text from {self.model} within {self._first_text_timeout_s:.0f} s") from None
        except openai.APIStatusError as error:
            raise LlmError(f"{self.model} answered HTTP {error.status_code}: {error.message}") from None
        except openai.APITimeoutError:
            raise LlmError(f"{self.model} timed out") from None
        except openai.APIConnectionError as error:
            raise LlmError(f"could not reach the model's endpoint: {error}") from None
        except openai.APIError as error:  # an error event in the middle of the stream
            raise LlmError(f"{self.model} failed mid-answer: {error.message}") from None

    async def complete_once(self, prompt: str, max_tokens: int = 1) -> Any:
        """The smallest real exchange, for `parley check`."""
        return await self._client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
        )

    async def close(self) -> None:
        await self._client.close()
