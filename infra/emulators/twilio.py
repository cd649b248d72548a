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

Everything that happened is kept on the `TwilioCall`, with the wall-clock time of each step, so a test
or the benchmark can check it from Twilio's view. (Twilio's REST API for calls, section 7, is not here
yet.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Literal

import httpx

from core.twilio import SIGNATURE_HEADER, compute_signature
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
    ended_by: str = ""  # "caller", "hangup" (a <Hangup/>), "end-of-twiml", "error"
    completed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    _sequence: int = 0

    def step(self, what: str) -> None:
        self.steps.append((time.monotonic() - self.began, what))

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
        self._http = httpx.AsyncClient(timeout=10)

    async def aclose(self) -> None:
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
            "AccountSid": "AC" + "0" * 32,
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
                if verb.tag == "Connect":
                    if await self._connect(call, verb, scripts):
                        call.ended_by = "caller"
                        return
                elif verb.tag == "Say":
                    call.said.append(verb.text or "")
                    call.step(f"Say {verb.text}")
                elif verb.tag == "Pause":
                    call.step(f"Pause {verb.get('length', '1')}")
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
                call.ended_by = "end-of-twiml"
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
