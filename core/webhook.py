"""What the Twilio webhook does, apart from any web framework: check, record, answer.

`handlers/webhook.py` turns an HTTP request (from API Gateway through Mangum, or from uvicorn) into
an `IncomingRequest` and the `WebhookReply` back into a response. Order matters: the signature is
checked before anything is parsed or written (a bad one gets 403 and touches nothing), then the body
(400 with the reason), then the books. Losing the books must not lose the caller: if DynamoDB fails
on `/voice` the TwiML is still returned, the failure logged and counted.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, quote

from botocore.exceptions import BotoCoreError, ClientError

from core import metrics
from core.config import WebhookSettings
from core.logs import bind_call, logger
from core.store import CallStore, StoreError
from core.twilio import (
    connect_stream_twiml,
    dial_twiml,
    hangup_twiml,
    public_url,
    say_twiml,
    signature_algorithm,
    signing_secret,
    stream_token,
    validate_signature,
)

FORM = "application/x-www-form-urlencoded"
# What a caller hears when the call cannot go on (its stream lost too often, its record missing).
SORRY_GOODBYE = "Sorry, we are having technical difficulties. Please call again later. Goodbye."
FAILED_DIAL = frozenset({"busy", "no-answer", "failed", "canceled"})


@dataclasses.dataclass(frozen=True)
class IncomingRequest:
    path: str
    query: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    # The path as the caller requested it, when a proxy rewrote it (API Gateway's rawPath).
    public_path: str | None = None


@dataclasses.dataclass(frozen=True)
class WebhookReply:
    status: int
    body: str = ""
    media_type: str = "text/plain"


class WebhookService:
    def __init__(self, settings: WebhookSettings, store: CallStore, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self._clock = clock
        self.auth_token = settings.auth_token()

    def _url(self, request: IncomingRequest, path: str | None = None) -> str:
        return public_url(
            path or request.public_path or request.path,
            request.query,
            base_url=self.settings.public_base_url,
            headers=request.headers,
        )

    def _verified_params(self, request: IncomingRequest) -> dict[str, list[str]] | WebhookReply:
        """The form parameters of a request Twilio really signed, or the reply refusing it."""
        headers = request.headers
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        params = (
            parse_qs(request.body.decode("utf-8", "replace"), keep_blank_values=True) if content_type == FORM else {}
        )
        signature_settings = headers.get("x-twilio-webhooks-signature-settings")
        shared_key = self.settings.twilio_webhook_shared_key

        def signed_with(token: str) -> bool:
            secret = signing_secret(token, shared_key, signature_settings)
            return secret is not None and validate_signature(
                secret,
                self._url(request),
                params if content_type == FORM else None,
                headers.get("x-twilio-signature"),
                raw_body=None if content_type == FORM else request.body,
                algorithm=signature_algorithm(signature_settings),
            )

        if signing_secret("", shared_key, signature_settings) is None:  # a Webhooks Rule, and no key for it
            logger.error(
                "a request was signed by a Webhooks Rule's SharedKey, but TWILIO_WEBHOOK_SHARED_KEY is not set; "
                "set it to that rule's SharedKey secret",
                extra={"path": request.path},
            )
            ok = False
        else:  # the cached token, then a fresh read after a rotation
            ok = self.auth_token.accepts(signed_with)
        if not ok:
            metrics.count("SignatureRejected")
            logger.warning(
                "rejected a request whose X-Twilio-Signature does not match",
                extra={
                    "path": request.path,
                    "url_checked": self._url(request),
                    "has_signature": bool(headers.get("x-twilio-signature")),
                },
            )
            return WebhookReply(403, "invalid or missing X-Twilio-Signature\n")
        if content_type != FORM:
            return self._bad(request, f"expected a {FORM} body, got {content_type or 'no content type'}")
        return params

    @staticmethod
    def _bad(request: IncomingRequest, reason: str) -> WebhookReply:
        metrics.count("MalformedRequests")
        logger.warning("malformed webhook request", extra={"path": request.path, "reason": reason})
        return WebhookReply(400, reason + "\n")

    @staticmethod
    def _single(params: Mapping[str, Sequence[str]], required: Sequence[str]) -> dict[str, str] | str:
        flat = {name: values[-1] for name, values in params.items() if values}
        missing = [name for name in required if not flat.get(name)]
        return f"missing required parameter(s): {', '.join(missing)}" if missing else flat

    @staticmethod
    def _book(write: Callable[[], object], failure: str) -> bool:
        """One write to the calls table; a failure is logged and counted, never raised."""
        try:
            write()
        except (StoreError, BotoCoreError) as error:
            metrics.count("BookkeepingFailures")
            logger.error(failure, extra={"error": str(error)})
            return False
        return True

    def _params(self, request: IncomingRequest, required: Sequence[str]) -> dict[str, str] | WebhookReply:
        """The request's parameters once it is signed and complete, or the reply refusing it."""
        checked = self._verified_params(request)
        if isinstance(checked, WebhookReply):
            return checked
        params = self._single(checked, required)
        return self._bad(request, params) if isinstance(params, str) else params

    def voice(self, request: IncomingRequest) -> WebhookReply:
        params = self._params(request, ["CallSid"])
        if isinstance(params, WebhookReply):
            return params
        bind_call(CallSid=params["CallSid"])
        self._book(lambda: self.store.record_call(params), "could not record the call; answering anyway")
        metrics.count("CallsStarted")
        logger.info("answered an incoming call", extra={"direction": params.get("Direction")})
        return self._stream(request, params)

    def _stream(self, request: IncomingRequest, params: Mapping[str, str], resume: str | None = None) -> WebhookReply:
        """TwiML opening a stream for the call: its parameters, its token, and `/after-stream` after it."""
        call_sid = params["CallSid"]
        expiry = int(self._clock()) + self.settings.stream_token_ttl_seconds
        parameters = {
            "CallSid": call_sid,
            "From": params.get("From", ""),
            "To": params.get("To", ""),
            "Direction": params.get("Direction", ""),
            "token": stream_token(self.auth_token.current(), call_sid, expiry),
            "resume": resume or "",
        }
        twiml = connect_stream_twiml(
            self.settings.media_stream_url,
            self._url(request, self._sibling(request, "/stream-status")),
            parameters,
            self._url(request, self._sibling(request, "/after-stream")),
        )
        return WebhookReply(200, twiml, "text/xml")

    _ROUTES = ("/voice", "/after-stream", "/after-dial", "/whisper", "/status", "/stream-status")

    @classmethod
    def _sibling(cls, request: IncomingRequest, path: str) -> str:
        """A route beside this one, keeping any prefix a proxy put in front of them."""
        current = request.public_path or request.path
        for route in cls._ROUTES:
            if current.endswith(route):
                return current[: -len(route)] + path
        return path

    @staticmethod
    def _twiml(body: str) -> WebhookReply:
        return WebhookReply(200, body, "text/xml")

    def after_stream(self, request: IncomingRequest) -> WebhookReply:
        """Section 2b: the stream ended; the item's `next` says what the call does now. No `next`: the
        stream was lost, and the caller is reconnected (at most STREAM_RESUMES times)."""
        params = self._params(request, ["CallSid"])
        if isinstance(params, WebhookReply):
            return params
        call_sid = params["CallSid"]
        bind_call(CallSid=call_sid)
        try:
            known, next_step = self.store.take_next(call_sid)
        except (StoreError, BotoCoreError) as error:
            metrics.count("BookkeepingFailures")
            logger.error(
                "could not read the call's next step; the caller hears an apology", extra={"error": str(error)}
            )
            return self._twiml(hangup_twiml(SORRY_GOODBYE))
        if not known:
            metrics.count("UnknownCalls")
            logger.warning("/after-stream for a call with no item; hanging up politely")
            return self._twiml(hangup_twiml(SORRY_GOODBYE))
        if isinstance(next_step, dict):
            if next_step.get("action") == "transfer" and next_step.get("number"):
                return self._transfer(request, params, next_step)
            logger.info("the agent ended the call; hanging up")
            return self._twiml(hangup_twiml())
        if self._book_resume(call_sid):
            metrics.count("StreamsResumed")
            logger.warning("the call's stream ended without a next step; reconnecting the caller")
            return self._stream(request, params, resume="lost-stream")
        metrics.count("StreamResumesExhausted")
        logger.error("the call's stream was lost too many times; apologising and hanging up")
        self._book(lambda: self.store.set_outcome(call_sid, "stream_lost"), "could not record the outcome")
        return self._twiml(hangup_twiml(SORRY_GOODBYE))

    def _book_resume(self, call_sid: str) -> bool:
        try:
            return self.store.count_stream_resume(call_sid, self.settings.stream_resumes)
        except (StoreError, BotoCoreError) as error:
            metrics.count("BookkeepingFailures")
            logger.error("could not count a stream resume; reconnecting anyway", extra={"error": str(error)})
            return True

    def _transfer(
        self, request: IncomingRequest, params: Mapping[str, str], next_step: Mapping[str, Any]
    ) -> WebhookReply:
        call_sid = params["CallSid"]
        number = str(next_step["number"])
        fields = {
            "destination": str(next_step.get("destination", "")),
            "number": number,
            "summary": str(next_step.get("summary", "")),
            "dialled_at": int(self._clock()),
        }
        self._book(lambda: self.store.record_transfer(call_sid, fields, new=True), "could not record the transfer")
        inbound = params.get("Direction", "inbound").startswith("inbound")
        caller_id = params.get("To") if inbound else params.get("From")  # the number the caller dialled
        whisper = public_url(
            self._sibling(request, "/whisper"),
            f"parent={quote(call_sid)}",
            base_url=self.settings.public_base_url,
            headers=request.headers,
        )
        metrics.count("TransfersDialled")
        logger.info("transferring the call", extra={"destination": fields["destination"]})
        return self._twiml(
            dial_twiml(
                number,
                action=self._url(request, self._sibling(request, "/after-dial")),
                timeout_s=self.settings.transfer_ring_seconds,
                caller_id=caller_id,
                whisper_url=whisper,
                status_callback=self._url(request, self._sibling(request, "/status")),
            )
        )

    def after_dial(self, request: IncomingRequest) -> WebhookReply:
        """Section 2b: the transfer's `<Dial>` ended. Answered: the call is done. Not answered: the
        caller goes back to the agent, who is told why."""
        params = self._params(request, ["CallSid", "DialCallStatus"])
        if isinstance(params, WebhookReply):
            return params
        call_sid, status = params["CallSid"], params["DialCallStatus"]
        bind_call(CallSid=call_sid)
        outcome = {"dial_status": status}
        if params.get("DialCallSid"):
            outcome["child_call_sid"] = params["DialCallSid"]
        if params.get("DialCallDuration", "").isdigit():
            outcome["talk_seconds"] = params["DialCallDuration"]
        self._book(lambda: self.store.record_transfer(call_sid, outcome), "could not record the transfer's end")
        metrics.count("TransfersAnswered" if status == "completed" else "TransfersFailed")
        if status not in FAILED_DIAL:
            self._book(lambda: self.store.set_outcome(call_sid, "transferred"), "could not record the outcome")
            logger.info("the transfer was answered; the call is done", extra={"dial_status": status})
            return self._twiml(hangup_twiml())
        logger.warning(
            "the transfer was not answered; the caller goes back to the agent", extra={"dial_status": status}
        )
        return self._stream(request, params, resume=f"transfer-failed:{status}")

    def whisper(self, request: IncomingRequest) -> WebhookReply:
        """Section 2b: said to the person the call is transferred to, before the two are bridged."""
        params = self._params(request, ["CallSid"])
        if isinstance(params, WebhookReply):
            return params
        parent = parse_qs(request.query).get("parent", [""])[-1]
        summary = None
        try:
            item = self.store.get_call(parent) if parent else None
        except (BotoCoreError, ClientError) as error:  # the person still hears that a call is coming
            metrics.count("BookkeepingFailures")
            logger.error("could not read the transferred call's summary", extra={"error": str(error)})
            item = None
        transfer = item.get("transfer") if item is not None else None
        if isinstance(transfer, dict):
            summary = transfer.get("summary")
        text = f"Transferred call. {summary}" if summary else "A call is being transferred to you."
        return self._twiml(say_twiml(text))

    def status(self, request: IncomingRequest) -> WebhookReply:
        params = self._params(request, ["CallSid", "CallStatus"])
        if isinstance(params, WebhookReply):
            return params
        if not params.get("SequenceNumber", "0").isdigit():
            return self._bad(request, f"SequenceNumber {params['SequenceNumber']!r} is not a whole number")
        bind_call(CallSid=params["CallSid"])
        parent = params.get("ParentCallSid")
        if parent:  # a transfer's leg: its progress belongs on the call it was dialled from
            leg = {"child_call_sid": params["CallSid"], "child_status": params["CallStatus"]}
            self._book(lambda: self.store.record_transfer(parent, leg), "could not record the transfer leg's status")
        if not self._book(lambda: self.store.record_status(params), "could not record a status callback"):
            return WebhookReply(500, "could not record the status; retry\n")  # Twilio retries; writes are idempotent
        if params["CallStatus"] == "completed":
            metrics.count("CallsCompleted")
        logger.info("call status", extra={"status": params["CallStatus"], "sequence": params.get("SequenceNumber")})
        return WebhookReply(204)

    def stream_status(self, request: IncomingRequest) -> WebhookReply:
        params = self._params(request, ["CallSid"])
        if isinstance(params, WebhookReply):
            return params
        bind_call(CallSid=params["CallSid"], StreamSid=params.get("StreamSid"))
        if not self._book(lambda: self.store.record_stream_event(params), "could not record a stream event"):
            return WebhookReply(500, "could not record the stream event; retry\n")
        if params.get("StreamEvent") == "stream-error":
            metrics.count("StreamErrors")
            logger.warning("Twilio reported a stream error", extra={"error": params.get("StreamError")})
        return WebhookReply(204)
