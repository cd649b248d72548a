"""`parley check` against the emulators: ok when all is well, a clear line when something is not."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from core.check import run_checks
from core.config import ProviderSettings
from handlers.cli import main
from infra.emulators.__main__ import Emulators
from infra.emulators.scenario import demo_scenario


@pytest.fixture
async def emulators() -> AsyncIterator[Emulators]:
    running = Emulators(demo_scenario())
    await running.start()
    yield running
    await running.stop()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_all_providers_pass_against_the_emulators(emulators: Emulators) -> None:
    results = await run_checks(ProviderSettings.from_env(emulators.environment()))
    assert [(r.provider, r.ok) for r in results] == [("deepgram", True), ("openai", True), ("elevenlabs", True)]
    assert all(" ok " in r.line() for r in results)


@pytest.mark.parametrize(
    ("changes", "provider", "expected"),
    [
        ({"DEEPGRAM_API_KEY": "wrong"}, "deepgram", "the key was refused (HTTP 401): check DEEPGRAM_API_KEY"),
        ({"OPENAI_API_KEY": "wrong"}, "openai", "check OPENAI_API_KEY"),
        ({"ELEVENLABS_API_KEY": "wrong"}, "elevenlabs", "the key was refused (HTTP 401): check ELEVENLABS_API_KEY"),
        ({"DEEPGRAM_URL": "CLOSED/v1/listen"}, "deepgram", "connection refused: is DEEPGRAM_URL right"),
        ({"OPENAI_BASE_URL": "CLOSED/v1"}, "openai", "check OPENAI_BASE_URL"),
        ({"ELEVENLABS_URL": "CLOSED"}, "elevenlabs", "connection refused: is ELEVENLABS_URL right"),
        ({"DEEPGRAM_URL": "PATH/v2/listen"}, "deepgram", "no such endpoint (HTTP 404): check DEEPGRAM_URL"),
        ({"OPENAI_BASE_URL": "PATH/v9"}, "openai", "no such endpoint"),
    ],
)
async def test_a_failure_names_the_provider_and_what_to_fix(
    emulators: Emulators, changes: dict[str, str], provider: str, expected: str
) -> None:
    environment = emulators.environment()
    for variable, value in changes.items():
        scheme = "http" if variable == "OPENAI_BASE_URL" else "ws"
        if value.startswith("CLOSED"):
            value = value.replace("CLOSED", f"{scheme}://127.0.0.1:{closed_port()}")
        elif value.startswith("PATH"):
            origin = environment[variable].split("/v1")[0]
            value = value.replace("PATH", origin)
        environment[variable] = value
    results = {r.provider: r for r in await run_checks(ProviderSettings.from_env(environment), timeout_s=5)}
    failed = results[provider]
    assert not failed.ok
    assert expected in failed.detail
    assert failed.line().startswith(f"{provider:<11} FAILED  ")
    assert all(r.ok for name, r in results.items() if name != provider)


def test_the_command_exits_non_zero_when_one_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def start() -> Emulators:
        running = Emulators(demo_scenario())
        await running.start()
        return running

    loop = asyncio.new_event_loop()
    running = loop.run_until_complete(start())
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        for variable, value in {**running.environment(), "DEEPGRAM_API_KEY": "wrong"}.items():
            monkeypatch.setenv(variable, value)
        assert main(["check"]) == 1
        output = capsys.readouterr().out.splitlines()
        assert output[0].startswith("deepgram    FAILED")
        assert output[1].startswith("openai      ok")
        monkeypatch.setenv("DEEPGRAM_API_KEY", running.scenario.deepgram_key)
        assert main(["check"]) == 0
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


def test_a_missing_key_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable in ("DEEPGRAM_API_KEY", "OPENAI_API_KEY", "ELEVENLABS_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir("/")
    assert main(["check"]) == 2
    assert "DEEPGRAM_API_KEY: is not set" in capsys.readouterr().err
