"""Whole calls through real sockets: media service + emulators + simulated caller on loopback."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from core.twilio import stream_token
from infra.caller import HangUp, Pause, Press, Say, SendRaw, WaitForAgent
from infra.emulators.scenario import Faults, Utterance, demo_scenario
from tests.e2e.conftest import MEDIA_STREAM_URL, TOKEN, Stack

FAST = {"SILENCE_THRESHOLD": "1.0", "GREETING": ""}


async def test_a_whole_call(stack: Stack) -> None:
    """Greeting, a turn with a pause under the threshold, a reply, a barge-in, a last turn, hang-up."""
    tasks_before = len(asyncio.all_tasks())
    caller = stack.caller(
        [
            Pause(2000),
            Say("book_table"),
            Pause(1200),
            Say("tomorrow"),
            Say("actually", after_agent_ms=1500),
            WaitForAgent(),
            Say("goodbye"),
            WaitForAgent(),
            HangUp(),
        ]
    )
    report = await caller.run()
    await stack.registry.wait_idle()

    # The pause of 1.2 s kept one turn; the barge-in started the second; goodbye was the third.
    assert stack.caller_turns() == [
        "Hi, I would like to book a table for two. Tomorrow at seven, please.",
        "Actually, wait, make it four people.",
        "Thank you, goodbye.",
    ]
    assert report.clears_received == 1 and len(report.barge_in_latencies_ms) == 1
    assert len(report.reply_latencies_ms) == 3 and report.marks_echoed > 0

    item = stack.item()
    assert item["turn_count"] == 3 and item["interruptions"] == 1 and item["end_reason"] == "stop"
    lines = item["transcript"].splitlines()
    assert lines[0] == "Agent: Hello! How can I help?"
    assert lines[1] == "Caller: Hi, I would like to book a table for two. Tomorrow at seven, please."
    interrupted = lines[2]
    full_answer = stack.emulators.scenario.answers[0]
    assert interrupted.endswith("[interrupted]")
    heard = interrupted.removeprefix("Agent: ").removesuffix(" [interrupted]")
    assert full_answer.startswith(heard) and len(heard) < len(full_answer) // 2
    # the model was told what the caller heard, not the whole answer
    second_turn = next(
        r["messages"] for r in stack.emulators.openai.requests if r["messages"][-1]["content"].startswith("Actually")
    )
    assert second_turn[-2] == {"role": "assistant", "content": heard}
    assert second_turn[1] == {"role": "assistant", "content": "Hello! How can I help?"}
    assert len(item["latency"]["reply_ms"]) == 3
    assert len(asyncio.all_tasks()) <= tasks_before  # nothing of the call is left running


@pytest.mark.parametrize("settings", [FAST], indirect=True)
async def test_a_pause_over_the_threshold_makes_two_turns(stack: Stack) -> None:
    script = [Pause(300), Say("book_table"), Pause(1500), Say("tomorrow"), WaitForAgent(), HangUp()]
    report = await stack.caller(script).run()
    await stack.registry.wait_idle()
    assert stack.caller_turns()[:2] == ["Hi, I would like to book a table for two.", "Tomorrow at seven, please."]
    assert report.clears_received == 1  # the second turn began while the first answer played


@pytest.mark.parametrize("settings", [{"SILENCE_THRESHOLD": "1.0", "GREETING": "Welcome to Parley."}], indirect=True)
async def test_the_greeting_is_spoken_first(stack: Stack) -> None:
    report = await stack.caller([WaitForAgent(), HangUp()]).run()
    await stack.registry.wait_idle()
    greeting = [m for m in stack.emulators.elevenlabs.received if m.get("text", "").strip()]
    assert greeting[0]["text"] == "Welcome to Parley. " and "voice_settings" in greeting[0]
    assert report.media_received > 0 and report.reply_latencies_ms == []
    assert stack.item()["transcript"] == "Agent: Welcome to Parley."


@pytest.mark.parametrize("settings", [FAST], indirect=True)
async def test_dtmf_reaches_the_model_in_the_turn(stack: Stack) -> None:
    await stack.caller([Pause(300), Press("4"), Pause(100), Press("2"), WaitForAgent(), HangUp()]).run()
    await stack.registry.wait_idle()
    assert stack.caller_turns() == ["(pressed 4) (pressed 2)"]


@pytest.mark.parametrize("settings", [FAST], indirect=True)
async def test_hanging_up_mid_reply_leaves_nothing_running(stack: Stack) -> None:
    tasks_before = len(asyncio.all_tasks())
    await stack.caller([Pause(300), Say("book_table"), HangUp(after_agent_ms=400)]).run()
    await stack.registry.wait_idle()
    assert len(stack.registry) == 0
    assert len(asyncio.all_tasks()) <= tasks_before
    item = stack.item()
    assert item["end_reason"] == "stop" and item["interruptions"] == 1
    assert stack.emulators.elevenlabs.received[-1] == {"close_socket": True}
    assert stack.emulators.deepgram.received[-1]["type"] == "CloseStream"


async def test_a_forged_upgrade_signature_is_refused_and_a_stream_needs_its_own_call_s_token(stack: Stack) -> None:
    """Section 2b: an upgrade signature, when present, must be right; the token in `start` admits the
    stream whether Twilio signs the upgrade or not, and nothing else does."""
    with pytest.raises(websockets.InvalidStatus) as caught:
        await stack.caller([HangUp()], signature="forged-signature").run()
    assert caught.value.response.status_code == 403

    other = "CA" + "b" * 32
    for parameters in ({"CallSid": "CA" + "a" * 32}, {"token": stream_token(TOKEN, other, int(time.time()) + 600)}):
        report = await stack.caller([Pause(200), HangUp()], parameters=parameters, mint_token=False).run()
        assert report.closed_by_server and report.agent_audio_ms == 0
    assert len(stack.registry) == 0 and stack.emulators.deepgram.queries == []  # no provider socket opened

    await stack.caller([Pause(300), HangUp()], signature="").run()  # unsigned upgrade, valid token: admitted
    assert len(stack.emulators.deepgram.queries) == 1


@pytest.mark.parametrize("settings", [FAST], indirect=True)
async def test_malformed_frames_are_survived(stack: Stack) -> None:
    media = {
        "event": "media",
        "sequenceNumber": "9",
        "streamSid": "MZ1",
        "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": "!!notbase64"},
    }
    garbage = [
        SendRaw("{not json"),
        SendRaw(json.dumps(media)),
        SendRaw(json.dumps({"event": "dance"})),
        SendRaw("x" * 100_000),
        SendRaw(json.dumps({"event": "start", "sequenceNumber": "2"})),
    ]
    report = await stack.caller([Pause(200), *garbage, Say("book_table"), WaitForAgent(), HangUp()]).run()
    await stack.registry.wait_idle()
    assert not report.timed_out and report.media_received > 0  # the call went on and was answered
    assert stack.caller_turns() == ["Hi, I would like to book a table for two."]
    # ... and the service still takes other calls
    await stack.caller([Pause(200), Say("book_table"), WaitForAgent(), HangUp()], call_sid="CA" + "b" * 32).run()
    await stack.registry.wait_idle()
    assert stack.item("CA" + "b" * 32)["turn_count"] == 1


async def test_health_turns_503_while_draining(stack: Stack) -> None:
    import urllib.request

    def health() -> int:
        try:
            with urllib.request.urlopen(stack.server.url + "/healthz", timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    assert await asyncio.to_thread(health) == 200
    stack.drain.draining = True
    assert await asyncio.to_thread(health) == 503
    with pytest.raises(websockets.InvalidStatus):
        await stack.caller([HangUp()]).run()
    stack.drain.draining = False


def test_media_stream_url_signature_both_readings() -> None:
    from core.twilio import compute_signature, validate_upgrade

    assert validate_upgrade(TOKEN, MEDIA_STREAM_URL, compute_signature(TOKEN, MEDIA_STREAM_URL))
    https_twin = MEDIA_STREAM_URL.replace("wss://", "https://")
    assert validate_upgrade(TOKEN, MEDIA_STREAM_URL, compute_signature(TOKEN, https_twin))
    assert not validate_upgrade(TOKEN, MEDIA_STREAM_URL, compute_signature("other", MEDIA_STREAM_URL))


COUGH = demo_scenario(caller=(demo_scenario().caller[0], Utterance.recorded("corpus/cough_2", "")))


@pytest.mark.parametrize("settings", [{"GREETING": ""}], indirect=True)
@pytest.mark.parametrize("scenario", [COUGH], indirect=True)
async def test_a_cough_over_the_reply_stops_it_and_it_resumes_and_is_heard_to_its_end(stack: Stack) -> None:
    script = [Pause(300), Say("book_table"), Say("corpus/cough_2", after_agent_ms=1500), WaitForAgent(), HangUp()]
    caller = stack.caller(script)
    report = await caller.run()
    await stack.registry.wait_idle()

    assert report.clears_received == 1  # the caller heard the reply stop ...
    [cleared], [resumed] = report.clear_times_ms, report.resumed_at_ms
    cough_onset = next(start for voice, start, _ in report.speech if voice == "corpus/cough_2")
    assert 1000 <= resumed - cough_onset <= 1300 + 100  # ... and start again within RESUME_WINDOW_MS + 100 ms
    assert resumed > cleared
    item = stack.item()
    answer = stack.emulators.scenario.answers[0]
    assert item["false_barge_ins"] == 1 and item["interruptions"] == 0
    assert f"Agent: {answer}" in item["transcript"].splitlines()  # heard to its end, whole
    assert stack.caller_turns() == ["Hi, I would like to book a table for two."]  # the cough is no turn
    _, agent = caller.recording()
    assert agent[int(resumed * 8) :].any()  # audio after the resume reached the caller


REFUSING = demo_scenario(faults=Faults(openai_content_filter=True))


@pytest.mark.parametrize("settings", [{"GREETING": ""}], indirect=True)
@pytest.mark.parametrize("scenario", [REFUSING], indirect=True)
async def test_a_model_that_refuses_is_never_silence_the_caller_hears_the_apology(stack: Stack) -> None:
    report = await stack.caller([Pause(300), Say("book_table"), WaitForAgent(), HangUp()]).run()
    await stack.registry.wait_idle()
    spoken = "".join(m.get("text", "") for m in stack.emulators.elevenlabs.received)
    assert "Sorry, I'm having trouble answering right now." in spoken
    assert report.media_received > 0 and not report.timed_out
    assert stack.item()["transcript"].splitlines()[-1].startswith("Agent: Sorry, I'm having trouble")


OUT_OF_QUOTA = demo_scenario(faults=Faults(elevenlabs_quota_exceeded=True))


@pytest.mark.parametrize("scenario", [OUT_OF_QUOTA], indirect=True)
async def test_a_voice_out_of_quota_ends_the_call_with_the_reason_on_the_item(stack: Stack) -> None:
    report = await stack.caller([Pause(300), Say("book_table"), WaitForAgent(timeout_ms=5000), HangUp()]).run()
    await stack.registry.wait_idle()
    assert report.closed_by_server  # the agent ended the call: it had no voice left
    item = stack.item()
    assert item["end_reason"] == "agent"
    assert any(f.startswith("text-to-speech: ElevenLabs closed") for f in item["provider_failures"])
    assert stack.emulators.elevenlabs.connections <= 3  # no reconnect storm
