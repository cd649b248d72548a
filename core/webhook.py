"""What the Twilio webhook does, apart from any web framework: check, record, answer.

`handlers/webhook.py` turns an HTTP request (from API Gateway through Mangum, or from uvicorn) into
an `IncomingRequest` and the `WebhookReply` back into a response. Order matters: the signature is
checked before anything is parsed or written (a bad one gets 403 and touches nothing), then the body
(400 with the reason), then the books. Losing the books must not lose the caller: if DynamoDB fails
on `/voice` the TwiML is still returned, the failure logged and counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import parse_qs

from botocore.exceptions import BotoCoreError

from core import metrics
from core.config import WebhookSettings
from core.logs import bind_call, logger
from core.store import CallStore, StoreError
from core.twilio import connect_stream_twiml, public_url, signature_algorithm, signing_secret, validate_signature

FORM = "application/x-www-form-urlencoded"


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
    def __init__(self, settings: WebhookSettings, store: CallStore) -> None:
        self.settings = settings
        self.store = store

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
        secret = signing_secret(
            self.settings.twilio_auth_token, self.settings.twilio_webhook_shared_key, signature_settings
        )
        if secret is None:
            logger.error(
                "a request was signed by a Webhooks Rule's SharedKey, but TWILIO_WEBHOOK_SHARED_KEY is not set; "
                "set it to that rule's SharedKey secret",
                extra={"path": request.path},
            )
        ok = secret is not None and validate_signature(
            secret,
            self._url(request),
            params if content_type == FORM else None,
            headers.get("x-twilio-signature"),
            raw_body=None if content_type == FORM else request.body,
            algorithm=signature_algorithm(signature_settings),
        )
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
    def _book(write: Callable[[], None], failure: str) -> bool:
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
        stream_parameters = {
            "CallSid": params["CallSid"],
            "From": params.get("From", ""),
            "To": params.get("To", ""),
        }
        twiml = connect_stream_twiml(
            self.settings.media_stream_url,
            self._url(request, self._sibling(request, "/stream-status")),
            stream_parameters,
        )
        logger.info("answered an incoming call", extra={"direction": params.get("Direction")})
        return WebhookReply(200, twiml, "text/xml")

    @staticmethod
    def _sibling(request: IncomingRequest, path: str) -> str:
        """`/stream-status` beside `/voice`, keeping any prefix a proxy put in front of it."""
        current = request.public_path or request.path
        prefix = current[: -len("/voice")] if current.endswith("/voice") else ""
        return prefix + path

    def status(self, request: IncomingRequest) -> WebhookReply:
        params = self._params(request, ["CallSid", "CallStatus"])
        if isinstance(params, WebhookReply):
            return params
        if not params.get("SequenceNumber", "0").isdigit():
            return self._bad(request, f"SequenceNumber {params['SequenceNumber']!r} is not a whole number")
        bind_call(CallSid=params["CallSid"])
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
