"""The emulators speak the vendors' protocols: checked with the vendors' own SDKs and message models.

Our picture of each protocol must come from the vendor, not from ourselves: the deepgram-sdk reads
the Deepgram emulator, the openai SDK streams from the OpenAI emulator, and every message between
our ElevenLabs client and the ElevenLabs emulator validates against the elevenlabs package's models.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pydantic
import pytest
from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
from deepgram.listen.v1.types import (
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)
from elevenlabs.types import (
    AudioOutputMulti,
    CloseContext,
    CloseSocket,
    FinalOutputMulti,
    FlushContext,
    InitialiseContext,
    RealtimeVoiceSettings,
    SendTextMulti,
)

from core.events import TtsAudio, TtsDone
from core.providers.elevenlabs import ElevenLabsStream, stream_url
from infra.emulators.deepgram import DeepgramEmulator
from infra.emulators.elevenlabs import ElevenLabsEmulator
from infra.emulators.openai import OpenAiEmulator
from infra.emulators.scenario import Faults, Latency, demo_scenario
from infra.wav import read_ulaw

VOICES = Path(__file__).parents[2] / "infra" / "voices"


def frames(ulaw: bytes, size: int = 160) -> list[bytes]:
    return [ulaw[i : i + size] for i in range(0, len(ulaw), size)]


def silence(ms: int) -> bytes:
    return b"\xff" * (8 * ms)


def strictly(model: type[pydantic.BaseModel], message: dict[str, Any]) -> pydantic.BaseModel:
    """Validate with the vendor's model and refuse keys the model does not declare."""
    declared = set()
    for name, field in model.model_fields.items():
        declared.add(field.alias or name)
    unknown = set(message) - declared
    assert not unknown, f"{model.__name__} does not declare {unknown}"
    return model.model_validate(message)


# -- Deepgram ------------------------------------------------------------------------------------


@pytest.fixture
async def deepgram() -> AsyncIterator[tuple[DeepgramEmulator, str]]:
    # The SDK test pushes audio at once; it checks the messages, not the pace.
    emulator = DeepgramEmulator(demo_scenario(latency=Latency(deepgram_max_speed=None)))
    url = await emulator.start()
    yield emulator, url
    await emulator.stop()


async def test_deepgram_sdk_parses_every_message_of_the_emulator(deepgram: tuple[DeepgramEmulator, str]) -> None:
    emulator, url = deepgram
    base = url.removesuffix("/v1/listen")
    client = AsyncDeepgramClient(
        api_key=emulator.scenario.deepgram_key,
        environment=DeepgramClientEnvironment(
            base=base.replace("ws://", "http://"), production=base, agent=base, agent_rest=base
        ),
    )
    audio = read_ulaw(VOICES / "book_table.wav") + silence(1300) + read_ulaw(VOICES / "tomorrow.wav") + silence(1200)
    received: list[Any] = []
    async with client.listen.v1.connect(
        model="nova-3",
        encoding="mulaw",
        sample_rate=8000,
        channels=1,
        interim_results=True,
        utterance_end_ms=1000,
        vad_events=True,
        endpointing=300,
        smart_format=True,
        punctuate=True,
    ) as connection:

        async def read() -> None:
            async for message in connection:
                received.append(message)

        reader = asyncio.create_task(read())
        for frame in frames(audio):
            await connection.send_media(frame)
        await connection.send_keep_alive()
        await connection.send_finalize()
        await connection.send_close_stream()
        await reader

    kinds = {type(message) for message in received}
    assert {ListenV1Results, ListenV1SpeechStarted, ListenV1UtteranceEnd, ListenV1Metadata} <= kinds
    for message in received:
        strictly(type(message), message.model_dump(by_alias=True, exclude_unset=True))
    finals = [m for m in received if isinstance(m, ListenV1Results) and m.is_final]
    words = [w.punctuated_word for m in finals for w in m.channel.alternatives[0].words or []]
    assert " ".join(words) == "Hi, I would like to book a table for two. Tomorrow at seven, please."
    assert any(m.speech_final for m in finals)
    assert any(isinstance(m, ListenV1Results) and not m.is_final for m in received)  # interim results
    assert [m["type"] for m in emulator.received] == ["KeepAlive", "Finalize", "CloseStream"]
    query = emulator.queries[0]
    assert query["interim_results"] == "true" and query["encoding"] == "mulaw"


async def test_deepgram_refuses_a_wrong_key(deepgram: tuple[DeepgramEmulator, str]) -> None:
    from deepgram.core.api_error import ApiError

    _, url = deepgram
    base = url.removesuffix("/v1/listen")
    client = AsyncDeepgramClient(
        api_key="wrong", environment=DeepgramClientEnvironment(base=base, production=base, agent=base, agent_rest=base)
    )
    with pytest.raises(ApiError) as caught:
        async with client.listen.v1.connect(model="nova-3"):
            pass
    assert caught.value.status_code == 401


