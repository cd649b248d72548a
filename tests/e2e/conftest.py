"""The whole media path on loopback: the real media app under uvicorn, the three emulators, DynamoDB
from moto, and the simulated Twilio caller, all in the test's event loop."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from core.call import call_services
from core.config import ConversationSettings, MediaSettings, ProviderSettings
from core.registry import CallRegistry
from core.secrets import AuthToken
from core.server import Drain, RunningServer, start_in_loop
from core.store import CallStore, create_table
from handlers.media import make_app
from infra.caller import SimulatedCaller, Step
from infra.emulators.__main__ import Emulators
from infra.emulators.scenario import Scenario, demo_scenario

TOKEN = "twilio-token-0123456789"
MEDIA_STREAM_URL = "wss://media.parley.test/media"


@dataclasses.dataclass
class Stack:
    emulators: Emulators
    server: RunningServer
    registry: CallRegistry
    store: CallStore
    drain: Drain

    @property
    def media_url(self) -> str:
        return self.server.url.replace("http://", "ws://") + "/media"

    def caller(self, script: list[Step], call_sid: str = "CA" + "a" * 32, **options: Any) -> SimulatedCaller:
        return SimulatedCaller(
            self.media_url,
            TOKEN,
            script,
            signed_url=MEDIA_STREAM_URL,
            call_sid=call_sid,
            stream_sid="MZ" + call_sid[2:],
            **options,
        )

    def item(self, call_sid: str = "CA" + "a" * 32) -> dict[str, Any]:
        item = self.store.get_call(call_sid)
        assert item is not None, f"no item for {call_sid}"
        return item

    def caller_turns(self, call_sid: str = "CA" + "a" * 32) -> list[str]:
        """The caller's turns as the call's item records them (speculative requests do not count)."""
        return [turn["text"] for turn in self.item(call_sid)["turns"] if turn["role"] == "caller"]


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> dict[str, str]:
    """Conversation settings for the stack; parametrize indirectly to change them."""
    return {"SILENCE_THRESHOLD": "2.0", "GREETING": "Hello! How can I help?", **getattr(request, "param", {})}


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Scenario:
    """The emulators' script; parametrize indirectly to change it."""
    scenario: Scenario = getattr(request, "param", None) or demo_scenario()
    return scenario


@pytest.fixture
async def stack(settings: dict[str, str], scenario: Scenario) -> AsyncIterator[Stack]:
    emulators = Emulators(scenario)
    await emulators.start()
    environment = {
        **emulators.environment(),
        **settings,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "MEDIA_STREAM_URL": MEDIA_STREAM_URL,
        "CALLS_TABLE": "calls",
    }
    with mock_aws():
        client = boto3.client("dynamodb")
        create_table(client, "calls")
        store = CallStore(client, "calls")
        media = MediaSettings.from_env(environment)
        registry = CallRegistry()
        drain = Drain(media.drain_seconds, registry.wait_idle, registry.end_all, lambda: len(registry))
        services = call_services(
            ProviderSettings.from_env(environment), ConversationSettings.from_env(environment), store, AuthToken(TOKEN)
        )
        server = await start_in_loop(make_app(media, services, registry, drain))
        try:
            yield Stack(emulators, server, registry, store, drain)
        finally:
            await server.stop()
            await emulators.stop()
