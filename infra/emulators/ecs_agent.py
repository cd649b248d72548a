"""A stand-in for the ECS container agent's task scale-in protection endpoint
(`$ECS_AGENT_URI/task-protection/v1/state`, AWS: "Amazon ECS task scale-in protection endpoint"):
it keeps the state, answers as the agent does, and can be told to fail."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from infra.asgi import Receive, Scope, Send, lifespan, read_body, respond

TASK_ARN = "arn:aws:ecs:us-east-1:123456789012:task/parley/0123456789abcdef0123456789abcdef"


class EcsAgent:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []  # each PUT's body, in order
        self.protected = False
        self.failing = False  # answer 500 with an error, as the agent does when ECS refuses
        self.changed = asyncio.Condition()  # notified after each PUT is answered

    async def until(self, condition: Callable[[], bool], deadline_s: float = 5.0) -> None:
        """Wait, with a deadline, until `condition` holds after some PUT (or already does)."""
        async with asyncio.timeout(deadline_s), self.changed:
            await self.changed.wait_for(condition)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await lifespan(scope, receive, send):
            return
        if scope["path"] != "/task-protection/v1/state":
            await respond(send, 404, b'{"error": {"Code": "NotFound"}}')
            return
        if scope["method"] == "PUT":
            body = json.loads(await read_body(receive))
            self.requests.append(body)
            if self.failing:
                error = {"error": {"Arn": TASK_ARN, "Code": "ServerException", "Message": "the stand-in was told to"}}
                await respond(send, 500, json.dumps(error).encode())
            else:
                self.protected = bool(body["ProtectionEnabled"])
                await self._answer_state(send)
            async with self.changed:
                self.changed.notify_all()
            return
        await self._answer_state(send)

    async def _answer_state(self, send: Send) -> None:
        expires = time.time() + 60 * 120 if self.protected else None
        state = {"ExpirationDate": expires, "ProtectionEnabled": self.protected, "TaskArn": TASK_ARN}
        await respond(send, 200, json.dumps({"protection": state}).encode())
