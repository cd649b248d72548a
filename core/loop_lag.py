"""How late the event loop runs what is due: the delay every call's barge-in decision can wait behind.

A coroutine asks to wake every `interval_s`; how much later than asked it wakes is the lag any other
ready callback saw at that moment (a long synchronous step, a burst of other calls' frames). The media
service keeps the last `window_s` (30 s) of samples and reports their p50/p99/max on `/healthz` and, each
minute, as the `EventLoopLag` metric; `parley bench` reads them during its rounds. One wake-up each
20 ms costs a few µs.
"""

from __future__ import annotations

import asyncio
import collections


class LoopLag:
    def __init__(self, interval_s: float = 0.02, window_s: float = 30.0) -> None:
        self.interval_s = interval_s
        self._samples: collections.deque[float] = collections.deque(maxlen=max(1, int(window_s / interval_s)))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self._samples.append(max(0.0, loop.time() - asked))

    def summary_ms(self) -> dict[str, float]:
        """p50, p99 and max of the window's lags, in ms (zeros before the first sample)."""
        ordered = sorted(self._samples)
        if not ordered:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}

        def at(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

        return {"p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1] * 1000, 1)}
