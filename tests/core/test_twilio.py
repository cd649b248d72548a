"""The Twilio core: Media Streams messages, signatures (against twilio's RequestValidator), URLs."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import string

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from core.twilio import (
    MAX_FRAME_BYTES,
    Connected,
    Dtmf,
    MalformedMessage,
    Mark,
    Media,
    OutboundClear,
    OutboundMark,
    OutboundMedia,
    Start,
    Stop,
    compute_signature,
    decode_inbound,
    decode_outbound,
    encode_clear,
    encode_mark,
    encode_media,
    public_url,
    signature_algorithm,
    signing_secret,
    validate_signature,
    validate_upgrade,
)

# -- inbound messages, exactly as protocols.md section 1.2 quotes Twilio's documentation -----------

CONNECTED = '{"event":"connected","protocol":"Call","version":"1.0.0"}'
START = (
    '{"event":"start","sequenceNumber":"1","start":{"accountSid":"ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",'
    '"streamSid":"MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX","callSid":"CAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",'
    '"tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},'
    '"customParameters":{"FirstName":"Jane","LastName":"Doe","RemoteParty":"Bob"}},'
    '"streamSid":"MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"}'
)
MEDIA = (
    '{"event":"media","sequenceNumber":"4","media":{"track":"inbound","chunk":"2","timestamp":"5",'
    '"payload":"no+JhoaJjpzS"},"streamSid":"MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"}'
)
DTMF = '{"event":"dtmf","streamSid":"MZX","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"1"}}'
MARK = '{"event":"mark","sequenceNumber":"4","streamSid":"MZX","mark":{"name":"my label"}}'
STOP = '{"event":"stop","sequenceNumber":"5","stop":{"accountSid":"ACX","callSid":"CAX"},"streamSid":"MZX"}'


def test_every_documented_inbound_message_decodes() -> None:
    assert decode_inbound(CONNECTED) == Connected(protocol="Call", version="1.0.0")
    start = decode_inbound(START)
    assert isinstance(start, Start)
    assert start.sequence_number == 1
    assert start.start.call_sid.startswith("CA")
    assert start.start.custom_parameters == {"FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob"}
    assert start.start.media_format is not None and start.start.media_format.sample_rate == 8000
    media = decode_inbound(MEDIA.encode())
    assert isinstance(media, Media)
    assert (media.sequence_number, media.media.chunk, media.media.timestamp) == (4, 2, 5)
    assert media.media.payload == base64.b64decode("no+JhoaJjpzS")
    dtmf = decode_inbound(DTMF)
    assert isinstance(dtmf, Dtmf) and dtmf.dtmf.digit == "1"
    mark = decode_inbound(MARK)
    assert isinstance(mark, Mark) and mark.mark.name == "my label"
    stop = decode_inbound(STOP)
    assert isinstance(stop, Stop) and stop.stop.call_sid == "CAX"


def test_unknown_fields_are_tolerated() -> None:
    # Twilio may add fields; an agent must not drop a call for that.
    assert isinstance(decode_inbound(MEDIA[:-1] + ',"newField":{"x":1}}'), Media)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "Expected `object`"),
        ('{"event":"dance","streamSid":"MZ"}', "unknown event"),
        ('{"streamSid":"MZ"}', "missing required field `event`"),
        (MEDIA.replace('"timestamp":"5"', '"timestamp":"five"'), "$.media.timestamp"),
        (MEDIA.replace('"payload":"no+JhoaJjpzS"', '"payload":"no+J!!"'), "base64"),
        (MEDIA.replace('"payload":"no+JhoaJjpzS"', '"payload":12'), "$.media.payload"),
        ('{"event":"media","sequenceNumber":"4","streamSid":"MZ"}', "missing required field `media`"),
        ('{"event":"mark","sequenceNumber":"4","streamSid":"MZ","mark":{}}', "`name`"),
        ("x" * (MAX_FRAME_BYTES + 1), "exceeds"),
        (b"\xff\xfe\x00", "not JSON"),
    ],
)
def test_malformed_messages_raise_one_named_error(frame: str | bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage) as caught:
        decode_inbound(frame)
    assert reason in caught.value.reason


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_no_input_escapes_as_another_exception(frame: bytes | str) -> None:
    with contextlib.suppress(MalformedMessage):
        decode_inbound(frame)


def test_outbound_messages_are_exactly_twilios_shape() -> None:
    sid = "MZ" + "a" * 32
    assert msgspec.json.decode(encode_media(sid, b"\xff\x00")) == {
        "event": "media",
        "streamSid": sid,
        "media": {"payload": "/wA="},
    }
    assert msgspec.json.decode(encode_mark(sid, "r1:0")) == {
        "event": "mark",
        "streamSid": sid,
        "mark": {"name": "r1:0"},
    }
    assert msgspec.json.decode(encode_clear(sid)) == {"event": "clear", "streamSid": sid}
    media = decode_outbound(encode_media(sid, b"\x01"))
    assert isinstance(media, OutboundMedia) and media.media.payload == b"\x01"
    assert isinstance(decode_outbound(encode_mark(sid, "x")), OutboundMark)
    assert isinstance(decode_outbound(encode_clear(sid)), OutboundClear)


# -- signatures -------------------------------------------------------------------------------------

TOKEN = "12345"
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
    "Caller": "+14158675309",
}
BODY = '{"property": "value", "boolean": true}'
BODY_HASH = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"


def test_published_vectors() -> None:
    assert compute_signature(TOKEN, URL, PARAMS) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert validate_signature(TOKEN, URL, PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    with_port = URL.replace(".com/", ".com:443/")
    assert compute_signature(TOKEN, with_port, PARAMS) == "kvajT1Ptam85bY51eRf/AJRuM3w="
    assert validate_signature(TOKEN, URL, PARAMS, "kvajT1Ptam85bY51eRf/AJRuM3w=")
    assert validate_signature(TOKEN, with_port, PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert hashlib.sha256(BODY.encode()).hexdigest() == BODY_HASH
    json_url = f"{URL}&bodySHA256={BODY_HASH}"
    assert validate_signature(TOKEN, json_url, None, "a9nBmqA0ju/hNViExpshrM61xv4=", raw_body=BODY.encode())
    assert not validate_signature(TOKEN, json_url, None, "a9nBmqA0ju/hNViExpshrM61xv4=", raw_body=b'{"tampered": 1}')


@pytest.mark.parametrize("signature", [None, "", "RSOYDt4T1cUTdK1PDd93/VVr8B8", "x" * 28])
def test_missing_or_wrong_signatures_fail(signature: str | None) -> None:
    assert not validate_signature(TOKEN, URL, PARAMS, signature)


def test_a_signature_for_another_url_fails() -> None:
    assert not validate_signature(TOKEN, URL.replace("myapp", "other"), PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=")


def test_upgrade_url_is_signed_without_params() -> None:
    url = "wss://media.example.com/media"
    signature = RequestValidator("tok3n").compute_signature(url, {})
    assert validate_signature("tok3n", url, None, signature)


_names = st.text(string.ascii_letters + string.digits, min_size=1, max_size=12)
_values = st.text(max_size=20)
_urls = st.builds(
    lambda scheme, host, port, path, query: f"{scheme}://{host}{port}/{path}{query}",
    st.sampled_from(["https", "http", "wss"]),
    st.sampled_from(["example.com", "api.example.org", "Mixed.Case.io", "127.0.0.1"]),
    st.sampled_from(["", ":443", ":80", ":8443"]),
    st.text(string.ascii_letters + "/-_.", max_size=20),
    st.sampled_from(["", "?a=1", "?a=1&b=%20x", "?z=&y=2"]),
)


@settings(max_examples=400)
@given(
    token=st.text(min_size=1, max_size=40),
    url=_urls,
    params=st.dictionaries(_names, st.one_of(_values, st.lists(_values, min_size=1, max_size=3)), max_size=8),
    algorithm=st.sampled_from(["HMAC_SHA1", "HMAC_SHA256"]),
)
def test_agrees_with_twilios_request_validator(
    token: str, url: str, params: dict[str, str | list[str]], algorithm: str
) -> None:
    class MultiDict(dict[str, list[str]]):
        def getall(self, name: str) -> list[str]:
            return self[name]

    multi = MultiDict({k: [v] if isinstance(v, str) else v for k, v in params.items()})
    oracle = RequestValidator(token)
    expected = oracle.compute_signature(url, multi, algorithm)
    assert compute_signature(token, url, params, algorithm) == expected
    assert validate_signature(token, url, params, expected, algorithm=algorithm)
    other_port = url.replace("://", "://x") if "?" not in url else url + "&x=1"
    for candidate_url in (url, other_port):
        for signature in (expected, oracle.compute_signature(candidate_url, multi, algorithm)):
            assert validate_signature(token, url, params, signature, algorithm=algorithm) == oracle.validate(
                url, multi, signature, algorithm
            )


def test_signature_algorithm_header() -> None:
    assert signature_algorithm(None) == "HMAC_SHA1"
    assert signature_algorithm("key=webhooks_sharedkey_1,algorithm=HMAC_SHA256") == "HMAC_SHA256"
    assert not validate_signature(TOKEN, URL, PARAMS, "x", algorithm="HMAC_MD5")


# -- the public URL ---------------------------------------------------------------------------------


def test_configured_base_wins() -> None:
    assert (
        public_url("/voice", "a=1", base_url="https://hooks.example.com/", headers={"host": "internal"})
        == "https://hooks.example.com/voice?a=1"
    )


def test_rebuilt_from_proxy_headers() -> None:
    headers = {"Host": "abc.execute-api.us-east-1.amazonaws.com", "X-Forwarded-Proto": "https"}
    assert public_url("/status", headers=headers) == "https://abc.execute-api.us-east-1.amazonaws.com/status"
    assert (
        public_url(
            "/media", headers={"x-forwarded-host": "m.example.com", "host": "10.0.0.5:8000"}, default_scheme="wss"
        )
        == "wss://m.example.com/media"
    )


def test_an_upgrade_signed_by_a_webhooks_rule_is_checked_with_its_shared_key() -> None:
    url, rule = "wss://media.example.com/media", "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"
    by_key = RequestValidator("shared-key").compute_signature(url, {}, "HMAC_SHA256")
    by_token = RequestValidator("auth-token").compute_signature(url, {}, "HMAC_SHA256")
    assert validate_upgrade("auth-token", url, by_key, settings_header=rule, shared_key="shared-key")
    assert not validate_upgrade("auth-token", url, by_token, settings_header=rule, shared_key="shared-key")
    assert not validate_upgrade("auth-token", url, by_key, settings_header=rule)  # no key configured
    assert signing_secret("auth-token", "shared-key", None) == "auth-token"
    assert signing_secret("auth-token", "shared-key", rule) == "shared-key"
