"""The loop-lag monitor: what it reports from its samples, and that it samples."""

from __future__ import annotations

import asyncio

from core.loop_lag import LoopLag


def test_the_summary_is_the_windows_percentiles_in_ms() -> None:
    lag = LoopLag(interval_s=0.02, window_s=2.0)  # 100 samples kept
    assert lag.summary_ms() == {"p50": 0.0, "p99": 0.0, "max": 0.0}
    for index in range(150):  # the first 50 fall out of the window
        lag._samples.append(0.5 if index < 50 else 0.001 * (index - 50))
    assert lag.summary_ms() == {"p50": 50.0, "p99": 99.0, "max": 99.0}


async def test_a_blocked_loop_shows_as_lag() -> None:
    lag = LoopLag(interval_s=0.001)
    monitor = asyncio.create_task(lag.run())
    async with asyncio.timeout(5):
        sampled = len(lag._samples)
        while len(lag._samples) == sampled:  # a synchronous step of 30 ms while a sample is due
            started = asyncio.get_running_loop().time()
            while asyncio.get_running_loop().time() - started < 0.03:
                pass
            await asyncio.sleep(0.001)
    monitor.cancel()
    assert lag.summary_ms()["max"] >= 25.0