async def test_deepgram_closes_an_idle_stream_with_net_0001() -> None:
    import websockets

    emulator = DeepgramEmulator(demo_scenario(faults=Faults(deepgram_idle_timeout_s=0.2)))
    url = await emulator.start()
    async with websockets.connect(url, additional_headers={"Authorization": "Token dg-test-key"}) as socket:
        await socket.send(silence(20))
        with pytest.raises(websockets.ConnectionClosed):
            await socket.recv()
        assert socket.close_code == 1011 and socket.close_reason == "NET-0001"
    await emulator.stop()


@pytest.mark.parametrize("answers_idle", [False, True])
async def test_deepgram_answers_finalize_with_nothing_pending_only_when_told_to(answers_idle: bool) -> None:
    """Deepgram: a `from_finalize` answer "is not guaranteed if there is no significant amount of audio
    data". By default the emulator gives none, as the real service may; the other reading is a fault."""
    import json

    import websockets

    emulator = DeepgramEmulator(demo_scenario(faults=Faults(deepgram_answers_idle_finalize=answers_idle)))
    url = await emulator.start()
    async with websockets.connect(url, additional_headers={"Authorization": "Token dg-test-key"}) as socket:
        for frame in frames(silence(1000)):
            await socket.send(frame)
        await socket.send(json.dumps({"type": "Finalize"}))
        await socket.send(json.dumps({"type": "CloseStream"}))
        messages = [json.loads(raw) async for raw in socket]
    answered = [m for m in messages if m.get("from_finalize")]
    assert len(answered) == (1 if answers_idle else 0)
    assert messages[-1]["type"] == "Metadata"
    await emulator.stop()


# -- OpenAI --------------------------------------------------------------------------------------


@pytest.fixture
async def openai_emulator(request: pytest.FixtureRequest) -> AsyncIterator[tuple[OpenAiEmulator, str]]:
    faults = getattr(request, "param", Faults())
    emulator = OpenAiEmulator(demo_scenario(faults=faults))
    url = await emulator.start()
    yield emulator, url
    await emulator.stop()


async def test_openai_sdk_streams_with_the_usage_chunk(openai_emulator: tuple[OpenAiEmulator, str]) -> None:
    emulator, url = openai_emulator
    client = openai.AsyncOpenAI(api_key="sk-test-key", base_url=url, max_retries=0)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    async with stream:
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            elif chunk.usage:
                usage = chunk.usage
    assert text == emulator.scenario.answers[0]
    assert finish == "stop" and usage is not None and usage.total_tokens > 0
    await client.close()


@pytest.mark.parametrize("openai_emulator", [Faults(openai_midstream_error=True)], indirect=True)
async def test_openai_sdk_raises_on_a_midstream_error(openai_emulator: tuple[OpenAiEmulator, str]) -> None:
    _, url = openai_emulator
    client = openai.AsyncOpenAI(api_key="sk-test-key", base_url=url, max_retries=0)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError, match="error while processing"):
        async for _ in stream:
            pass
    await client.close()


async def test_openai_emulator_notices_a_client_that_goes_away(openai_emulator: tuple[OpenAiEmulator, str]) -> None:
    _, url = openai_emulator
    client = openai.AsyncOpenAI(api_key="sk-test-key", base_url=url, max_retries=0)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    assert stream.response.is_closed
    second = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert second.choices[0].message.content  # the emulator is still serving
    await client.close()


@pytest.mark.parametrize("openai_emulator", [Faults(openai_fail_first=1, openai_fail_status=500)], indirect=True)
async def test_openai_sdk_retries_a_500(openai_emulator: tuple[OpenAiEmulator, str]) -> None:
    emulator, url = openai_emulator
    client = openai.AsyncOpenAI(api_key="sk-test-key", base_url=url, max_retries=1)
    client = client.with_options(timeout=5)
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content and len(emulator.requests) == 2


async def test_openai_refuses_a_wrong_key(openai_emulator: tuple[OpenAiEmulator, str]) -> None:
    _, url = openai_emulator
    client = openai.AsyncOpenAI(api_key="wrong", base_url=url, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])


# -- ElevenLabs ----------------------------------------------------------------------------------


def _client_model(message: dict[str, Any]) -> type[pydantic.BaseModel]:
    if "close_socket" in message:
        return CloseSocket
    if "close_context" in message:
        return CloseContext
    if "voice_settings" in message:
        return InitialiseContext
    if "flush" in message and "text" not in message:
        return FlushContext
    return SendTextMulti


