"""`parley bench --call-control`: how fast the agent's decisions reach the call, measured from Twilio's view
(DESIGN.md section 5).

Each kind of call runs through real processes: DynamoDB (moto's server), the emulators playing that
kind's scenario, two `parley serve media` tasks, `parley serve webhook`, and the Twilio emulator running
its TwiML. Figures, per call:
* hang-up: the caller echoes the goodbye's last mark -> the webhook's `<Hangup/>` is in Twilio's hands;
* transfer: the announcement's last mark -> the webhook's `<Dial>` is in Twilio's hands;
* lost stream: the first media task is killed with SIGKILL mid-call -> the caller hears the agent again
  (through `/after-stream`, the other task, the restored conversation).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra.bench import machine, percentile
from infra.caller import HangUp, Say, Step, WaitForAgent
from infra.emulators.twilio import CalledParty, TwilioCall, TwilioEmulator
from infra.local import Service, local_dynamodb, local_table

TOKEN = "bench-call-control-token"
PUBLIC_BASE_URL = "https://hooks.parley.bench"
MEDIA_STREAM_URL = "wss://media.parley.bench/media"
SUPPORT = "+15551230000"
CALLS = 8


@contextlib.contextmanager
def _stack(out: Path, scenario: str) -> Iterator[tuple[TwilioEmulator, list[Service]]]:
    with local_dynamodb() as dynamodb_url:
        _, aws = local_table(dynamodb_url, f"bench-{scenario}")
        environment = {
            **os.environ,
            **aws,
            "TWILIO_AUTH_TOKEN": TOKEN,
            "MEDIA_STREAM_URL": MEDIA_STREAM_URL,
            "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
            "GREETING": "Hello! How can I help?",
            "TRANSFER_DESTINATIONS": f"support={SUPPORT}",
            "POWERTOOLS_SERVICE_NAME": "parley-bench",
        }
        services: list[Service] = []
        try:
            emulators = Service(
                "emulators",
                [sys.executable, "-m", "infra.emulators", "--scenario", scenario],
                environment,
                out / f"{scenario}-emulators.log",
            )
            services.append(emulators)
            environment.update(emulators.ready)
            serve = [sys.executable, "-m", "handlers.cli", "serve"]
            for name in ("media-1", "media-2"):
                command = [*serve, "media", "--host", "127.0.0.1", "--port", "0"]
                services.append(Service(name, command, environment, out / f"{scenario}-{name}.log"))
            webhook_command = [*serve, "webhook", "--host", "127.0.0.1", "--port", "0"]
            webhook = Service("webhook", webhook_command, environment, out / f"{scenario}-webhook.log")
            services.append(webhook)
            twilio = TwilioEmulator(
                TOKEN,
                public_base_url=PUBLIC_BASE_URL,
                webhook_url=webhook.ready["listening"],
                media_urls=[s.ready["listening"].replace("http://", "ws://") + "/media" for s in services[1:3]],
                media_stream_url=MEDIA_STREAM_URL,
                called_parties={SUPPORT: CalledParty("answer", ring_ms=200, talk_ms=200)},
                status_callback=f"{PUBLIC_BASE_URL}/status",
            )
            yield twilio, services
        finally:
            for service in reversed(services):
                service.stop()


def _after_last_mark_ms(call: TwilioCall) -> float | None:
    """The caller's last mark of the first stream -> the webhook's answer to /after-stream."""
    answered = call.at("POST /after-stream")
    last_mark = call.streams[0].last_mark_at if call.streams else None
    if not answered or last_mark is None:
        return None
    return (call.began + answered[0] - last_mark) * 1000


async def _closing_calls(twilio: TwilioEmulator) -> list[TwilioCall]:
    listen: list[Step] = [WaitForAgent(quiet_ms=300), Say("goodbye"), WaitForAgent(quiet_ms=20_000)]

    async def one(index: int) -> TwilioCall:
        await asyncio.sleep(index * 0.25)  # staggered starts, as calls arrive
        return await twilio.place_call([listen], call_sid=f"CA{index:032x}")

    try:
        return list(await asyncio.gather(*(one(i) for i in range(CALLS))))
    finally:
        await twilio.aclose()


async def _lost_calls(twilio: TwilioEmulator, services: list[Service]) -> list[TwilioCall]:
    first: list[Step] = [WaitForAgent(quiet_ms=300), Say("book_table"), WaitForAgent(quiet_ms=30_000)]
    second: list[Step] = [WaitForAgent(quiet_ms=300), HangUp()]
    saved = services[1].watch_for('"messages":3')  # a first turn answered and saved on the first task
    calls = [
        asyncio.create_task(twilio.place_call([first, second], call_sid=f"CA{index:032x}")) for index in range(CALLS)
    ]
    try:
        if not await asyncio.to_thread(saved.wait, 30):
            raise RuntimeError("no conversation was saved on the first media task")
        await asyncio.sleep(1.0)  # let the other calls answer their first turn too
        services[1].process.send_signal(signal.SIGKILL)
        return list(await asyncio.gather(*calls))
    finally:
        await twilio.aclose()


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values) if values else float("nan"),
    }


def run_call_control(out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "calls_per_kind": CALLS}
    for kind in ("hangup", "transfer"):
        with _stack(out, kind) as (twilio, _):
            calls = asyncio.run(_closing_calls(twilio))
        figures = [f for f in (_after_last_mark_ms(call) for call in calls) if f is not None]
        results[kind] = _summary(figures)
        answer = "<Hangup/>" if kind == "hangup" else "<Dial>"
        print(
            f"{kind}: last mark -> {answer} from the webhook: p50 {results[kind]['p50']:.0f} ms,"
            f" p95 {results[kind]['p95']:.0f} ms, max {results[kind]['max']:.0f} ms over {len(figures)} calls",
            flush=True,
        )
    with _stack(out, "lost-stream") as (twilio, services):
        calls = asyncio.run(_lost_calls(twilio, services))
    back = [
        (call.streams[1].first_audio_at - call.streams[0].closed_at) * 1000
        for call in calls
        if len(call.streams) > 1 and call.streams[1].first_audio_at and call.streams[0].closed_at
    ]
    results["lost_stream"] = _summary(back)
    results["lost_stream"]["calls_lost"] = sum(1 for call in calls if len(call.streams) < 2)
    print(
        f"lost stream (SIGKILL) -> agent heard again: p50 {results['lost_stream']['p50']:.0f} ms,"
        f" p95 {results['lost_stream']['p95']:.0f} ms, max {results['lost_stream']['max']:.0f} ms"
        f" over {len(back)} calls; calls lost: {results['lost_stream']['calls_lost']}",
        flush=True,
    )
    (out / "call_control.json").write_text(json.dumps(results, indent=2))
    return results
