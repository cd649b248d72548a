"""`parley bench`: the figures of DESIGN.md section 5, measured, never asserted.

Call figures: N simultaneous simulated calls against one media-service process (`parley serve
media`, pinned to one core), with the emulators (fixed latencies: STT final 150 ms after speech,
LLM first text 300 ms, TTS first audio 150 ms) and the callers in other processes. Each call says a
turn, cuts into the reply with a second turn, and hears the second reply out. Reported at the
caller: p50/p95 reply latency beyond the silence threshold and p50/p95 barge-in latency (speech
onset to `clear`); from /proc: the media process's CPU per live call and per call-minute, and its
RSS per live call at the peak and after the calls end. Frame figure: the audio cost of one 20 ms
frame (decode + voice activity + encode).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import timeit
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.audio import EchoGate, VoiceActivityDetector, samples_to_ulaw, ulaw_to_samples
from core.store import CallStore
from infra.caller import CallReport, HangUp, Pause, Say, SimulatedCaller, Step, WaitForAgent
from infra.local import Service, local_dynamodb, local_table
from infra.wav import read_ulaw

VOICES = Path(__file__).parent / "voices"
TOKEN = "bench-twilio-auth-token"
MEDIA_STREAM_URL = "wss://media.parley.local/media"
THRESHOLD_MS = 2000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def frame_cost_us(repeats: int = 7, number: int = 20000, *, echo_gate: bool = False) -> float:
    """Best-of-`repeats` cost of decode + detect + encode of one 20 ms µ-law frame, in µs. With
    `echo_gate`, as while the agent speaks: the gate also measures one frame of the agent's audio and
    looks up the loudest echo the inbound frame could carry."""
    frame = read_ulaw(VOICES / "hello.wav")[1600:1760]
    detector = VoiceActivityDetector()
    gate = EchoGate()
    clock = [0]

    def one_frame() -> None:
        samples = ulaw_to_samples(frame)
        detector.process_samples(samples, 0)
        samples_to_ulaw(samples)

    def one_frame_with_gate() -> None:
        at = clock[0] = clock[0] + 20
        gate.played(frame, at)
        samples = ulaw_to_samples(frame)
        detector.process_samples(samples, at, gate)
        samples_to_ulaw(samples)

    work = one_frame_with_gate if echo_gate else one_frame
    return min(timeit.repeat(work, number=number, repeat=repeats)) / number * 1e6


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def report_frame_cost() -> None:
    print(f"machine: {machine()}")
    print(f"audio per 20 ms frame (decode + detect + encode): {frame_cost_us():.1f} µs")
    print(f"  the same while the agent speaks, with the echo gate: {frame_cost_us(echo_gate=True):.1f} µs")


# -- call figures ---------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


_rounds = iter(range(1, 1_000_000))


async def _calls(media_url: str, count: int) -> list[CallReport]:
    round_number = next(_rounds)  # every call of every round has its own CallSid

    async def one(index: int) -> CallReport:
        call_sid = f"CA{round_number:016x}{index:016x}"
        script: list[Step] = [
            Pause(20 * (index % 50)),  # spread the starts over a second
            Say("book_table"),
            Say("actually", after_agent_ms=1200),
            WaitForAgent(),
            HangUp(),
        ]
        caller = SimulatedCaller(
            media_url,
            TOKEN,
            list(script),
            signed_url=MEDIA_STREAM_URL,
            call_sid=call_sid,
            stream_sid="MZ" + call_sid[2:],
        )
        return await caller.run()

    return list(await asyncio.gather(*(one(i) for i in range(count))))


@dataclasses.dataclass(frozen=True)
class MediaStack:
    media_url: str
    pid: int  # the media service's process, for CPU and memory
    store: CallStore


@contextlib.contextmanager
def media_stack(out: Path, scenario: str) -> Iterator[MediaStack]:
    """Local DynamoDB, the emulators (playing `scenario`) and `parley serve media` pinned to one core;
    the calling process is moved off that core."""
    out.mkdir(parents=True, exist_ok=True)
    cores = sorted(os.sched_getaffinity(0))
    media_core, other_cores = {cores[-1]}, set(cores[:-1]) or {cores[-1]}
    os.sched_setaffinity(0, other_cores)  # the callers stay off the media service's core
    with local_dynamodb(cpus=other_cores) as dynamodb_url:
        client, aws = local_table(dynamodb_url, "bench-calls")
        environment = {
            **os.environ,
            **aws,
            "TWILIO_AUTH_TOKEN": TOKEN,
            "MEDIA_STREAM_URL": MEDIA_STREAM_URL,
            "SILENCE_THRESHOLD": str(THRESHOLD_MS / 1000),
            "GREETING": "",
            "POWERTOOLS_SERVICE_NAME": "parley-bench",
        }
        emulators = Service(
            "emulators",
            [sys.executable, "-m", "infra.emulators", "--scenario", scenario],
            environment,
            out / "emulators.log",
            cpus=other_cores,
        )
        environment.update(emulators.ready)
        media = Service(
            "media",
            [sys.executable, "-m", "handlers.cli", "serve", "media", "--host", "127.0.0.1", "--port", "0"],
            environment,
            out / "media.log",
            cpus=media_core,
        )
        try:
            media_url = media.ready["listening"].replace("http://", "ws://") + "/media"
            yield MediaStack(media_url, media.process.pid, CallStore(client, "bench-calls"))
        finally:
            media.stop()
            emulators.stop()


def run_calls(counts: list[int], out: Path) -> list[dict[str, Any]]:
    results = []
    with media_stack(out, "bench") as stack:
        asyncio.run(_calls(stack.media_url, 1))  # warm-up: imports, first connections
        for count in counts:
            results.append(_measure(stack.pid, stack.media_url, count))
            print(_line(results[-1]), flush=True)
    (out / "bench.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    return results


def _measure(pid: int, media_url: str, count: int) -> dict[str, Any]:
    baseline_rss = _rss_mb(pid)
    cpu_before, wall_before = _cpu_seconds(pid), time.monotonic()
    peak = {"rss": baseline_rss}

    health_url = media_url.replace("ws://", "http://").removesuffix("/media") + "/healthz"
    lags: list[dict[str, float]] = []

    def loop_lag() -> dict[str, float]:
        with urllib.request.urlopen(health_url, timeout=5) as response:
            lag: dict[str, float] = json.loads(response.read())["loop_lag_ms"]
            return lag

    async def sample() -> None:
        while True:
            peak["rss"] = max(peak["rss"], _rss_mb(pid))
            await asyncio.sleep(0.25)

    async def main() -> list[CallReport]:
        sampler = asyncio.create_task(sample())
        try:
            return await _calls(media_url, count)
        finally:
            sampler.cancel()

    reports = asyncio.run(main())
    lags.append(loop_lag())  # after the round, not during it: the callers' process times every latency
    wall = time.monotonic() - wall_before
    cpu = _cpu_seconds(pid) - cpu_before
    call_minutes = sum(r.duration_ms for r in reports) / 60_000
    replies = [latency - THRESHOLD_MS for r in reports for latency in r.reply_latencies_ms]
    barge_ins = [latency for r in reports for latency in r.barge_in_latencies_ms]
    return {
        "calls": count,
        "reply_beyond_threshold_ms": {
            "p50": percentile(replies, 50),
            "p95": percentile(replies, 95),
            "n": len(replies),
        },
        "barge_in_ms": {"p50": percentile(barge_ins, 50), "p95": percentile(barge_ins, 95), "n": len(barge_ins)},
        "cpu_core_per_live_call": cpu / wall / count,
        "cpu_seconds_per_call_minute": cpu / call_minutes if call_minutes else float("nan"),
        "rss_mb_per_live_call": (peak["rss"] - baseline_rss) / count,
        "rss_mb_after_calls_above_before": _rss_mb(pid) - baseline_rss,
        "calls_without_barge_in": sum(1 for r in reports if not r.barge_in_latencies_ms),
        # The round's last 30 s (all of it), as the media service measured its own loop.
        "loop_lag_ms": {
            "p99": max((lag["p99"] for lag in lags), default=0.0),
            "max": max((lag["max"] for lag in lags), default=0.0),
        },
        "mean_call_s": statistics.mean(r.duration_ms for r in reports) / 1000,
    }


def _line(result: dict[str, Any]) -> str:
    reply, barge = result["reply_beyond_threshold_ms"], result["barge_in_ms"]
    return (
        f"{result['calls']:>3} calls | reply beyond threshold p50 {reply['p50']:+.0f} p95 {reply['p95']:+.0f} ms"
        f" | barge-in p50 {barge['p50']:.0f} p95 {barge['p95']:.0f} ms"
        f" | CPU {result['cpu_core_per_live_call']:.4f} core/call,"
        f" {result['cpu_seconds_per_call_minute']:.2f} s/call-min"
        f" | RSS {result['rss_mb_per_live_call']:.2f} MB/call,"
        f" {result['rss_mb_after_calls_above_before']:+.1f} MB after"
        f" | loop lag p99 {result['loop_lag_ms']['p99']:.0f} max {result['loop_lag_ms']['max']:.0f} ms"
    )


# -- the webhook Lambda ------------------------------------------------------------------------------

_LAMBDA_PROBE = r"""
import json, sys, time
sys.path.insert(0, {bundle!r})
started = time.perf_counter()
{imports}
imported = time.perf_counter()
result = {{"import_ms": (imported - started) * 1000}}
if {warm}:  # what SnapStart's snapshot holds: the import and the warm-up, before any request
    handlers.webhook.warm()
    started = time.perf_counter()