@pytest.mark.parametrize("output_format", ["ulaw_8000", "pcm_16000", "pcm_24000"])
async def test_elevenlabs_messages_both_ways_validate_against_the_sdk_models(output_format: str) -> None:
    emulator = ElevenLabsEmulator(demo_scenario())
    base = await emulator.start()
    events: list[Any] = []
    done = asyncio.Event()

    def on_event(event: Any) -> None:
        events.append(event)
        if isinstance(event, TtsDone):
            done.set()

    url = stream_url(base, "voice1", model_id="eleven_flash_v2_5", output_format=output_format, inactivity_timeout=180)
    client = ElevenLabsStream(url, "el-test-key", output_format, on_event, lambda: 0)
    runner = asyncio.create_task(client.run())
    client.send_text("r1", "Hello there! ")
    client.send_text("r1", "How can I help you today?")
    client.finish("r1")
    await done.wait()
    await client.close()
    await runner
    await emulator.stop()

    for message in emulator.received:
        validated = strictly(_client_model(message), message)
        if "voice_settings" in message:
            strictly(RealtimeVoiceSettings, message["voice_settings"])
            assert validated.context_id == "r1"  # type: ignore[attr-defined]
        if "text" in message and message.get("context_id"):
            assert message["text"].endswith(" ")
    for message in emulator.sent:
        if message.get("isFinal"):
            strictly(FinalOutputMulti, message)
        else:
            strictly(AudioOutputMulti, {k: v for k, v in message.items() if k != "isFinal"})
    audio = b"".join(e.ulaw for e in events if isinstance(e, TtsAudio))
    spoken = "Hello there! How can I help you today? "
    assert abs(len(audio) / 8 - len(spoken) * emulator.scenario.ms_per_char) < 25  # µ-law 8 kHz out, any format in
    aligned = "".join(c.char for e in events if isinstance(e, TtsAudio) for c in e.alignment or [])
    assert aligned == spoken


async def test_elevenlabs_refuses_a_wrong_key_and_times_out_idle_sockets() -> None:
    import websockets

    emulator = ElevenLabsEmulator(demo_scenario())
    base = await emulator.start()
    url = stream_url(base, "v", model_id="m", output_format="ulaw_8000", inactivity_timeout=1)
    with pytest.raises(websockets.InvalidStatus) as caught:
        async with websockets.connect(url, additional_headers={"xi-api-key": "wrong"}):
            pass
    assert caught.value.response.status_code == 401
    quick = url.replace("inactivity_timeout=1", "inactivity_timeout=0.2")
    async with websockets.connect(quick, additional_headers={"xi-api-key": "el-test-key"}) as socket:
        error = await socket.recv()
        assert "input_timeout_exceeded" in error
        with pytest.raises(websockets.ConnectionClosed):
            await socket.recv()
        assert socket.close_code == 1008
    await emulator.stop()


# -- Twilio's side of a call -----------------------------------------------------------------------


class TwimlStub:
    """A webhook that answers with TwiML written by twilio's own `VoiceResponse`, and checks every
    request's signature with twilio's own `RequestValidator`: the emulator must run what Twilio's
    library writes, and sign as Twilio signs."""

    def __init__(self, base: str) -> None:
        from twilio.request_validator import RequestValidator

        self.base = base
        self.validator = RequestValidator("stub-token")
        self.requests: list[tuple[str, dict[str, str], bool]] = []

    def twiml(self, path: str) -> str:
        from twilio.twiml.voice_response import Dial, VoiceResponse

        response = VoiceResponse()
        if path == "/voice":
            response.say("Welcome.")
            response.pause(length=1)
            response.redirect(f"{self.base}/next", method="POST")
        elif path == "/next":
            dial = Dial(action=f"{self.base}/after", timeout=5, caller_id="+15557654321")
            dial.number(
                "+15550001111",
                url=f"{self.base}/whisper",
                status_callback=f"{self.base}/leg",
                status_callback_event="initiated ringing answered completed",
            )
            response.append(dial)
            response.say("never said")
        elif path == "/whisper":
            response.say("A call for you.")
        elif path == "/after":
            response.say("Goodbye.")
            response.hangup()
        elif path == "/outbound":
            response.say("Hello from Parley.")
            response.pause(length=10)
            response.say("never said")
        return str(response)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from urllib.parse import parse_qsl

        from infra.asgi import lifespan, read_body, respond

        if await lifespan(scope, receive, send):
            return
        form = dict(parse_qsl((await read_body(receive)).decode()))
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        valid = self.validator.validate(f"{self.base}{scope['path']}", form, headers.get("x-twilio-signature", ""))
        self.requests.append((scope["path"], form, valid))
        await respond(send, 200, self.twiml(scope["path"]).encode(), "text/xml")


