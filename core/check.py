"""`parley check`: does each configured provider accept our key and our protocol?

The successor of the old `test_connections.py`. For each provider it makes the smallest real
exchange with the configured URL and key and prints one line: ok with the round-trip time, or what
failed and what to change. A provider that fails makes the exit status non-zero.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

from websockets.exceptions import InvalidStatus, InvalidURI

from core.config import ProviderSettings
from core.providers import deepgram, elevenlabs
from core.providers.factory import stt_url, tts_url
from core.providers.openai import OpenAiChat


@dataclasses.dataclass(frozen=True)
class CheckResult:
    provider: str
    ok: bool
    elapsed_ms: float
    detail: str

    def line(self) -> str:
        if self.ok:
            return f"{self.provider:<11} ok      {self.elapsed_ms:6.0f} ms"
        return f"{self.provider:<11} FAILED  {self.detail}"


def _explain(error: BaseException, key_variable: str, url_variable: str) -> str:
    if isinstance(error, InvalidStatus):
        status = error.response.status_code
        if status in (401, 403):
            return f"the key was refused (HTTP {status}): check {key_variable}"
        if status == 404:
            return f"no such endpoint (HTTP 404): check {url_variable}"
        return f"the handshake was answered HTTP {status}: check {url_variable}"
    if isinstance(error, InvalidURI):
        return f"not a WebSocket URL ({error}): check {url_variable}"
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused: is {url_variable} right and the service up?"
    if isinstance(error, OSError):
        return f"could not connect ({error.strerror or error}): check {url_variable} and the network"
    if isinstance(error, TimeoutError):
        return f"no answer in time: check {url_variable} and the network"
    text = str(error)
    if "401" in text or "403" in text:
        return f"the key was refused ({text}): check {key_variable}"
    if "404" in text:
        return f"no such endpoint ({text}): check {url_variable}"
    if "connect" in text.lower():
        return f"{text}: check {url_variable} and that the service is up"
    return f"{type(error).__name__}: {text}"


async def _timed(
    provider: str, exchange: Callable[[], Awaitable[object]], key_variable: str, url_variable: str, timeout_s: float
) -> CheckResult:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(exchange(), timeout=timeout_s)
    except Exception as error:  # every failure becomes a line, never a traceback
        return CheckResult(provider, False, 0.0, _explain(error, key_variable, url_variable))
    return CheckResult(provider, True, (time.perf_counter() - started) * 1000, "")


async def run_checks(settings: ProviderSettings, timeout_s: float = 10.0) -> list[CheckResult]:
    listen = stt_url(settings, silence_threshold_ms=1000)
    speak = tts_url(settings, inactivity_timeout_s=20)

    async def openai_exchange() -> None:
        chat = OpenAiChat(
            settings.openai_api_key, settings.openai_model, settings.openai_base_url, timeout_s=timeout_s, max_retries=0
        )
        try:
            await chat.complete_once("Say OK.")
        finally:
            await chat.close()

    return list(
        await asyncio.gather(
            _timed(
                "deepgram",
                lambda: deepgram.check(listen, settings.deepgram_api_key),
                "DEEPGRAM_API_KEY",
                "DEEPGRAM_URL",
                timeout_s,
            ),
            _timed("openai", openai_exchange, "OPENAI_API_KEY", "OPENAI_BASE_URL", timeout_s),
            _timed(
                "elevenlabs",
                lambda: elevenlabs.check(speak, settings.elevenlabs_api_key),
                "ELEVENLABS_API_KEY",
                "ELEVENLABS_URL",
                timeout_s,
            ),
        )
    )
