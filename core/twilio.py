"""Twilio's side of a call: Media Streams messages, request signatures, and the public URL.

Inbound Media Streams frames decode with msgspec into typed structs in one pass (base64 payloads
and the string counters Twilio sends are converted in C), and every way a frame can be wrong ends
in one error, `MalformedMessage`, that says what was wrong. Signatures follow twilio-python's
`RequestValidator` to the letter (sorted, de-duplicated values; the URL with and without its port;
the `bodySHA256` variant for JSON bodies) and compare in constant time.
"""

# No `from __future__ import annotations` here: msgspec would then evaluate every field's string
# annotation through typing when the decoders are built, 50 ms at import (a Lambda cold start).
import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from urllib.parse import parse_qs, urlsplit, urlunsplit

import msgspec

# Twilio sends 160-byte (224 base64 chars) media frames; anything near this is not a media stream.
MAX_FRAME_BYTES = 64 * 1024

# -- inbound messages -------------------------------------------------------------------------------


class MalformedMessage(ValueError):
    """A Media Streams frame that is not valid JSON, not a known event, or has wrong fields."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"malformed Twilio media stream message: {reason}")


class _Inbound(msgspec.Struct, tag_field="event", rename="camel", frozen=True):
    pass


class MediaFormat(msgspec.Struct, frozen=True):
    encoding: str
    sample_rate: int = msgspec.field(name="sampleRate")
    channels: int


class StartInfo(msgspec.Struct, rename="camel", frozen=True):
    stream_sid: str
    account_sid: str
    call_sid: str
    tracks: list[str] = msgspec.field(default_factory=list)
    custom_parameters: dict[str, str] = msgspec.field(default_factory=dict)
    media_format: MediaFormat | None = None


class MediaInfo(msgspec.Struct, frozen=True):
    payload: bytes
    timestamp: int
    chunk: int = 0
    track: str = "inbound"


class DtmfInfo(msgspec.Struct, frozen=True):
    digit: str
    track: str = "inbound_track"


class MarkInfo(msgspec.Struct, frozen=True):
    name: str


class StopInfo(msgspec.Struct, rename="camel", frozen=True):
    account_sid: str = ""
    call_sid: str = ""


class Connected(_Inbound, tag="connected", frozen=True):
    protocol: str = "Call"
    version: str = ""


class Start(_Inbound, tag="start", frozen=True):
    sequence_number: int
    start: StartInfo
    stream_sid: str


class Media(_Inbound, tag="media", frozen=True):
    sequence_number: int
    media: MediaInfo
    stream_sid: str


class Dtmf(_Inbound, tag="dtmf", frozen=True):
    sequence_number: int
    dtmf: DtmfInfo
    stream_sid: str


class Mark(_Inbound, tag="mark", frozen=True):
    sequence_number: int
    mark: MarkInfo
    stream_sid: str


class Stop(_Inbound, tag="stop", frozen=True):
    sequence_number: int
    stream_sid: str
    stop: StopInfo = msgspec.field(default_factory=StopInfo)


InboundMessage = Connected | Start | Media | Dtmf | Mark | Stop

# strict=False: Twilio sends sequenceNumber/chunk/timestamp as JSON strings.
_inbound_decoder: msgspec.json.Decoder[InboundMessage] = msgspec.json.Decoder(InboundMessage, strict=False)


def decode_inbound(frame: str | bytes) -> InboundMessage:
    """Decode one text frame from Twilio, or raise `MalformedMessage` saying what is wrong."""
    if len(frame) > MAX_FRAME_BYTES:
        raise MalformedMessage(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return _inbound_decoder.decode(frame)
    except msgspec.ValidationError as error:
        text = str(error)
        if text.startswith("Invalid value") and text.endswith("`$.event`"):
            raise MalformedMessage(f"unknown event ({text.split(' - ')[0]})") from None
        raise MalformedMessage(text) from None
    except msgspec.DecodeError as error:
        raise MalformedMessage(f"not JSON ({error})") from None


# -- outbound messages ------------------------------------------------------------------------------


class _Outbound(msgspec.Struct, tag_field="event", rename="camel", frozen=True):
    pass


class OutboundPayload(msgspec.Struct, frozen=True):
    payload: bytes


class OutboundMarkName(msgspec.Struct, frozen=True):
    name: str


class OutboundMedia(_Outbound, tag="media", frozen=True):
    stream_sid: str
    media: OutboundPayload


class OutboundMark(_Outbound, tag="mark", frozen=True):
    stream_sid: str
    mark: OutboundMarkName


class OutboundClear(_Outbound, tag="clear", frozen=True):
    stream_sid: str


OutboundMessage = OutboundMedia | OutboundMark | OutboundClear
_outbound_encoder = msgspec.json.Encoder()


def encode_media(stream_sid: str, ulaw: bytes) -> str:
    """A `media` frame carrying headerless µ-law 8 kHz audio (base64 on the wire)."""
    return _outbound_encoder.encode(OutboundMedia(stream_sid, OutboundPayload(ulaw))).decode()


def encode_mark(stream_sid: str, name: str) -> str:
    return _outbound_encoder.encode(OutboundMark(stream_sid, OutboundMarkName(name))).decode()


def encode_clear(stream_sid: str) -> str:
    return _outbound_encoder.encode(OutboundClear(stream_sid)).decode()


_any_outbound_decoder: msgspec.json.Decoder[OutboundMessage] = msgspec.json.Decoder(OutboundMessage)


def decode_outbound(frame: str | bytes) -> OutboundMessage:
    """Decode a frame our server sent (the simulated caller's side of the protocol)."""
    try:
        return _any_outbound_decoder.decode(frame)
    except msgspec.DecodeError as error:
        raise MalformedMessage(str(error)) from None


# -- signatures -------------------------------------------------------------------------------------

SIGNATURE_HEADER = "X-Twilio-Signature"
SIGNATURE_SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"
_HASHES = {"HMAC_SHA1": hashlib.sha1, "HMAC_SHA256": hashlib.sha256}

Params = Mapping[str, str | Sequence[str]]


def _values(value: str | Sequence[str]) -> Iterable[str]:
    return (value,) if isinstance(value, str) else value


def compute_signature(auth_token: str, url: str, params: Params | None = None, algorithm: str = "HMAC_SHA1") -> str:
    """base64(HMAC(token, url + each sorted name followed by its sorted, distinct values))."""
    pieces = [url]
    for name in sorted(params or {}):
        pieces.extend(name + value for value in sorted(set(_values((params or {})[name]))))
    digest = hmac.new(auth_token.encode(), "".join(pieces).encode(), _HASHES[algorithm]).digest()
    return base64.b64encode(digest).decode()


def signature_algorithm(settings_header: str | None) -> str:
    """The algorithm named by X-Twilio-Webhooks-Signature-Settings (HMAC_SHA1 without it)."""
    for part in (settings_header or "").split(","):
        name, separator, value = part.partition("=")
        if separator and name.strip() == "algorithm" and value.strip():
            return value.strip().upper()
    return "HMAC_SHA1"


def signing_secret(auth_token: str, shared_key: str | None, settings_header: str | None) -> str | None:
    """The secret Twilio signed a request with. A request matched by a Webhooks Rule carries
    X-Twilio-Webhooks-Signature-Settings and is signed with that rule's SharedKey, not the Auth Token
    (twilio-python's `RequestValidator`: "the SharedKey secret when the request carries
    X-Twilio-Webhooks-Signature-Settings"). None: such a request, and no SharedKey configured."""
    if settings_header and settings_header.strip():
        return shared_key or None
    return auth_token


def _with_and_without_port(url: str) -> tuple[str, str]:
    """The URL with its port made explicit and with it removed, as twilio-python tries both."""
    parts = urlsplit(url)
    if parts.port:
        return urlunsplit(parts), urlunsplit(parts._replace(netloc=parts.netloc.split(":")[0]))
    port = 443 if parts.scheme == "https" else 80
    return urlunsplit(parts._replace(netloc=f"{parts.netloc}:{port}")), urlunsplit(parts)


def validate_signature(
    auth_token: str,
    url: str,
    params: Params | None,
    signature: str | None,
    *,
    raw_body: bytes | None = None,
    algorithm: str = "HMAC_SHA1",
) -> bool:
    """True when `signature` is Twilio's for this request. Compares in constant time.

    For a JSON body Twilio puts `bodySHA256` in the URL's query: then the URL is signed with no
    params and the raw body must hash to that value.
    """
    if not signature or algorithm not in _HASHES:
        return False
    body_ok = True
    body_hashes = parse_qs(urlsplit(url).query).get("bodySHA256")
    if body_hashes and raw_body is not None:
        body_ok = hmac.compare_digest(hashlib.sha256(raw_body).hexdigest(), body_hashes[0])
        params = None
    matches = False
    for candidate in _with_and_without_port(url):
        expected = compute_signature(auth_token, candidate, params, algorithm)
        matches |= hmac.compare_digest(expected.encode(), signature.encode())
    return body_ok and matches


def validate_upgrade(
    auth_token: str,
    media_stream_url: str,
    signature: str | None,
    *,
    settings_header: str | None = None,
    shared_key: str | None = None,
) -> bool:
    """The signature of Twilio's WebSocket upgrade to `<Stream url>`.

    What Twilio signs here is UNCONFIRMED in its documentation: the `wss://` URL as written in the
    TwiML (the reading of its "same mechanism as webhooks" statement), or its `https://` twin. Both
    are accepted; either is still an HMAC of our own URL under our own secret (the Auth Token, or a
    Webhooks Rule's SharedKey when the upgrade names one).
    """
    secret = signing_secret(auth_token, shared_key, settings_header)
    if secret is None:
        return False
    algorithm = signature_algorithm(settings_header)
    if validate_signature(secret, media_stream_url, None, signature, algorithm=algorithm):
        return True
    if media_stream_url.startswith("wss://"):
        return validate_signature(secret, "https://" + media_stream_url[6:], None, signature, algorithm=algorithm)
    return False


def public_url(
    path: str,
    query: str = "",
    *,
    base_url: str | None = None,
    headers: Mapping[str, str] | None = None,
    default_scheme: str = "https",
) -> str:
    """The URL as Twilio requested it, which is what it signed.

    Behind API Gateway, an ALB or a custom domain the application's own view of the URL is wrong, so
    a configured public base wins; else the scheme comes from `X-Forwarded-Proto` and the host from
    `X-Forwarded-Host`/`Host` (header names are matched case-insensitively).
    """
    suffix = path + (f"?{query}" if query else "")
    if base_url:
        return base_url.rstrip("/") + suffix
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    scheme = lowered.get("x-forwarded-proto", default_scheme).split(",")[0].strip()
    host = lowered.get("x-forwarded-host") or lowered.get("host", "")
    return f"{scheme}://{host.split(',')[0].strip()}{suffix}"


# -- stream tokens (DESIGN.md section 2b) --------------------------------------------------------------


def stream_token(auth_token: str, call_sid: str, expiry: int) -> str:
    """`<expiry>.<mac>`: the mac is the lowercase hex HMAC-SHA256 of `<CallSid>.<expiry>`, keyed with
    the Auth Token. The webhook puts it in every stream it opens; only Twilio, which fetched that
    signed TwiML, can present it, whether or not it signs the WebSocket upgrade."""
    mac = hmac.new(auth_token.encode(), f"{call_sid}.{expiry}".encode(), hashlib.sha256).hexdigest()
    return f"{expiry}.{mac}"


def stream_token_problem(auth_token: str, call_sid: str, token: str | None, now: float) -> str | None:
    """Why `token` does not admit a stream for `call_sid` at `now`, or None when it does."""
    if not token:
        return "the stream's start carries no token parameter"
    expiry_text, _, mac = token.partition(".")
    if not expiry_text.isdigit() or not mac:
        return "the stream's token is not <expiry>.<mac>"
    expected = stream_token(auth_token, call_sid, int(expiry_text))
    if not hmac.compare_digest(expected.encode(), token.encode()):
        return "the stream's token was not made for this CallSid with this account's Auth Token"
    if int(expiry_text) <= now:
        return "the stream's token has expired"
    return None


# -- TwiML ------------------------------------------------------------------------------------------


def _document(body: str) -> str:
    return f'<?xml version="1.0" encoding="UTF-8"?><Response>{body}</Response>'


def connect_stream_twiml(
    stream_url: str, status_callback: str | None, parameters: Mapping[str, str], after_stream_url: str
) -> str:
    """`<Connect><Stream>` (bidirectional) with `<Parameter>`s, then `<Redirect>` to `/after-stream`.

    TwiML after `</Connect>` runs only when our server closes the stream (or the stream dies); the
    webhook then decides what the call does next from the call's item (DESIGN.md section 2b).
    """
    attributes = f'url="{escape(stream_url)}"'
    if status_callback:
        attributes += f' statusCallback="{escape(status_callback)}" statusCallbackMethod="POST"'
    inner = "".join(
        f'<Parameter name="{escape(name)}" value="{escape(value)}" />' for name, value in parameters.items() if value
    )
    return _document(
        f"<Connect><Stream {attributes}>{inner}</Stream></Connect>"
        f'<Redirect method="POST">{escape(after_stream_url)}</Redirect>'
    )


def hangup_twiml(say: str | None = None) -> str:
    """`<Hangup/>`, after a `<Say>` when there is something to tell the caller first."""
    return _document((f"<Say>{escape(say)}</Say>" if say else "") + "<Hangup />")


def say_twiml(text: str) -> str:
    """A `<Say>` and nothing else: on a `<Number url>` (a whisper), the legs are bridged after it."""
    return _document(f"<Say>{escape(text)}</Say>")


def dial_twiml(
    number: str, *, action: str, timeout_s: int, caller_id: str | None, whisper_url: str, status_callback: str
) -> str:
    """`<Dial>` one number (or `sip:` URI) with a whisper and the child leg's statuses on our callback."""
    dial = f'action="{escape(action)}" method="POST" timeout="{timeout_s}"'
    if caller_id:
        dial += f' callerId="{escape(caller_id)}"'
    noun = "Sip" if number.startswith("sip:") else "Number"
    leg = (
        f'url="{escape(whisper_url)}" method="POST" statusCallback="{escape(status_callback)}" '
        'statusCallbackMethod="POST" statusCallbackEvent="initiated ringing answered completed"'
    )
    return _document(f"<Dial {dial}><{noun} {leg}>{escape(number)}</{noun}></Dial>")
