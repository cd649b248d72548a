"""`parley serve both`: the webhook and the media service on one port behind a tunnel, with the
public URLs derived from the tunnel's."""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from twilio.request_validator import RequestValidator

from core.config import ConfigError
from handlers.local import public_urls
from infra.caller import HangUp, Pause, SimulatedCaller
from infra.local import Service, local_dynamodb, local_table

TUNNEL = "https://abc123.ngrok.app"
TOKEN = "local-auth-token-0123456789"


def test_the_public_urls_come_from_the_tunnels() -> None:
    assert public_urls("https://abc123.ngrok.app/") == {
        "PUBLIC_BASE_URL": "https://abc123.ngrok.app",
        "MEDIA_STREAM_URL": "wss://abc123.ngrok.app/media",
    }
    assert public_urls("https://tunnel.example.com:8443")["MEDIA_STREAM_URL"] == "wss://tunnel.example.com:8443/media"
    for bad in ("http://abc.ngrok.app", "https://abc.ngrok.app/voice", "abc.ngrok.app"):
        with pytest.raises(ConfigError, match="--public-url"):
            public_urls(bad)


async def test_one_port_answers_the_webhook_and_the_media_socket(tmp_path: Path) -> None:
    with local_dynamodb() as dynamodb_url:
        _, aws = local_table(dynamodb_url, "calls-local")
        environment = {
            key: value for key, value in os.environ.items() if key not in ("PUBLIC_BASE_URL", "MEDIA_STREAM_URL")
        }
        environment.update(
            {
                **aws,
                "TWILIO_AUTH_TOKEN": TOKEN,
                "DEEPGRAM_API_KEY": "dg",
                "OPENAI_API_KEY": "sk",
                "ELEVENLABS_API_KEY": "el",
            }
        )
        command = [sys.executable, "-m", "handlers.cli", "serve", "both", "--host", "127.0.0.1", "--port", "0"]
        server = Service("both", [*command, "--public-url", TUNNEL], environment, tmp_path / "both.log")
        base = server.ready["listening"]
        try:
            form = {"CallSid": "CA" + "7" * 32, "From": "+15551234567", "To": "+15557654321", "Direction": "inbound"}
            signature = RequestValidator(TOKEN).compute_signature(f"{TUNNEL}/voice", form)  # what Twilio signs
            headers = {"X-Twilio-Signature": signature, "Host": "abc123.ngrok.app", "X-Forwarded-Proto": "https"}
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                voice = await http.post("/voice", data=form, headers=headers)
                health = await http.get("/healthz")
            stream = ET.fromstring(voice.text).find("./Connect/Stream")
            assert stream is not None and stream.get("url") == "wss://abc123.ngrok.app/media"
            assert health.json()["active_calls"] == 0 and "loop_lag_ms" in health.json()  # the media app's health

            refused = server.watch_for("refused a stream")
            caller = SimulatedCaller(
                base.replace("http://", "ws://") + "/media",
                TOKEN,
                [Pause(20), HangUp()],
                signed_url="wss://abc123.ngrok.app/media",
                call_sid="CA" + "7" * 32,
                parameters={"token": "0.forged"},
            )
            await caller.run()  # the media app refuses a stream whose token it did not make
            assert refused.wait(timeout=10)
        finally:
            server.stop()
