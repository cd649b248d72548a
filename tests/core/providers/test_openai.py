"""Our OpenAI client against the OpenAI emulator: streaming, one retry, clear errors, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from core.providers.openai import LlmError, OpenAiChat
from infra.emulators.openai import OpenAiEmulator
from infra.emulators.scenario import Faults, Latency, demo_scenario

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A table for two?"}]


async def chatting(
    faults: Faults = Faults(), latency: Latency = Latency(), **options: float
) -> AsyncIterator[tuple[OpenAiEmulator, OpenAiChat]]:
    emulator = OpenAiEmulator(demo_scenario(faults=faults, latency=latency))
    url = await emulator.start()
    chat = OpenAiChat("sk-test-key", "gpt-4o-mini", url, **options)  # type: ignore[arg-type]
    yield emulator, chat
    await chat.close()
    await emulator.stop()


async def test_the_answer_streams_in_pieces() -> None:
    async for emulator, chat in chatting():
        pieces = [piece async for piece in chat.stream(MESSAGES)]
        assert len(pieces) > 5 and "".join(pieces) == emulator.scenario.answers[0]
        request = emulator.requests[0]
        assert request["stream"] is True and request["stream_options"] == {"include_usage": True}


async def test_a_500_is_retried_once() -> None:
    async for emulator, chat in chatting(Faults(openai_fail_first=1)):
        assert "".join([p async for p in chat.stream(MESSAGES)]) == emulator.scenario.answers[0]
        assert len(emulator.requests) == 2


async def test_two_500s_surface_as_a_clear_error() -> None:
    async for emulator, chat in chatting(Faults(openai_fail_first=2)):
        with pytest.raises(LlmError, match="HTTP 500"):
            [p async for p in chat.stream(MESSAGES)]
        assert len(emulator.requests) == 2


async def test_a_mid_stream_error_is_clear() -> None:
    async for _, chat in chatting(Faults(openai_midstream_error=True)):
        with pytest.raises(LlmError, match="failed mid-answer"):
            [p async for p in chat.stream(MESSAGES)]


async def test_no_first_text_in_time_is_an_error() -> None:
    async for _, chat in chatting(latency=Latency(llm_first_text_ms=2000), first_text_timeout_s=0.2):
        with pytest.raises(LlmError, match="no text from gpt-4o-mini within"):
            [p async for p in chat.stream(MESSAGES)]


async def test_cancelling_closes_the_http_stream() -> None:
    async for emulator, chat in chatting(latency=Latency(llm_token_interval_ms=50)):
        first = asyncio.Event()

        async def consume(chat: OpenAiChat, first: asyncio.Event) -> None:
            async for _ in chat.stream(MESSAGES):
                first.set()

        task = asyncio.create_task(consume(chat, first))
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await emulator.disconnected.wait()  # the server saw the client go


async def test_a_wrong_key_is_a_clear_error() -> None:
    emulator = OpenAiEmulator(demo_scenario())
    url = await emulator.start()
    chat = OpenAiChat("wrong", "gpt-4o-mini", url)
    with pytest.raises(LlmError, match="HTTP 401"):
        [p async for p in chat.stream(MESSAGES)]
    await chat.close()
    await emulator.stop()
