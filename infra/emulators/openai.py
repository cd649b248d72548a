"""An OpenAI chat-completions emulator: `POST /v1/chat/completions`, streamed as server-sent events.

It checks `Authorization: Bearer <key>` (401 with OpenAI's error body otherwise), answers the n-th
caller turn (the number of user messages) with the scenario's n-th answer, a few characters a
chunk after `llm_first_text_ms`, then the usage chunk when `stream_options.include_usage` asks for
it, then `data: [DONE]`. An `Answer` with a tool, when the request offers that tool, streams its text
and then the tool call as the API does (the id and name first, the arguments in pieces, by `index`;
`finish_reason` "tool_calls"); a request whose last message is that tool's result gets the answer's
`then`, and one whose last message is a system note (the agent back from a failed transfer) gets the
scenario's `back_from_transfer`. Faults: the first requests answered 500/429 with OpenAI's error body, or
an error event mid-stream. A client that disconnects mid-stream (a barge-in) is noticed and the
generation stops. A non-streamed request gets one `chat.completion` object (`parley check`).
A bare ASGI app rather than a framework: it needs exact control over status, headers and when
each byte goes out.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

from core.server import RunningServer, start_in_loop
from infra.asgi import Receive, Scope, Send, lifespan, read_body, respond
from infra.emulators.scenario import Answer, Scenario

_REASONING_MODELS = ("o1", "o3", "o4", "gpt-5")


def _error(message: str, kind: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class OpenAiEmulator:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self.tool_calls = 0
        self.disconnected = asyncio.Event()  # set when a client left mid-stream
        self._running: RunningServer | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._running = await start_in_loop(self, host, port)
        return f"{self._running.url}/v1"

    async def stop(self) -> None:
        if self._running is not None:
            await self._running.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await lifespan(scope, receive, send) or scope["type"] != "http":
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if scope["method"] != "POST" or scope["path"] != "/v1/chat/completions":
            await respond(send, 404, _error(f"Unknown path {scope['path']}", "invalid_request_error"))
            return
        if headers.get("authorization") != f"Bearer {self.scenario.openai_key}":
            await respond(send, 401, _error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"))
            return
        body = await read_body(receive)
        try:
            request = json.loads(body)
            messages = request["messages"]
        except (ValueError, KeyError, TypeError):
            await respond(
                send, 400, _error("We could not parse the JSON body of your request.", "invalid_request_error")
            )
            return
        self.requests.append(request)
        faults = self.scenario.faults
        if len(self.requests) <= faults.openai_fail_first:
            kind = "rate_limit_exceeded" if faults.openai_fail_status == 429 else "server_error"
            await respond(send, faults.openai_fail_status, _error("The emulator was told to fail.", kind))
            return
        turn = sum(1 for m in messages if m.get("role") == "user") - 1
        scripted = self.scenario.answer(max(0, turn))
        offered = {tool.get("function", {}).get("name") for tool in request.get("tools") or []}
        tool_call: tuple[str, str] | None = None
        last = messages[-1].get("role") if messages else None
        if last == "tool":
            answer = scripted.then if isinstance(scripted, Answer) else ""
        elif last == "system" and len(messages) > 1:
            answer = self.scenario.back_from_transfer
        elif isinstance(scripted, Answer):
            answer = scripted.text
            if scripted.tool in offered:
                tool_call = (scripted.tool, json.dumps(scripted.arguments))
        else:
            answer = scripted
        model = request.get("model", "gpt-4o-mini")
        if "max_tokens" in request and model.startswith(_REASONING_MODELS):
            # As the API answers reasoning models: `max_tokens` is deprecated and refused for them.
            refusal = (
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead."
            )
            await respond(send, 400, _error(refusal, "invalid_request_error", "unsupported_parameter"))
            return
        limit = request.get("max_completion_tokens") or request.get("max_tokens")
        if not request.get("stream"):
            words = answer.split()[: max(1, int(request.get("max_tokens") or 1_000_000))]
            await respond(send, 200, json.dumps(self._completion(model, " ".join(words))).encode())
            return
        await self._stream(
            send,
            receive,
            model,
            answer,
            bool((request.get("stream_options") or {}).get("include_usage")),
            int(limit) if limit else None,
            tool_call,
        )

    @staticmethod
    def _completion(model: str, text: str) -> dict[str, Any]:
        return {
            "id": "chatcmpl-emulated",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": len(text.split()),
                "total_tokens": 10 + len(text.split()),
            },
        }

    async def _stream(
        self,
        send: Send,
        receive: Receive,
        model: str,
        answer: str,
        include_usage: bool,
        limit: int | None,
        tool_call: tuple[str, str] | None = None,
    ) -> None:
        disconnected = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        watcher = asyncio.create_task(watch())
        created = int(time.time())

        def chunk(
            delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None, choices: bool = True
        ) -> bytes:
            payload = {
                "id": "chatcmpl-emulated",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
                "usage": usage,
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
                }
            )
            await send(
                {"type": "http.response.body", "body": chunk({"role": "assistant", "content": ""}), "more_body": True}
            )
            latency = self.scenario.latency
            try:
                await asyncio.wait_for(disconnected.wait(), timeout=latency.llm_first_text_ms / 1000)
                self._count_disconnect()
                return
            except TimeoutError:
                pass
            pieces = re.findall(r"\S+\s*", answer)
            finish = "stop"
            if self.scenario.faults.openai_content_filter:
                pieces, finish = [], "content_filter"  # the filter stopped it before any text
            elif limit is not None and len(pieces) > limit:
                pieces, finish = pieces[:limit], "length"  # a piece stands for a token here
            for index, piece in enumerate(pieces):
                if disconnected.is_set():
                    self._count_disconnect()
                    return
                if self.scenario.faults.openai_midstream_error and index == len(pieces) // 2:
                    error = {
                        "error": {
                            "message": "The server had an error while processing your request.",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                    await send(
                        {
                            "type": "http.response.body",
                            "body": f"data: {json.dumps(error)}\n\n".encode(),
                            "more_body": False,
                        }
                    )
                    return
                await send({"type": "http.response.body", "body": chunk({"content": piece}), "more_body": True})
                if latency.llm_token_interval_ms:
                    await asyncio.sleep(latency.llm_token_interval_ms / 1000)
            if tool_call is not None and finish == "stop":
                name, arguments = tool_call
                self.tool_calls += 1
                call_id = f"call_emulated{self.tool_calls}"
                first = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
                await send({"type": "http.response.body", "body": chunk({"tool_calls": [first]}), "more_body": True})
                for start in range(0, len(arguments), 7):  # the arguments come in pieces, as tokens
                    piece = {"index": 0, "function": {"arguments": arguments[start : start + 7]}}
                    await send(
                        {"type": "http.response.body", "body": chunk({"tool_calls": [piece]}), "more_body": True}
                    )
                finish = "tool_calls"
            await send({"type": "http.response.body", "body": chunk({}, finish=finish), "more_body": True})
            if include_usage:
                usage = {"prompt_tokens": 25, "completion_tokens": len(pieces), "total_tokens": 25 + len(pieces)}
                await send(
                    {"type": "http.response.body", "body": chunk({}, usage=usage, choices=False), "more_body": True}
                )
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except OSError:
            self._count_disconnect()  # the client went away mid-write
        finally:
            watcher.cancel()

    def _count_disconnect(self) -> None:
        self.disconnects += 1
        self.disconnected.set()