if {call}:
    from types import SimpleNamespace
    from botocore.stub import Stubber
    CONTEXT = SimpleNamespace(function_name="parley-webhook", memory_limit_in_mb=512, aws_request_id="r",
                              invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:parley-webhook")
    stub = Stubber(handlers.webhook.service.store.client)
    for _ in range(201):
        stub.add_response("update_item", {{}})
    stub.activate()
    request = json.loads(sys.stdin.read())
    handlers.webhook.handler(request, CONTEXT)
    result["cold_ms"] = (time.perf_counter() - started) * 1000
    times = []
    for _ in range(200):
        t = time.perf_counter()
        handlers.webhook.handler(request, CONTEXT)
        times.append((time.perf_counter() - t) * 1000)
    result["warm_ms"] = sorted(times)[100]
print(json.dumps(result))
"""


def build_lambda_bundle_here(bundle: Path) -> None:
    """The webhook's bundle as `sam build` makes it (`make build-WebhookFunction`), for this machine's
    platform and interpreter, to run it here."""
    import subprocess

    subprocess.run(
        [
            "make",
            "-s",
            "build-WebhookFunction",
            f"ARTIFACTS_DIR={bundle}",
            f"PYTHON={sys.executable}",
            f"LAMBDA_PLATFORMS=manylinux_2_28_{platform.machine()} manylinux2014_{platform.machine()}",
            f"LAMBDA_PYTHON={sys.version_info.major}.{sys.version_info.minor}",
            f"LAMBDA_COMPILER={sys.executable}",
        ],
        cwd=Path(__file__).parents[1],
        check=True,
        capture_output=True,
    )


def lambda_figures(runs: int = 9) -> dict[str, float]:
    """Cold start (import + first /voice) over the bare-import floor, and the warm handler, in fresh
    interpreters, DynamoDB stubbed out (botocore's Stubber) so only our code is timed."""
    import subprocess

    from core.twilio import compute_signature
    from infra.lambda_events import http_api_event

    host = "abc123defg.execute-api.us-east-1.amazonaws.com"
    form = {
        "CallSid": "CA" + "1" * 32,
        "AccountSid": "AC" + "0" * 32,
        "From": "+15551234567",
        "To": "+15557654321",
        "CallStatus": "ringing",
        "Direction": "inbound",
    }

    environment = {
        **os.environ,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "MEDIA_STREAM_URL": "wss://media.example.com/media",
        "CALLS_TABLE": "calls",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "POWERTOOLS_METRICS_NAMESPACE": "ParleyBench",
    }
    environment.pop("PUBLIC_BASE_URL", None)

    root = Path(__file__).parents[1]
    bundle = root / "build" / "lambda-host"  # the Lambda's bundle, built for this machine to time it here
    build_lambda_bundle_here(bundle)

    def probe(imports: str, call: bool, warm: bool = False) -> dict[str, float]:
        code = _LAMBDA_PROBE.format(imports=imports, call=call, warm=warm, bundle=str(bundle))
        signature = compute_signature(TOKEN, f"https://{host}/voice", form)
        request = json.dumps(http_api_event("/voice", form, host=host, signature=signature))
        # -S: no site-packages, so only what the bundle holds can be imported, as in Lambda.
        output = subprocess.run(
            [sys.executable, "-S", "-c", code],
            env=environment,
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
            input=request,
        ).stdout
        parsed: dict[str, float] = json.loads(output.strip().splitlines()[-1])
        return parsed

    # Interleaved pairs: the machine's load drifts, and a difference taken within a pair cancels it.
    pairs = [
        (probe("import litestar, boto3, mangum", False), probe("import handlers.webhook", True)) for _ in range(runs)
    ]
    return {
        "floor_import_ms": statistics.median(floor["import_ms"] for floor, _ in pairs),
        "import_ms": statistics.median(ours["import_ms"] for _, ours in pairs),
        "cold_start_ms": statistics.median(ours["cold_ms"] for _, ours in pairs),
        "cold_start_over_floor_ms": statistics.median(ours["cold_ms"] - floor["import_ms"] for floor, ours in pairs),
        "warm_handler_ms": statistics.median(ours["warm_ms"] for _, ours in pairs),
        # With SnapStart the first request runs in a process restored after import and warm-up.
        "first_request_after_snapshot_ms": statistics.median(
            probe("import handlers.webhook", True, warm=True)["cold_ms"] for _ in range(runs)
        ),
    }


def report_lambda() -> None:
    figures = lambda_figures()
    print(
        f"webhook Lambda: import {figures['import_ms']:.0f} ms; cold start (import + first /voice) "
        f"{figures['cold_start_ms']:.0f} ms = bare 'import litestar, boto3, mangum'"
        f" ({figures['floor_import_ms']:.0f} ms)"
        f" {figures['cold_start_over_floor_ms']:+.0f} ms; warm handler {figures['warm_handler_ms']:.2f} ms"
        " (DynamoDB stubbed)"
    )
    print(
        f"  with SnapStart: first /voice in a process restored after import and warm-up"
        f" {figures['first_request_after_snapshot_ms']:.1f} ms (plus Lambda's restore, not measurable here)"
    )


def run(
    counts: list[int], out: Path, frames_only: bool = False, barge_in: bool = False, call_control: bool = False
) -> int:
    report_frame_cost()
    if frames_only:
        return 0
    if call_control:
        from infra.bench_call_control import run_call_control

        run_call_control(out)
        return 0
    if barge_in:
        from infra.bench_barge_in import run_corpus

        run_corpus(out)
        return 0
    report_lambda()
    run_calls(counts, out)
    return 0
