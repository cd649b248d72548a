"""Twilio's side of a call (DESIGN.md section 4): it posts the signed voice webhook, executes the TwiML
it gets verb by verb, and goes on where Twilio would.

* `<Connect><Stream>` with `<Parameter>`s opens the media stream as the simulated caller does (a signed
  upgrade, `start` with the parameters as `customParameters`), running the caller's script for that
  stream. When our server closes the stream, or the stream dies (the media task killed), the TwiML
  after `</Connect>` runs; when the caller hangs up, the call is over.
* `<Redirect>` fetches new TwiML (signed POST) and runs it; `<Say>` and `<Pause>` are recorded;
  `<Hangup/>` ends the call; so does running out of TwiML.
* `<Dial action timeout callerId><Number url statusCallback statusCallbackEvent>` plays the called
  party from its script (answers, busy, no answer within `timeout`, fails): the child leg's statuses go
  to the Number's `statusCallback` with `ParentCallSid`, an answered party hears the Number's `url`
  (the whisper) before the legs are bridged, and `action` gets `DialCallStatus`, `DialCallSid` and
  `DialCallDuration`; its TwiML runs next.
* Every request is signed as Twilio signs (the public URL, `X-Twilio-Signature`), posted to the
  loopback address the public name stands for; the parent leg's status callbacks carry `SequenceNumber`.

* Twilio's REST API for calls (`start_rest`): `POST /2010-04-01/Accounts/{AccountSid}/Calls.json`
  (Basic auth with the Auth Token; `To`, `From`, and `Url` or `Twiml`; `StatusCallback`,
  `MachineDetection`, `AsyncAmd`, `AsyncAmdStatusCallback` kept) places an outbound call to the called
  party's script and answers 201 with the call resource; `POST .../Calls/{CallSid}.json` with `Twiml`
  or `Url` ends the live call's stream with `stop` first and runs the new TwiML, and `Status=completed`
  hangs up. The `twilio` package's REST client is what the tests send it through.

Everything that happened is kept on the `TwilioCall`, with the wall-clock time of each step, so a test
or the benchmark can check it from Twilio's view.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import re
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any, Literal

import httpx

from core.server import RunningServer, start_in_loop
from core.twilio import SIGNATURE_HEADER, compute_signature
from infra.asgi import Receive, Scope, Send, lifespan, read_body
from infra.caller import CallReport, HangUp, SimulatedCaller, Step, WaitForAgent

_sids = itertools.count(1)


def _sid(prefix: str) -> str:
    return f"{prefix}{next(_sids):032x}"


@dataclasses.dataclass(frozen=True)
class CalledParty:
    """How the other end of a `<Dial>` behaves."""

    outcome: Literal["answer", "busy", "no-answer", "failed"] = "answer"
    ring_ms: int = 300
    talk_ms: int = 500  # after the whisper, then the party hangs up
    answered_by: str = "human"  # what asynchronous answering-machine detection reports
    script: tuple[Step, ...] = ()  # what the party does on a stream, when an outbound call reaches it


@dataclasses.dataclass
class TwilioCall:
    """One call as Twilio saw it."""

    call_sid: str
    form: dict[str, str]
    began: float = dataclasses.field(default_factory=time.monotonic)
    steps: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # (seconds since began, what)
    streams: list[CallReport] = dataclasses.field(default_factory=list)
    callers: list[SimulatedCaller] = dataclasses.field(default_factory=list)  # one per stream, with its recording
    stream_parameters: list[dict[str, str]] = dataclasses.field(default_factory=list)
    said: list[str] = dataclasses.field(default_factory=list)
    whispers: list[str] = dataclasses.field(default_factory=list)
    dial_statuses: list[str] = dataclasses.field(default_factory=list)
    ended_by: str = ""  # "caller", "hangup" (a <Hangup/>), "end-of-twiml", "error", "api"
    completed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    rest: dict[str, str] = dataclasses.field(default_factory=dict)  # an outbound call's create request
    updated: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # new TwiML from the REST API
    update: ET.Element | None = None
    live_caller: SimulatedCaller | None = None
    _sequence: int = 0
    _stepped: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def step(self, what: str) -> None:
        self.steps.append((time.monotonic() - self.began, what))
        self._stepped.set()

    async def until(self, prefix: str, timeout_s: float = 10.0) -> None:
        """Wait until a step starting with `prefix` has happened."""
        async with asyncio.timeout(timeout_s):
            while not self.at(prefix):
                self._stepped.clear()
                await self._stepped.wait()

    def at(self, prefix: str) -> list[float]:
        """When each step starting with `prefix` happened (seconds since the call began)."""
        return [at for at, what in self.steps if what.startswith(prefix)]


class TwilioEmulator:
    def __init__(
        self,
        auth_token: str,
        *,
        public_base_url: str,
        webhook_url: str,
        media_urls: Sequence[str],
        media_stream_url: str,
        called_parties: dict[str, CalledParty] | None = None,
        status_callback: str | None = None,
        sign_upgrade: bool = True,
    ) -> None:
        """`public_base_url` is what the webhook is known as (and what is signed); requests go to
        `webhook_url`. A stream to `media_stream_url` goes to the first of `media_urls` that accepts it
        (several media tasks behind one load balancer)."""
        self.auth_token = auth_token
        self.public_base_url = public_base_url.rstrip("/")
        self.webhook_url = webhook_url.rstrip("/")
        self.media_urls = list(media_urls)
        self.media_stream_url = media_stream_url
        self.called_parties = called_parties or {}
        self.status_callback = status_callback
        self.sign_upgrade = sign_upgrade
        self.account_sid = "AC" + "0" * 32
        self.calls: dict[str, TwilioCall] = {}
        self._http = httpx.AsyncClient(timeout=10)
        self._rest: RunningServer | None = None
        self._outbound: set[asyncio.Task[TwilioCall]] = set()

    async def aclose(self) -> None:
        for task in list(self._outbound):
            await task
        if self._rest is not None:
            await self._rest.stop()
        await self._http.aclose()

    # -- requests, signed as Twilio signs them -------------------------------------------------------

    async def _post(self, url: str, form: dict[str, str]) -> httpx.Response:
        """Sign the public `url` as Twilio does; deliver to the loopback address it stands for."""
        deliver = url
        if url.startswith(self.public_base_url):
            deliver = self.webhook_url + url[len(self.public_base_url) :]
        headers = {SIGNATURE_HEADER: compute_signature(self.auth_token, url, form), "User-Agent": "TwilioProxy/1.1"}
        return await self._http.post(deliver, data=form, headers=headers)

    async def _twiml(self, call: TwilioCall, url: str, form: dict[str, str]) -> ET.Element | None:
        response = await self._post(url, form)
        call.step(f"POST {urllib.parse.urlsplit(url).path} -> {response.status_code}")
        if response.status_code != 200:
            return None
        return ET.fromstring(response.text)

    async def _status(self, call: TwilioCall, status: str, url: str | None = None, **extra: str) -> None:
        target = url or self.status_callback
        if not target:
            return
        call._sequence += 1
        form = {
            **call.form,
            "CallStatus": status,
            "SequenceNumber": str(call._sequence),
            "Timestamp": time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime()),
            "CallbackSource": "call-progress-events",
            **extra,
        }
        await self._post(target, form)

    # -- the REST API ---------------------------------------------------------------------------------

    async def start_rest(self) -> str:
        """Serve the REST API for calls; the base URL to give a REST client (TWILIO_API_URL)."""
        self.rest_api = _RestApi(self)
        self._rest = await start_in_loop(self.rest_api)
        return self._rest.url

    def call_out(self, request: dict[str, str]) -> TwilioCall:
        """A call the REST API was asked to place: the called party answers (or not), then its TwiML runs."""
        sid = _sid("CA")
        form = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": sid,
            "CallStatus": "queued",
            "Direction": "outbound-api",
            "From": request["From"],
            "To": request["To"],
        }
        call = TwilioCall(sid, form, rest=dict(request))
        self.calls[sid] = call
        task = asyncio.get_running_loop().create_task(self._call_out(call))
        self._outbound.add(task)
        task.add_done_callback(self._outbound.discard)
        return call

    async def _call_out(self, call: TwilioCall) -> TwilioCall:
        party = self.called_parties.get(call.form["To"], CalledParty())
        callback = call.rest.get("StatusCallback")
        try:
            await self._status(call, "initiated", callback)
            if party.outcome != "answer":
                call.step(f"Callee {party.outcome}")
                call.form["CallStatus"] = party.outcome
                return call
            await self._status(call, "ringing", callback)
            await asyncio.sleep(party.ring_ms / 1000)  # the callee's phone rings
            call.form["CallStatus"] = "in-progress"
            await self._status(call, "in-progress", callback)
            if call.rest.get("AsyncAmd") == "true" and call.rest.get("AsyncAmdStatusCallback"):
                amd = {**call.form, "AnsweredBy": party.answered_by, "MachineDetectionDuration": "1200"}
                await self._post(call.rest["AsyncAmdStatusCallback"], amd)
            if call.rest.get("Twiml"):
                twiml: ET.Element | None = ET.fromstring(call.rest["Twiml"])
            else:
                twiml = await self._twiml(call, call.rest["Url"], dict(call.form))
            await self._run(call, twiml, [list(party.script)] if party.script else [])
            call.form["CallStatus"] = "completed"
            return call
        finally:
            duration = str(round(time.monotonic() - call.began))
            await self._status(call, call.form["CallStatus"], callback, CallDuration=duration)
            call.completed.set()

    def update(self, call: TwilioCall, twiml: ET.Element) -> None:
        """New TwiML for a live call: its stream (if any) ends with `stop` first, then the TwiML runs."""
        call.step("Updated by the REST API")
        call.update = twiml
        call.updated.set()
        if call.live_caller is not None:
            call.live_caller.stop()

    # -- a call --------------------------------------------------------------------------------------

    async def place_call(
        self,
        streams: Sequence[Sequence[Step]],
        *,
        from_number: str = "+15551234567",
        to_number: str = "+15557654321",
        call_sid: str | None = None,
    ) -> TwilioCall:
        """An inbound call: `/voice`, then its TwiML. `streams[n]` is what the caller does on the call's
        n-th stream (a stream beyond them waits for the agent, then hangs up)."""
        sid = call_sid or _sid("CA")
        form = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": sid,
            "CallStatus": "ringing",
            "Direction": "inbound",
            "From": from_number,
            "To": to_number,
            "Caller": from_number,
            "Called": to_number,
        }
        call = TwilioCall(sid, form)
        self.calls[sid] = call
        scripts = [list(script) for script in streams]
        await self._status(call, "ringing")
        twiml = await self._twiml(call, f"{self.public_base_url}/voice", form)
        call.form["CallStatus"] = "in-progress"
        await self._status(call, "in-progress")
        try:
            await self._run(call, twiml, scripts)
        finally:
            call.form["CallStatus"] = "completed"
            duration = str(round(time.monotonic() - call.began))
            await self._status(call, "completed", CallDuration=duration)
            call.completed.set()
        return call

    async def _run(self, call: TwilioCall, twiml: ET.Element | None, scripts: list[list[Step]]) -> None:
        while twiml is not None:
            next_twiml: ET.Element | None = None
            for verb in twiml:
                if call.update is not None:  # the REST API replaced the call's TwiML
                    break
                if verb.tag == "Connect":
                    if await self._connect(call, verb, scripts) and call.update is None:
                        call.ended_by = "caller"
                        return
                elif verb.tag == "Say":
                    call.said.append(verb.text or "")
                    call.step(f"Say {verb.text}")
                elif verb.tag == "Pause":
                    call.step(f"Pause {verb.get('length', '1')}")
                    with contextlib.suppress(TimeoutError):  # Twilio waits; a REST update cuts it short
                        await asyncio.wait_for(call.updated.wait(), timeout=float(verb.get("length", "1")))
                elif verb.tag == "Hangup":
                    call.step("Hangup")
                    call.ended_by = "hangup"
                    return
                elif verb.tag == "Redirect":
                    call.step("Redirect")
                    next_twiml = await self._twiml(call, (verb.text or "").strip(), self._form(call))
                    break
                elif verb.tag == "Dial":
                    next_twiml = await self._dial(call, verb)
                    break
                else:
                    call.step(f"unknown verb {verb.tag}")
            else:
                if call.update is None:
                    call.ended_by = "end-of-twiml"
                    return
            if call.update is not None:
                next_twiml, call.update = call.update, None
                call.updated.clear()
                if len(next_twiml) == 0:  # Status=completed: the API hung the call up
                    call.ended_by = "api"
                    return
            if next_twiml is None:
                call.ended_by = call.ended_by or "error"
                return
            twiml = next_twiml

    @staticmethod
    def _form(call: TwilioCall) -> dict[str, str]:
        return dict(call.form)

    async def _connect(self, call: TwilioCall, verb: ET.Element, scripts: list[list[Step]]) -> bool:
        """Run one `<Stream>`; True when the caller hung up on it (the call is over)."""
        stream = verb.find("Stream")
        if stream is None:
            call.step("Connect without Stream")
            return False
        parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        call.stream_parameters.append(parameters)
        url = stream.get("url", "")
        script: list[Step] = scripts.pop(0) if scripts else [WaitForAgent(), HangUp()]
        call.step(f"Stream {parameters.get('resume', 'new')}")
        for media_url in self.media_urls if url == self.media_stream_url else [url]:
            caller = SimulatedCaller(
                media_url,
                self.auth_token,
                script,
                signed_url=url,
                call_sid=call.call_sid,
                stream_sid=_sid("MZ"),
                parameters=parameters,
                signature=None if self.sign_upgrade else "",
                mint_token=False,
            )
            call.live_caller = caller
            try:
                report = await caller.run()
            except OSError:
                call.step(f"Stream could not connect to {media_url}")
                continue  # the load balancer tries another task
            call.streams.append(report)
            call.callers.append(caller)
            call.step(f"Stream ended ({'by the server' if report.closed_by_server else 'by the caller'})")
            return not report.closed_by_server
        return False

    async def _dial(self, call: TwilioCall, verb: ET.Element) -> ET.Element | None:
        noun = verb.find("Number")
        if noun is None:
            noun = verb.find("Sip")
        number = (noun.text or "").strip() if noun is not None else ""
        party = self.called_parties.get(number, CalledParty("failed"))
        timeout_s = float(verb.get("timeout", "30"))
        child = _sid("CA")
        call.step(f"Dial {number} ({party.outcome})")
        leg = {
            "CallSid": child,
            "ParentCallSid": call.call_sid,
            "From": verb.get("callerId") or call.form["To"],
            "To": number,
            "Direction": "outbound-dial",
            "AccountSid": call.form["AccountSid"],
        }
        status_url = noun.get("statusCallback") if noun is not None else None
        events = (noun.get("statusCallbackEvent", "") if noun is not None else "").split()
        sequence = itertools.count()

        async def leg_status(status: str, **extra: str) -> None:
            if status_url and (status in events or status == "completed"):
                form = {**leg, "CallStatus": status, "SequenceNumber": str(next(sequence)), **extra}
                await self._post(status_url, form)

        await leg_status("initiated")
        status: str = party.outcome
        talk_s = 0
        if party.outcome in ("answer", "no-answer"):
            await leg_status("ringing")
            ring_s = timeout_s if party.outcome == "no-answer" else min(party.ring_ms / 1000, timeout_s)
            await asyncio.sleep(ring_s)  # the phone rings: this is the behaviour being emulated
            if party.outcome == "answer" and party.ring_ms / 1000 <= timeout_s:
                status = "completed"
                await leg_status("answered")
                whisper_url = noun.get("url") if noun is not None else None
                if whisper_url:
                    whisper = await self._twiml(call, whisper_url, {**leg, "CallStatus": "in-progress"})
                    said = [(say.text or "") for say in (whisper if whisper is not None else []) if say.tag == "Say"]
                    call.whispers.extend(said)
                call.step("Dial answered")
                await asyncio.sleep(party.talk_ms / 1000)
                talk_s = max(1, round(party.talk_ms / 1000))
            else:
                status = "no-answer"
        call.dial_statuses.append(status)
        await leg_status("completed" if status == "completed" else status, CallDuration=str(talk_s))
        call.step(f"Dial ended {status}")
        action = verb.get("action")
        if not action:
            return None
        form = {**self._form(call), "DialCallStatus": status, "DialCallSid": child, "DialCallDuration": str(talk_s)}
        return await self._twiml(call, action, form)


def twiml_steps(call: TwilioCall) -> list[str]:
    """The verbs and requests of a call, without their times: what a test compares."""
    return [what for _, what in call.steps]


# -- the REST API ---------------------------------------------------------------------------------------

_CALLS = re.compile(r"^/2010-04-01/Accounts/(?P<account>AC\w+)/Calls(?:/(?P<sid>CA\w+))?\.json$")


class _RestApi:
    """Twilio's REST API for calls, as much of it as Parley uses (DESIGN.md section 4)."""

    def __init__(self, twilio: TwilioEmulator) -> None:
        self.twilio = twilio
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await lifespan(scope, receive, send):
            return
        form = dict(urllib.parse.parse_qsl((await read_body(receive)).decode()))
        self.requests.append((scope["path"], form))
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        status, answer = await self._answer(scope["method"], scope["path"], headers.get("authorization", ""), form)
        payload = json.dumps(answer).encode()
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": payload})

    async def _answer(self, method: str, path: str, auth: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        twilio = self.twilio
        expected = "Basic " + base64.b64encode(f"{twilio.account_sid}:{twilio.auth_token}".encode()).decode()
        if auth != expected:
            return 401, _rest_error(20003, "Authentication Error - invalid username", 401)
        match = _CALLS.match(path)
        if method != "POST" or match is None or match["account"] != twilio.account_sid:
            return 404, _rest_error(20404, f"The requested resource {path} was not found", 404)
        if match["sid"] is None:
            missing = [name for name in ("To", "From") if not form.get(name)]
            if missing or not (form.get("Url") or form.get("Twiml")):
                return 400, _rest_error(21205, f"Missing required parameter {(missing or ['Url'])[0]}", 400)
            placed = twilio.call_out(form)
            return 201, _call_resource(placed, "queued")
        call = twilio.calls.get(match["sid"])
        if call is None:
            return 404, _rest_error(20404, f"The requested resource {path} was not found", 404)
        if call.completed.is_set():
            return 400, _rest_error(21220, "Call is not in-progress. Cannot redirect.", 400)
        if form.get("Status") == "completed":
            new = ET.fromstring("<Response/>")
        elif form.get("Twiml"):
            new = ET.fromstring(form["Twiml"])
        elif form.get("Url"):
            fetched = await twilio._twiml(call, form["Url"], dict(call.form))
            new = fetched if fetched is not None else ET.fromstring("<Response/>")
        else:
            return 400, _rest_error(21205, "Missing required parameter Url or Twiml", 400)
        twilio.update(call, new)
        return 200, _call_resource(call, call.form.get("CallStatus", "in-progress"))


def _rest_error(code: int, message: str, status: int) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _call_resource(call: TwilioCall, status: str) -> dict[str, Any]:
    return {
        "sid": call.call_sid,
        "account_sid": call.form["AccountSid"],
        "to": call.form["To"],
        "from": call.form["From"],
        "status": status,
        "direction": call.form["Direction"],
        "api_version": "2010-04-01",
        "uri": f"/2010-04-01/Accounts/{call.form['AccountSid']}/Calls/{call.call_sid}.json",
    }
