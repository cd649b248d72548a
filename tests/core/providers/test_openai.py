"""Our OpenAI client against the OpenAI emulator: streaming, one retry, clear errors, cancellation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import openai
import pytest

from core.events import Event, LlmDone, LlmFailed, LlmText, LlmToolCalls, ProviderFailed, ProviderRole
from core.providers.openai import LlmError, OpenAiChat, OpenAiReplies, wire_messages
from core.records import ChatMessage, Role, ToolCall
from core.tools import ToolSpec
from infra.emulators.openai import OpenAiEmulator
from infra.emulators.scenario import Answer, Faults, Latency, demo_scenario

MESSAGES = (ChatMessage(Role.SYSTEM, "Be brief."), ChatMessage(Role.USER, "A table for two?"))


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


async def test_the_history_goes_out_in_openais_form() -> None:
    async for emulator, chat in chatting():
        [p async for p in chat.stream(MESSAGES)]
        assert emulator.requests[0]["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "A table for two?"},
        ]


def test_tool_calls_and_their_results_keep_openais_pairing() -> None:
    call = ToolCall("call_1", "end_call", '{"reason": "done"}')
    answered = ChatMessage(Role.TOOL, "ok", tool_call_id="call_1")
    wire = wire_messages([ChatMessage(Role.ASSISTANT, "Goodbye!", tool_calls=(call,)), answered])
    function = {"name": "end_call", "arguments": '{"reason": "done"}'}
    assert wire == [
        {
            "role": "assistant",
            "content": "Goodbye!",
            "tool_calls": [{"id": "call_1", "type": "function", "function": function}],
        },
        {"role": "tool", "content": "ok", "tool_call_id": "call_1"},
    ]


class Collected:
    """An event sink that remembers every event and is set once one of the `until` kinds arrives."""

    def __init__(self, *until: type) -> None:
        self.events: list[Event] = []
        self.until = until
        self.arrived = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, self.until):
            self.arrived.set()

    async def wait(self) -> None:
        await asyncio.wait_for(self.arrived.wait(), timeout=10)


async def test_a_calls_replies_become_engine_events() -> None:
    async for emulator, chat in chatting():
        sink = Collected(LlmDone, LlmFailed)
        replies = OpenAiReplies(chat, sink, lambda: 7)
        runner = asyncio.create_task(replies.run())
        replies.start("r1", MESSAGES)
        await sink.wait()
        assert "".join(e.text for e in sink.events if isinstance(e, LlmText)) == emulator.scenario.answers[0]
        assert sink.events[-1] == LlmDone(7, "r1")
        await replies.close()
        await asyncio.wait_for(runner, timeout=5)


async def test_a_refused_key_is_the_roles_failure_as_well_as_the_replys() -> None:
    emulator = OpenAiEmulator(demo_scenario())
    url = await emulator.start()
    chat = OpenAiChat("wrong", "gpt-4o-mini", url)
    sink = Collected(LlmFailed)
    replies = OpenAiReplies(chat, sink, lambda: 0)
    replies.start("r1", MESSAGES)
    await sink.wait()
    failure = sink.events[0]
    assert [type(e) for e in sink.events] == [ProviderFailed, LlmFailed]
    assert isinstance(failure, ProviderFailed) and failure.role is ProviderRole.CHAT and "401" in failure.reason
    await replies.close()
    await chat.close()
    await emulator.stop()


async def test_a_cancelled_reply_says_nothing_more() -> None:
    async for _, chat in chatting(latency=Latency(llm_token_interval_ms=50)):
        sink = Collected(LlmText)
        replies = OpenAiReplies(chat, sink, lambda: 0)
        replies.start("r1", MESSAGES)
        await sink.wait()
        replies.cancel("r1")
        seen = len(sink.events)
        await replies.close()  # awaits every reply task: nothing of r1 can arrive after this
        assert len(sink.events) == seen and not any(isinstance(e, LlmDone) for e in sink.events)


async def test_the_token_limit_is_sent_as_max_completion_tokens() -> None:
    async for emulator, chat in chatting():
        [p async for p in chat.stream(MESSAGES)]
        request = emulator.requests[0]
        assert "max_tokens" not in request and request["max_completion_tokens"] == 300


async def test_a_reasoning_model_refuses_max_tokens_and_accepts_ours() -> None:
    """As the API: "'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."""
    async for _, chat in chatting():
        client = chat._client
        with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
            await client.chat.completions.create(
                model="o3-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=10
            )
        reasoning = OpenAiChat("sk-test-key", "o3-mini", str(client.base_url))
        assert "".join([p async for p in reasoning.stream(MESSAGES)])
        await reasoning.close()


