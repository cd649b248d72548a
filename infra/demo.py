"""`parley demo`: one whole simulated call, end to end, on this machine.

It starts DynamoDB (moto's server on loopback), the provider emulators, the webhook and the media
service (each `parley serve`, the production server), then dials like Twilio: posts the signed
voice webhook, follows the TwiML's `<Stream>` and runs the scripted call: the greeting, a turn with
a pause shorter than the threshold inside it, the agent's reply, a barge-in part way through the
next reply, a last turn, the hang-up. It prints the transcript as the caller heard it, a per-turn
latency table and the call's DynamoDB item, and writes the call's two-channel audio (caller left,
agent right) and a JSON report. With `--real` the providers are the real ones (keys from the
environment) and only the caller, the servers and DynamoDB are local.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import boto3

from core.store import CallStore, create_table
from infra.caller import CallReport, HangUp, Pause, Say, SimulatedCaller, Step, WaitForAgent, dial
from infra.local import Service, local_dynamodb

TOKEN = "demo-twilio-auth-token"
MEDIA_STREAM_URL = "wss://media.parley.local/media"
PUBLIC_BASE_URL = "https://hooks.parley.local"
CALL_SID = "CA" + "d" * 32
GREETING = "Hello! This is Parley. How can I help?"

DEMO_SCRIPT: list[Step] = [
    WaitForAgent(quiet_ms=300),  # the greeting
    Say("book_table"),
    Pause(1200),  # shorter than the 2 s threshold: still the same turn
    Say("tomorrow"),
    Say("actually", after_agent_ms=1800),  # cuts in part way through the reply
    WaitForAgent(),
    Say("goodbye"),
    WaitForAgent(),
    HangUp(),
]


def run_demo(out: Path, real: bool = False) -> int:
    out.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    aws = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"}
    services: list[Service] = []
    with local_dynamodb() as dynamodb_url:
        aws["AWS_ENDPOINT_URL_DYNAMODB"] = dynamodb_url
        os.environ.update(aws)
        client = boto3.client("dynamodb", endpoint_url=dynamodb_url)
        create_table(client, "parley-calls")
        try:
            environment = {
                **base,
                **aws,
                "CALLS_TABLE": "parley-calls",
                "TWILIO_AUTH_TOKEN": TOKEN,
                "MEDIA_STREAM_URL": MEDIA_STREAM_URL,
                "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
                "GREETING": GREETING,
                "SILENCE_THRESHOLD": "2.0",
                "POWERTOOLS_SERVICE_NAME": "parley-demo",
            }
            if not real:
                emulators = Service(
                    "emulators", [sys.executable, "-m", "infra.emulators"], environment, out / "emulators.log"
                )
                services.append(emulators)
                environment.update(emulators.ready)
            parley = [sys.executable, "-m", "handlers.cli", "serve"]
            media = Service(
                "media", [*parley, "media", "--host", "127.0.0.1", "--port", "0"], environment, out / "media.log"
            )
            services.append(media)
            webhook = Service(
                "webhook", [*parley, "webhook", "--host", "127.0.0.1", "--port", "0"], environment, out / "webhook.log"
            )
            services.append(webhook)
            report, caller = asyncio.run(_call(media.ready["listening"], webhook.ready["listening"]))
        finally:
            for service in reversed(services):
                service.stop()
        item = CallStore(client, "parley-calls").get_call(CALL_SID)
    return _report(out, report, caller, item)


async def _call(media_url: str, webhook_url: str) -> tuple[CallReport, SimulatedCaller]:
    form = {
        "AccountSid": "AC" + "0" * 32,
        "ApiVersion": "2010-04-01",
        "CallSid": CALL_SID,
        "CallStatus": "ringing",
        "Direction": "inbound",
        "From": "+15551234567",
        "To": "+15557654321",
        "Caller": "+15551234567",
        "Called": "+15557654321",
    }
    # Twilio signs the public URL it was given; locally the request goes to the loopback address.
    stream_url, parameters = await asyncio.to_thread(
        dial, f"{PUBLIC_BASE_URL}/voice", TOKEN, form, deliver_to=f"{webhook_url}/voice"
    )
    if stream_url != MEDIA_STREAM_URL:
        raise RuntimeError(f"the TwiML streams to {stream_url}, expected {MEDIA_STREAM_URL}")
    caller = SimulatedCaller(
        media_url.replace("http://", "ws://") + "/media",
        TOKEN,
        DEMO_SCRIPT,
        signed_url=MEDIA_STREAM_URL,
        call_sid=CALL_SID,
        stream_sid="MZ" + "d" * 32,
        parameters=parameters,
    )
    return await caller.run(), caller


def _report(out: Path, report: CallReport, caller: SimulatedCaller, item: dict[str, Any] | None) -> int:
    caller.write_recording(out / "call.wav")
    print("\n=== Transcript (as the caller heard it)")
    print(item["transcript"] if item else "(no call item was written)")
    print("\n=== Latency at the caller (2.0 s silence threshold)")
    print(f"{'turn':<5} {'caller said':<42} {'reply latency':>14} {'beyond threshold':>17}")
    turns = [t for t in (item or {}).get("turns", []) if t["role"] == "caller"]
    for index, latency in enumerate(report.reply_latencies_ms):
        said = turns[index]["text"] if index < len(turns) else "?"
        said = said if len(said) <= 40 else said[:37] + "..."
        print(f"{index + 1:<5} {said:<42} {latency:>11.0f} ms {latency - 2000:>+14.0f} ms")
    for latency in report.barge_in_latencies_ms:
        print(f"barge-in: caller speech onset -> clear received: {latency:.0f} ms")
    print("\n=== The call's DynamoDB item")
    print(json.dumps(item, indent=2, default=str))
    (out / "report.json").write_text(json.dumps({"report": report.as_dict(), "item": item}, indent=2, default=str))
    print(f"\nWrote {out / 'call.wav'} (caller left, agent right), {out / 'report.json'} and the services' logs.")
    ok = item is not None and item.get("turn_count") == 3 and report.clears_received == 1
    if not ok:
        print("The demo call did not go as scripted; see the logs above.", file=sys.stderr)
    return 0 if ok else 1