STUB_BASE = "https://hooks.example.com"


@contextlib.asynccontextmanager
async def twilio_with_stub(number: str, party: Any) -> AsyncIterator[tuple[Any, TwimlStub]]:
    """The Twilio emulator in front of the TwiML stub, with one called party."""
    from core.server import start_in_loop
    from infra.emulators.twilio import TwilioEmulator

    stub = TwimlStub(STUB_BASE)
    server = await start_in_loop(stub)
    twilio = TwilioEmulator(
        "stub-token",
        public_base_url=STUB_BASE,
        webhook_url=server.url,
        media_urls=[],
        media_stream_url="wss://media.example.com/media",
        called_parties={number: party},
    )
    yield twilio, stub
    await twilio.aclose()
    await server.stop()


async def test_the_twilio_emulator_runs_what_twilios_voice_response_writes_and_signs_as_twilio() -> None:
    from infra.emulators.twilio import CalledParty, twiml_steps

    async with twilio_with_stub("+15550001111", CalledParty("answer", ring_ms=50, talk_ms=50)) as (twilio, stub):
        call = await twilio.place_call([])
    assert twiml_steps(call) == [
        "POST /voice -> 200",
        "Say Welcome.",
        "Pause 1",
        "Redirect",
        "POST /next -> 200",
        "Dial +15550001111 (answer)",
        "POST /whisper -> 200",
        "Dial answered",
        "Dial ended completed",
        "POST /after -> 200",
        "Say Goodbye.",
        "Hangup",
    ]
    assert call.whispers == ["A call for you."] and call.ended_by == "hangup"
    assert all(valid for _, _, valid in stub.requests)
    legs = [form for path, form, _ in stub.requests if path == "/leg"]
    assert [leg["CallStatus"] for leg in legs] == ["initiated", "ringing", "answered", "completed"]
    assert all(leg["ParentCallSid"] == call.call_sid for leg in legs)
    [after] = [form for path, form, _ in stub.requests if path == "/after"]
    assert after["DialCallStatus"] == "completed" and after["DialCallSid"] == legs[0]["CallSid"]


def place_with(client: Any, **extra: str) -> Any:
    """An outbound call through twilio's REST client (synchronous: run it in a thread)."""
    return client.calls.create(to="+15550002222", from_="+15557654321", url=f"{STUB_BASE}/outbound", **extra)


async def test_the_twilio_emulator_accepts_twilios_rest_client_to_place_and_update_calls() -> None:
    from twilio.base.exceptions import TwilioRestException
    from twilio.rest import Client

    from infra.emulators.twilio import CalledParty, twiml_steps

    party = CalledParty("answer", ring_ms=50, answered_by="machine_start")
    async with twilio_with_stub("+15550002222", party) as (twilio, stub):
        rest_url = await twilio.start_rest()
        client = Client(twilio.account_sid, "stub-token")
        client.api.base_url = rest_url
        amd = {"async_amd": "true", "async_amd_status_callback": f"{STUB_BASE}/amd"}
        options = {"status_callback": f"{STUB_BASE}/leg", "machine_detection": "Enable", **amd}
        created = await asyncio.to_thread(place_with, client, **options)
        assert created.status == "queued" and created.direction == "outbound-api" and created.to == "+15550002222"
        call = twilio.calls[created.sid]
        assert call.rest["MachineDetection"] == "Enable" and call.rest["AsyncAmd"] == "true"
        await call.until("Pause 10")  # the callee answered and its TwiML is pausing
        twiml = "<Response><Say>Changed.</Say><Hangup/></Response>"
        updated = await asyncio.to_thread(lambda: client.calls(created.sid).update(twiml=twiml))
        assert updated.sid == created.sid
        await asyncio.wait_for(call.completed.wait(), timeout=5)
        steps = twiml_steps(call)
        assert steps[steps.index("Updated by the REST API") :] == ["Updated by the REST API", "Say Changed.", "Hangup"]
        assert "Say never said" not in steps
        [result] = [form for path, form, _ in stub.requests if path == "/amd"]
        assert result["AnsweredBy"] == "machine_start" and result["CallSid"] == created.sid
        assert [form["CallStatus"] for path, form, _ in stub.requests if path == "/leg"][-1] == "completed"
        with pytest.raises(TwilioRestException) as refused:
            await asyncio.to_thread(lambda: client.calls.create(to="+15550002222", from_="+15557654321"))
        assert refused.value.status == 400 and refused.value.code == 21205
        wrong = Client(twilio.account_sid, "another-token")
        wrong.api.base_url = rest_url
        with pytest.raises(TwilioRestException) as unauthorised:
            await asyncio.to_thread(place_with, wrong)
        assert unauthorised.value.status == 401
