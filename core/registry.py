"""The live calls of one process, keyed by CallSid: the seam for anything outside a call.

A call is in the registry from the moment its runner starts until it ends; it can be found by
CallSid once its stream's `start` has named it. Through the registry, outside code can feed a live
call an event (`inject`: an update from the webhook, a console's action) and watch what it does
(`observe`: every event the engine handles and the actions it answered with, for a console tap).
The drain uses it to count calls, wait until none is left, and end them all at its deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from core.call import CallRunner, Observer
from core.events import EndReason, Event


class UnknownCall(LookupError):
    """No live call with that CallSid in this process (it ended, or another task holds it)."""

    def __init__(self, call_sid: str) -> None:
        self.call_sid = call_sid
        super().__init__(f"no live call {call_sid} in this process; it has ended or another task serves it")


class CallRegistry:
    def __init__(self) -> None:
        self._runners: set[CallRunner] = set()
        self._by_sid: dict[str, CallRunner] = {}
        self._waiters: dict[str, list[asyncio.Future[CallRunner]]] = {}
        self.idle = asyncio.Event()  # no live call
        self.idle.set()
        self.busy = asyncio.Event()  # at least one live call (scale-in protection waits on it)

    def __len__(self) -> int:
        return len(self._runners)

    def __contains__(self, call_sid: object) -> bool:
        return call_sid in self._by_sid

    def call_sids(self) -> list[str]:
        return list(self._by_sid)

    def get(self, call_sid: str) -> CallRunner:
        try:
            return self._by_sid[call_sid]
        except KeyError:
            raise UnknownCall(call_sid) from None

    async def run(self, runner: CallRunner) -> None:
        self._runners.add(runner)
        self.idle.clear()
        self.busy.set()
        try:
            await runner.run(on_started=self._started)
        finally:
            self._runners.discard(runner)
            if self._by_sid.get(runner.call_sid) is runner:
                del self._by_sid[runner.call_sid]
            if not self._runners:
                self.busy.clear()
                self.idle.set()

    def _started(self, runner: CallRunner) -> None:
        # A resumed stream of the same call replaces the one before it.
        self._by_sid[runner.call_sid] = runner
        for waiter in self._waiters.pop(runner.call_sid, []):
            if not waiter.done():
                waiter.set_result(runner)

    async def wait_for(self, call_sid: str) -> CallRunner:
        """The live call with this CallSid, as soon as its stream has started (bound it with a timeout)."""
        if call_sid in self._by_sid:
            return self._by_sid[call_sid]
        waiter: asyncio.Future[CallRunner] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(call_sid, []).append(waiter)
        try:
            return await waiter
        finally:
            waiters = self._waiters.get(call_sid, [])
            if waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[call_sid]

    def inject(self, call_sid: str, event: Event) -> None:
        """Feed the live call an event, stamped with its audio clock's current reading."""
        if not self.get(call_sid).inject(event):
            raise UnknownCall(call_sid)

    def observe(self, call_sid: str, observer: Observer) -> Callable[[], None]:
        """Watch a live call's events and actions until it ends or the returned function is called."""
        return self.get(call_sid).observe(observer)

    def end_all(self, reason: EndReason = "shutdown") -> None:
        for runner in list(self._runners):
            runner.end(reason)

    async def wait_idle(self) -> None:
        await self.idle.wait()
