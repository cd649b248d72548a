"""Scale-in protection against a stand-in of the ECS agent's endpoint: set at the first call, renewed
while calls last, cleared at the last; a failing endpoint is logged and never ends a call."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from core import metrics
from core.logs import logger
from core.protection import TaskProtection, hold_while_busy
from core.registry import CallRegistry
from core.server import start_in_loop
from infra.emulators.ecs_agent import EcsAgent


class LiveCall:
    """A call as the registry sees it: it runs until hung up, or until ended from outside."""

    def __init__(self, call_sid: str) -> None:
        self.call_sid = call_sid
        self.hung_up = asyncio.Event()
        self.ended_by: str | None = None

    async def run(self, on_started: Callable[[Any], None]) -> None:
        on_started(self)
        await self.hung_up.wait()

    def end(self, reason: str) -> None:
        self.ended_by = reason
        self.hung_up.set()


@pytest.fixture
async def agent() -> AsyncIterator[tuple[EcsAgent, str]]:
    stand_in = EcsAgent()
    server = await start_in_loop(stand_in)
    yield stand_in, server.url
    await server.stop()


async def test_protection_follows_the_live_calls(agent: tuple[EcsAgent, str]) -> None:
    stand_in, url = agent
    registry = CallRegistry()
    protection = TaskProtection(url, expires_minutes=60)
    holder = asyncio.create_task(hold_while_busy(protection, registry.busy, registry.idle, renew_every_s=0.05))
    await asyncio.sleep(0)
    assert stand_in.requests == []  # nothing to protect yet

    first, second = LiveCall("CA1"), LiveCall("CA2")
    calls = [asyncio.create_task(registry.run(first))]  # type: ignore[arg-type]
    await stand_in.until(lambda: stand_in.protected)  # at the first call
    assert stand_in.requests[0] == {"ProtectionEnabled": True, "ExpiresInMinutes": 60}
    calls.append(asyncio.create_task(registry.run(second)))  # type: ignore[arg-type]
    first.hung_up.set()
    await stand_in.until(lambda: len(stand_in.requests) >= 3)  # renewed while a call is live
    assert all(request["ProtectionEnabled"] for request in stand_in.requests) and stand_in.protected
    second.hung_up.set()
    await asyncio.gather(*calls)
    await stand_in.until(lambda: not stand_in.protected)  # cleared at the last
    assert stand_in.requests[-1] == {"ProtectionEnabled": False}
    holder.cancel()
    await protection.aclose()


async def test_a_failing_endpoint_is_logged_and_never_ends_a_call(agent: tuple[EcsAgent, str]) -> None:
    stand_in, url = agent
    stand_in.failing = True
    registry = CallRegistry()
    protection = TaskProtection(url, expires_minutes=60)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    logger.addHandler(handler)
    holder = asyncio.create_task(hold_while_busy(protection, registry.busy, registry.idle, renew_every_s=0.05))
    call = LiveCall("CA3")
    running = asyncio.create_task(registry.run(call))  # type: ignore[arg-type]
    await stand_in.until(lambda: len(stand_in.requests) >= 2)  # tried, then again at the renewal
    assert not protection.protected and call.ended_by is None and not running.done()
    assert "could not change the task's scale-in protection" in lines.getvalue()
    assert "TaskProtectionFailures" in metrics.metrics.metric_set
    stand_in.failing = False
    await stand_in.until(lambda: stand_in.protected)  # at the next renewal, once it answers
    call.hung_up.set()
    await running
    await stand_in.until(lambda: not stand_in.protected)  # cleared at the end
    logger.removeHandler(handler)
    holder.cancel()
    await protection.aclose()


async def test_an_unreachable_agent_is_a_failure_not_an_exception() -> None:
    protection = TaskProtection("http://127.0.0.1:9", expires_minutes=5)
    assert await protection.set(True) is False
    await protection.aclose()