async def test_how_the_stream_ended_reaches_the_engine() -> None:
    async for _, chat in chatting(Faults(openai_content_filter=True)):
        sink = Collected(LlmDone, LlmFailed)
        replies = OpenAiReplies(chat, sink, lambda: 0)
        replies.start("r1", MESSAGES)
        await sink.wait()
        assert sink.events == [LlmDone(0, "r1", "content_filter")]  # no text at all
        await replies.close()
    async for _, chat in chatting(max_tokens=5):
        sink = Collected(LlmDone, LlmFailed)
        replies = OpenAiReplies(chat, sink, lambda: 0)
        replies.start("r1", MESSAGES)
        await sink.wait()
        assert sink.events[-1] == LlmDone(0, "r1", "length")
        assert len([e for e in sink.events if isinstance(e, LlmText)]) == 5
        await replies.close()


async def test_a_streamed_tool_call_is_joined_and_reaches_the_engine_whole() -> None:
    """The id and name come first, the arguments in pieces; the engine hears one LlmToolCalls, and the
    tools offered went out in OpenAI's form."""
    answer = Answer("Let me check.", "check_availability", {"people": 4, "day": "friday"}, then="It's free.")
    emulator = OpenAiEmulator(demo_scenario(answers=(answer,)))
    url = await emulator.start()
    chat = OpenAiChat("sk-test-key", "gpt-4o-mini", url)
    sink = Collected(LlmToolCalls, LlmDone, LlmFailed)
    replies = OpenAiReplies(chat, sink, lambda: 0)
    tool = ToolSpec("check_availability", "Is a table free", {"type": "object", "properties": {}}, "http://x")
    replies.start("r1", MESSAGES, (tool,))
    await sink.wait()
    assert "".join(e.text for e in sink.events if isinstance(e, LlmText)) == "Let me check."
    [calls] = [e for e in sink.events if isinstance(e, LlmToolCalls)]
    assert not any(isinstance(e, LlmDone) for e in sink.events)
    [call] = calls.calls
    assert (call.id, call.name, json.loads(call.arguments)) == (
        "call_emulated1",
        "check_availability",
        {"people": 4, "day": "friday"},
    )
    assert emulator.requests[0]["tools"] == [tool.wire()]

    sink = Collected(LlmDone, LlmFailed)
    replies = OpenAiReplies(chat, sink, lambda: 0)
    with_result = (
        *MESSAGES,
        ChatMessage(Role.ASSISTANT, "Let me check.", (call,)),
        ChatMessage(Role.TOOL, "{}", tool_call_id=call.id),
    )
    replies.start("r1", with_result, (tool,))
    await sink.wait()
    assert "".join(e.text for e in sink.events if isinstance(e, LlmText)) == "It's free."
    await replies.close()
    await chat.close()
    await emulator.stop()


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def test_server_sent_events_join_their_data_lines_and_skip_the_rest() -> None:
    from core.providers.openai import sse_data

    lines = _lines(": a comment", "event: x", 'data: {"a":', "data:1}", "", "", "id: 7", "data: [DONE]")
    assert [data async for data in sse_data(lines)] == ['{"a":\n1}', "[DONE]"]


def _chat_over(body: bytes) -> OpenAiChat:
    import httpx

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    chat = OpenAiChat("sk-test-key", "gpt-4o-mini", "http://model.invalid/v1")
    chat._client = openai.AsyncOpenAI(  # the stream as a server would send it, byte for byte
        api_key="sk-test-key",
        base_url="http://model.invalid/v1",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(answer)),
    )
    return chat


async def test_a_chunk_that_is_not_json_is_a_clear_error() -> None:
    chat = _chat_over(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: <html>oops\n\n')
    with pytest.raises(LlmError, match=r"not a chat\.completion\.chunk"):
        [p async for p in chat.stream(MESSAGES)]


async def test_the_stream_is_read_as_the_sdk_reads_it() -> None:
    """The same bytes through the SDK's own stream and through ours: the same text, the same end."""
    chunks = [
        {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Two "}}]},
        {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "at 7."}}]},
        {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 9}},
    ]
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks).encode() + b"data: [DONE]\n\n"
    chat = _chat_over(body)
    ours = [delta async for delta in chat.deltas(MESSAGES)]
    sdk = await chat._client.chat.completions.create(model="m", messages=[], stream=True)
    theirs = [chunk async for chunk in sdk if chunk.choices]
    assert "".join(d.text for d in ours) == "".join(c.choices[0].delta.content or "" for c in theirs) == "Two at 7."
    assert [d.finish_reason for d in ours if d.finish_reason] == ["stop"]
    await chat.close()
