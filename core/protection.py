"""ECS task scale-in protection, held while this task has live calls.

To stop a task at a deploy or a scale-in, ECS deregisters it from the load balancer, waits the target
group's deregistration delay, sends SIGTERM, waits `StopTimeout` (120 s at most on Fargate) and kills
it: a call longer than those minutes is cut. A task that has set scale-in protection through the ECS
agent (`PUT $ECS_AGENT_URI/task-protection/v1/state`, AWS: "Amazon ECS task scale-in protection
endpoint") is neither chosen by a scale-in nor replaced by a deployment until the protection is cleared
or expires (1 to 2,880 minutes). So the media service protects its task when the first call starts,
renews the protection at half its lifetime while calls last, and clears it when the last call ends.

The endpoint is a courtesy, not a dependency: when it refuses or cannot be reached, the failure is
logged and counted (`TaskProtectionFailures`, which has an alarm) and no call is touched. The next
change of state, or the next renewal, tries again.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from core import metrics
from core.logs import logger

PROTECTION_PATH = "/task-protection/v1/state"


class TaskProtection:
    """The ECS agent's protection endpoint for this task."""

    def __init__(self, agent_uri: str, expires_minutes: int, client: httpx.AsyncClient | None = None) -> None:
        if not 1 <= expires_minutes <= 2880:
            raise ValueError(f"ExpiresInMinutes must be 1 to 2880, not {expires_minutes}")
        self.url = agent_uri.rstrip("/") + PROTECTION_PATH
        self.expires_minutes = expires_minutes
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(5.0))
        self.protected = False

    async def set(self, protected: bool) -> bool:
        """Ask the agent; True when it agreed. Never raises for the endpoint's sake."""
        body: dict[str, object] = {"ProtectionEnabled": protected}
        if protected:
            body["ExpiresInMinutes"] = self.expires_minutes
        try:
            response = await self._client.put(self.url, json=body)
            answer = response.json() if response.content else {}
            if response.status_code != 200 or "failure" in answer or "error" in answer:
                problem = answer.get("failure") or answer.get("error") or response.text[:200]
                raise RuntimeError(f"HTTP {response.status_code}: {problem}")
        except Exception as error:
            metrics.count("TaskProtectionFailures")
            logger.error(
                "could not change the task's scale-in protection; a scale-in or deploy may cut live calls",
                extra={"protected": protected, "error": str(error)},
            )
            return False
        self.protected = protected
        logger.info("task scale-in protection changed", extra={"protected": protected})
        return True

    async def aclose(self) -> None:
        await self._client.aclose()


async def hold_while_busy(
    protection: TaskProtection, busy: asyncio.Event, idle: asyncio.Event, renew_every_s: float | None = None
) -> None:
    """Protect once `busy` (a call is live), renewing every `renew_every_s` (half the lifetime); clear
    once `idle`. Runs until cancelled; a cancelled holder leaves the protection to expire by itself."""
    if renew_every_s is None:
        renew_every_s = protection.expires_minutes * 60 / 2
    while True:
        await busy.wait()
        await protection.set(True)
        while not idle.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), timeout=renew_every_s)
            if not idle.is_set():
                await protection.set(True)  # renewed before it expires
        await protection.set(False)
