"""`parley demo`: one whole simulated call, end to end, on this machine.

It starts DynamoDB (moto's server on loopback), the provider emulators, a team's tool server, the
webhook and the media service (each `parley serve`, the production server), then calls through the
Twilio emulator: the signed voice webhook, its TwiML, the stream, the status callbacks, and what
follows the stream. The scripted call: the greeting, a turn with a pause shorter than the threshold
inside it, the agent checking availability with the team's HTTP tool before it answers, a barge-in
part way through the next reply, the caller's goodbye, and the agent ending the call itself after
its own goodbye was heard (Twilio's `/after-stream` hangs up). It prints what Twilio did, the
transcript as the caller heard it (tool calls included), a per-turn latency table and the call's
DynamoDB item, and writes the call's two-channel audio (caller left, agent right) and a JSON report.
With `--real` the providers are the real ones (keys from the environment) and only the caller,
Twilio, the tool, the servers and DynamoDB are local.
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
from infra.caller import Pause, Say, Step, WaitForAgent
from infra.emulators.twilio import TwilioCall, TwilioEmulator
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
    Say("actually", after_agent_ms=4500),  # cuts in part way through the reply, after the tool's answer
    WaitForAgent(),
    Say("goodbye"),
    WaitForAgent(quiet_ms=15_000, timeout_ms=20_000),  # the agent says goodbye and hangs up itself
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
            tools = Service("tools", [sys.executable, "-m", "infra.tool_server"], environment, out / "tools.log")
            services.append(tools)
            (out / "tools.json").write_text(json.dumps(tools.ready["tools"]))
            environment["TOOLS_FILE"] = str(out / "tools.json")
            parley = [sys.executable, "-m", "handlers.cli", "serve"]
            media = Service(
                "media", [*parley, "media", "--host", "127.0.0.1", "--port", "0"], environment, out / "media.log"
            )
            services.append(media)
            webhook = Service(
                "webhook", [*parley, "webhook", "--host", "127.0.0.1", "--port", "0"], environment, out / "webhook.log"
            )
            services.append(webhook)
            call = asyncio.run(_call(media.ready["listening"], webhook.ready["listening"]))
        finally:
            for service in reversed(services):
                service.stop()
        item = CallStore(client, "parley-calls").get_call(CALL_SID)
    return _report(out, call, item)


async def _call(media_url: str, webhook_url: str) -> TwilioCall:
    """Twilio's side of the call: the signed /voice, its TwiML, the stream, what follows it."""
    twilio = TwilioEmulator(
        TOKEN,
        public_base_url=PUBLIC_BASE_URL,
        webhook_url=webhook_url,
        media_urls=[media_url.replace("http://", "ws://") + "/media"],
        media_stream_url=MEDIA_STREAM_URL,
        status_callback=f"{PUBLIC_BASE_URL}/status",
    )
    try:
        return await twilio.place_call([DEMO_SCRIPT], call_sid=CALL_SID)
    finally:
        await twilio.aclose()


def _report(out: Path, call: TwilioCall, item: dict[str, Any] | None) -> int:
    report, caller = call.streams[0], call.callers[0]
    caller.write_recording(out / "call.wav")
    print("\n=== What Twilio did (seconds since the call began)")
    for at, what in call.steps:
        print(f"{at:7.2f}  {what}")
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
    twilio = {"steps": call.steps, "ended_by": call.ended_by}
    document = {"report": report.as_dict(), "twilio": twilio, "item": item}
    (out / "report.json").write_text(json.dumps(document, indent=2, default=str))
    print(f"\nWrote {out / 'call.wav'} (caller left, agent right), {out / 'report.json'} and the services' logs.")
    ok = (
        item is not None
        and item.get("turn_count") == 3
        and report.clears_received == 1
        and item.get("outcome") == "completed_by_agent"
        and call.ended_by == "hangup"
        and any(turn.get("tools") for turn in item.get("turns", []))
    )
    if not ok:
        print("The demo call did not go as scripted; see the logs above.", file=sys.stderr)
    return 0 if ok else 1
