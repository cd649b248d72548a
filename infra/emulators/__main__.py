"""Run the three emulators in one process: `python -m infra.emulators [--port-base N] [--scenario demo]`.

Prints one JSON line with their URLs once all three listen, then serves until terminated; the demo
and the benchmark read that line instead of waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from infra.emulators.deepgram import DeepgramEmulator
from infra.emulators.elevenlabs import ElevenLabsEmulator
from infra.emulators.openai import OpenAiEmulator
from infra.emulators.scenario import SCENARIOS, Scenario


class Emulators:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.deepgram = DeepgramEmulator(scenario)
        self.elevenlabs = ElevenLabsEmulator(scenario)
        self.openai = OpenAiEmulator(scenario)
        self.urls: dict[str, str] = {}

    async def start(self, host: str = "127.0.0.1") -> dict[str, str]:
        self.urls = {
            "DEEPGRAM_URL": await self.deepgram.start(host),
            "ELEVENLABS_URL": await self.elevenlabs.start(host),
            "OPENAI_BASE_URL": await self.openai.start(host),
        }
        return self.urls

    def environment(self) -> dict[str, str]:
        """The settings that point Parley at these emulators."""
        return {
            **self.urls,
            "DEEPGRAM_API_KEY": self.scenario.deepgram_key,
            "OPENAI_API_KEY": self.scenario.openai_key,
            "ELEVENLABS_API_KEY": self.scenario.elevenlabs_key,
        }

    async def stop(self) -> None:
        await asyncio.gather(self.deepgram.stop(), self.elevenlabs.stop(), self.openai.stop())


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="demo")
    emulators = Emulators(SCENARIOS[parser.parse_args().scenario]())
    await emulators.start()
    print(json.dumps(emulators.environment()), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await emulators.stop()


if __name__ == "__main__":
    asyncio.run(_main())
