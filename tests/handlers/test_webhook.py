"""The webhook Lambda, called as Lambda calls it: API Gateway HTTP API v2 events, under moto."""

from __future__ import annotations

import importlib
import io
import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import boto3
import pytest
from moto import mock_aws
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, Dial, VoiceResponse

from core.records import NextStep
from core.store import CallStore, create_table
from core.twilio import stream_token_problem
from infra.lambda_events import http_api_event

TOKEN = "auth-token-0123456789"
HOST = "abc123defg.execute-api.us-east-1.amazonaws.com"
MEDIA_URL = "wss://media.example.com/media"
CALL_SID = "CA" + "1" * 32
VOICE_FORM = {
    "AccountSid": "AC" + "0" * 32,
    "ApiVersion": "2010-04-01",
    "CallSid": CALL_SID,
    "CallStatus": "ringing",
    "Called": "+15557654321",
    "Caller": "+15551234567",
    "Direction": "inbound",
    "From": "+15551234567",
    "FromCountry": "US",
    "To": "+15557654321",
    "ToCountry": "US",
}
CONTEXT = SimpleNamespace(
    function_name="parley-webhook",
    memory_limit_in_mb=512,
    invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:parley-webhook",
    aws_request_id="req-1",
)


def event(
    path: str, form: dict[str, str], *, signature: str | None = "sign", signed_url: str | None = None
) -> dict[str, Any]:
    """Signed as Twilio signs, by twilio's own RequestValidator (the oracle)."""
    if signature == "sign":
        signature = RequestValidator(TOKEN).compute_signature(signed_url or f"https://{HOST}{path}", form)
    return http_api_event(path, form, host=HOST, signature=signature)


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("MEDIA_STREAM_URL", MEDIA_URL)
    monkeypatch.setenv("CALLS_TABLE", "calls")
    monkeypatch.delenv("PUBLIC_BASE_URL", raising=False)
    with mock_aws():
        create_table(boto3.client("dynamodb"), "calls")
        import handlers.webhook

        yield importlib.reload(handlers.webhook)


def stored(call_sid: str = CALL_SID) -> dict[str, Any] | None:
    return CallStore(boto3.client("dynamodb"), "calls").get_call(call_sid)


def emf_metrics(output: str) -> dict[str, float]:
    """Metric totals over every EMF line printed (one per invocation)."""
    found: dict[str, float] = {}
    for line in output.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            record = json.loads(line)
            for definition in record["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
                values = record[definition["Name"]]
                found[definition["Name"]] = found.get(definition["Name"], 0) + sum(
                    values if isinstance(values, list) else [values]
                )
    return found


def test_voice_answers_twiml_with_the_stream_and_records_the_call(
    webhook: ModuleType, capfd: pytest.CaptureFixture[str], log_output: io.StringIO
) -> None:
    response = webhook.handler(event("/voice", VOICE_FORM), CONTEXT)
    assert response["statusCode"] == 200
    assert response["headers"]["content-type"].startswith("text/xml")
    assert response["isBase64Encoded"] is False
    root = ET.fromstring(response["body"])
    stream = root.find("./Connect/Stream")
    assert stream is not None
    assert stream.get("url") == MEDIA_URL
    assert stream.get("statusCallback") == f"https://{HOST}/stream-status"
    parameters = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    token = parameters.pop("token")
    assert parameters == {"CallSid": CALL_SID, "From": "+15551234567", "To": "+15557654321", "Direction": "inbound"}
    assert stream_token_problem(TOKEN, CALL_SID, token, time.time()) is None
    assert stream_token_problem(TOKEN, "CA" + "2" * 32, token, time.time()) is not None  # another call's
    redirect = root.find("./Redirect")
    assert redirect is not None and redirect.text == f"https://{HOST}/after-stream" and redirect.get("method") == "POST"
    item = stored()
    assert item is not None and item["from_number"] == "+15551234567" and item["status"] == "ringing"
    output = capfd.readouterr().out
    assert emf_metrics(output)["CallsStarted"] == 1
    logs = [json.loads(line) for line in log_output.getvalue().splitlines()]
    assert logs and all(record["CallSid"] == CALL_SID for record in logs)
    assert TOKEN not in output + log_output.getvalue()


def canonical(element: ET.Element) -> Any:
    return (element.tag, sorted(element.attrib.items()), (element.text or "").strip(), [canonical(c) for c in element])


def test_the_twiml_is_what_twilios_own_builder_makes(webhook: ModuleType) -> None:
    body = webhook.handler(event("/voice", VOICE_FORM), CONTEXT)["body"]
    token = ET.fromstring(body).find("./Connect/Stream/Parameter[@name='token']")
    assert token is not None
    expected = VoiceResponse()
    connect = Connect()
    stream = connect.stream(
        url=MEDIA_URL, status_callback=f"https://{HOST}/stream-status", status_callback_method="POST"
    )
    parameters = (
        ("CallSid", CALL_SID),
        ("From", "+15551234567"),
        ("To", "+15557654321"),
        ("Direction", "inbound"),
        ("token", token.get("value")),
    )
    for name, value in parameters:
        stream.parameter(name=name, value=value)
    expected.append(connect)
    expected.redirect(f"https://{HOST}/after-stream", method="POST")
    assert canonical(ET.fromstring(body)) == canonical(ET.fromstring(str(expected)))


# -- section 2b: what the call does when its stream ends -----------------------------------------------


def books() -> CallStore:
    return CallStore(boto3.client("dynamodb"), "calls")


def after_stream(webhook: ModuleType) -> ET.Element:
    response = webhook.handler(event("/after-stream", {**VOICE_FORM, "CallStatus": "in-progress"}), CONTEXT)
    assert response["statusCode"] == 200
    return ET.fromstring(response["body"])


def test_after_the_agent_hangs_up_the_call_is_hung_up_and_next_is_cleared(webhook: ModuleType) -> None:
    webhook.handler(event("/voice", VOICE_FORM), CONTEXT)
    books().set_next(CALL_SID, NextStep("hangup"), "MZ1")
    assert [child.tag for child in after_stream(webhook)] == ["Hangup"]
    item = stored()
    assert item is not None and "next" not in item


def test_a_transfer_dials_the_number_with_the_whisper_and_the_child_leg_on_our_status(webhook: ModuleType) -> None:
    webhook.handler(event("/voice", VOICE_FORM), CONTEXT)
    books().set_next(CALL_SID, NextStep("transfer", "support", "+15551230000", "wants a refund"), "MZ1")
    twiml = after_stream(webhook)
    expected = VoiceResponse()
    dial = Dial(action=f"https://{HOST}/after-dial", method="POST", timeout=20, caller_id="+15557654321")
    dial.number(
        "+15551230000",
        url=f"https://{HOST}/whisper?parent={CALL_SID}",
        method="POST",
        status_callback=f"https://{HOST}/status",
        status_callback_method="POST",
        status_callback_event="initiated ringing answered completed",
    )
    expected.append(dial)
    assert canonical(twiml) == canonical(ET.fromstring(str(expected)))
    item = stored()
    assert item is not None and item["transfer"]["destination"] == "support" and "next" not in item

    child = {"CallSid": "CA" + "9" * 32, "ParentCallSid": CALL_SID, "CallStatus": "ringing", "SequenceNumber": "1"}
    assert webhook.handler(event("/status", child), CONTEXT)["statusCode"] == 204
    whisper = webhook.handler(
        event("/whisper", {"CallSid": child["CallSid"]}, signed_url=f"https://{HOST}/whisper?parent={CALL_SID}")
        | {"rawQueryString": f"parent={CALL_SID}"},
        CONTEXT,
    )
    assert whisper["statusCode"] == 200
    assert ET.fromstring(whisper["body"]).find("Say").text == "Transferred call. wants a refund"  # type: ignore[union-attr]

    answered = {**VOICE_FORM, "DialCallStatus": "completed", "DialCallSid": child["CallSid"], "DialCallDuration": "42"}
    twiml = ET.fromstring(webhook.handler(event("/after-dial", answered), CONTEXT)["body"])
    assert [child.tag for child in twiml] == ["Hangup"]
    item = stored()
    assert item is not None and item["outcome"] == "transferred"
    assert item["transfer"]["dial_status"] == "completed" and item["transfer"]["child_call_sid"] == child["CallSid"]


@pytest.mark.parametrize("status", ["busy", "no-answer", "failed", "canceled"])
def test_a_transfer_nobody_answers_brings_the_caller_back_to_the_agent_saying_why(
    webhook: ModuleType, status: str
) -> None:
    webhook.handler(event("/voice", VOICE_FORM), CONTEXT)
    response = webhook.handler(event("/after-dial", {**VOICE_FORM, "DialCallStatus": status}), CONTEXT)
    stream = ET.fromstring(response["body"]).find("./Connect/Stream")
    assert stream is not None
    parameters = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert parameters["resume"] == f"transfer-failed:{status}"
    assert stream_token_problem(TOKEN, CALL_SID, parameters["token"], time.time()) is None


def test_a_lost_stream_is_reconnected_at_most_stream_resumes_times_then_apologised_for(webhook: ModuleType) -> None:
    webhook.handler(event("/voice", VOICE_FORM), CONTEXT)
    for _ in range(2):
        stream = after_stream(webhook).find("./Connect/Stream")
        assert stream is not None
        assert {p.get("name"): p.get("value") for p in stream.findall("Parameter")}["resume"] == "lost-stream"
    twiml = after_stream(webhook)
    assert [child.tag for child in twiml] == ["Say", "Hangup"]
    item = stored()
    assert item is not None and item["outcome"] == "stream_lost" and item["stream_resumes"] == 2


def test_after_stream_for_an_unknown_call_hangs_up_politely_and_says_so(
    webhook: ModuleType, log_output: io.StringIO
) -> None:
    twiml = after_stream(webhook)
    assert [child.tag for child in twiml] == ["Say", "Hangup"]
    assert "/after-stream for a call with no item" in log_output.getvalue()


@pytest.mark.parametrize(
    ("signature", "signed_url"),
    [
        ("AAAAAAAAAAAAAAAAAAAAAAAAAAA=", None),  # forged
        ("sign", "https://elsewhere.example.com/voice"),  # signed for another URL
        (None, None),  # no header at all
    ],
    ids=["forged", "another-url", "missing"],
)
def test_a_bad_signature_is_refused_and_nothing_is_written(
    webhook: ModuleType, capfd: pytest.CaptureFixture[str], signature: str | None, signed_url: str | None
) -> None:
    for path in ("/voice", "/status", "/stream-status"):
        form = {**VOICE_FORM, "SequenceNumber": "1", "StreamEvent": "stream-started"}
        response = webhook.handler(event(path, form, signature=signature, signed_url=signed_url), CONTEXT)
        assert response["statusCode"] == 403
    assert stored() is None
    assert emf_metrics(capfd.readouterr().out)["SignatureRejected"] == 3


def test_a_malformed_body_gets_400_with_the_reason(webhook: ModuleType) -> None:
    form = {k: v for k, v in VOICE_FORM.items() if k != "CallSid"}
    response = webhook.handler(event("/voice", form), CONTEXT)
    assert response["statusCode"] == 400
    assert "CallSid" in response["body"]
    bad_sequence = {"CallSid": CALL_SID, "CallStatus": "ringing", "SequenceNumber": "first"}
    response = webhook.handler(event("/status", bad_sequence), CONTEXT)
    assert response["statusCode"] == 400 and "SequenceNumber" in response["body"]


def test_a_dynamodb_failure_does_not_drop_the_caller(
    webhook: ModuleType, capfd: pytest.CaptureFixture[str], log_output: io.StringIO
) -> None:
    boto3.client("dynamodb").delete_table(TableName="calls")
    response = webhook.handler(event("/voice", VOICE_FORM), CONTEXT)
    assert response["statusCode"] == 200
    assert ET.fromstring(response["body"]).find("./Connect/Stream") is not None
    assert emf_metrics(capfd.readouterr().out)["BookkeepingFailures"] == 1
    assert "could not record the call" in log_output.getvalue()


def test_status_callbacks_in_any_order_through_the_handler(webhook: ModuleType) -> None:
    webhook.handler(event("/voice", VOICE_FORM), CONTEXT)
    for sequence, value in ((3, "completed"), (1, "ringing"), (2, "in-progress"), (3, "completed")):
        form = {
            "CallSid": CALL_SID,
            "CallStatus": value,
            "SequenceNumber": str(sequence),
            "CallDuration": "61" if value == "completed" else "",
        }
        assert webhook.handler(event("/status", form), CONTEXT)["statusCode"] == 204
    item = stored()
    assert item is not None and item["status"] == "completed" and item["call_duration"] == 61


def test_stream_status_is_recorded(webhook: ModuleType) -> None:
    form = {
        "CallSid": CALL_SID,
        "StreamSid": "MZ" + "2" * 32,
        "StreamEvent": "stream-error",
        "StreamError": "handshake failed",
        "Timestamp": "2026-11-24T00:00:00Z",
        "AccountSid": "AC1",
    }
    assert webhook.handler(event("/stream-status", form), CONTEXT)["statusCode"] == 204
    item = stored()
    assert item is not None and item["stream_log"] == [
        f"2026-11-24T00:00:00Z|stream-error|{'MZ' + '2' * 32}|handshake failed"
    ]


def test_health(webhook: ModuleType) -> None:
    health = http_api_event("/healthz", {}, host=HOST, signature=None, method="GET")
    response = webhook.handler(health, CONTEXT)
    assert response["statusCode"] == 200 and json.loads(response["body"]) == {"status": "ok"}


def test_a_configured_public_base_url_is_what_is_checked(monkeypatch: pytest.MonkeyPatch, webhook: ModuleType) -> None:
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://voice.example.com")
    module = importlib.reload(webhook)
    ok = module.handler(event("/voice", VOICE_FORM, signed_url="https://voice.example.com/voice"), CONTEXT)
    assert ok["statusCode"] == 200
    assert 'statusCallback="https://voice.example.com/stream-status"' in ok["body"]
    assert module.handler(event("/voice", VOICE_FORM), CONTEXT)["statusCode"] == 403


def test_a_missing_setting_fails_at_import_naming_it(monkeypatch: pytest.MonkeyPatch, webhook: ModuleType) -> None:
    from core.config import ConfigError

    monkeypatch.delenv("MEDIA_STREAM_URL")
    with pytest.raises(ConfigError, match=r"^MEDIA_STREAM_URL: is not set"):
        importlib.reload(webhook)


def test_a_rotated_auth_token_is_followed_without_a_deploy(
    monkeypatch: pytest.MonkeyPatch, webhook: ModuleType
) -> None:
    """TWILIO_AUTH_TOKEN_SECRET: the token is read at run time; after a rotation the first request
    signed with the new token makes the webhook read the secret again, and the old token stops working."""
    secrets = boto3.client("secretsmanager")
    arn = secrets.create_secret(Name="parley", SecretString=json.dumps({"twilio_auth_token": TOKEN}))["ARN"]
    monkeypatch.delenv("TWILIO_AUTH_TOKEN")
    monkeypatch.setenv("TWILIO_AUTH_TOKEN_SECRET", arn)
    module = importlib.reload(webhook)
    assert module.handler(event("/voice", VOICE_FORM), CONTEXT)["statusCode"] == 200

    rotated = "rotated-auth-token-9876543210"
    secrets.put_secret_value(SecretId=arn, SecretString=json.dumps({"twilio_auth_token": rotated}))
    new_signature = RequestValidator(rotated).compute_signature(f"https://{HOST}/voice", VOICE_FORM)
    answer = module.handler(event("/voice", VOICE_FORM, signature=new_signature), CONTEXT)
    assert answer["statusCode"] == 200  # within the cache's max age: read again because the old one failed
    token = ET.fromstring(answer["body"]).find("./Connect/Stream/Parameter[@name='token']")
    assert token is not None and stream_token_problem(rotated, CALL_SID, token.get("value"), time.time()) is None
    assert module.handler(event("/voice", VOICE_FORM), CONTEXT)["statusCode"] == 403  # the old token


def test_neither_a_token_nor_its_secret_stops_the_start_naming_both(
    monkeypatch: pytest.MonkeyPatch, webhook: ModuleType
) -> None:
    from core.config import ConfigError

    monkeypatch.delenv("TWILIO_AUTH_TOKEN")
    with pytest.raises(ConfigError, match=r"^TWILIO_AUTH_TOKEN: is not set \(nor TWILIO_AUTH_TOKEN_SECRET\)"):
        importlib.reload(webhook)


def test_the_snapshot_warm_up_touches_nothing_outside_the_process(
    webhook: ModuleType, capfd: pytest.CaptureFixture[str]
) -> None:
    """SnapStart runs `warm` before its snapshot: no DynamoDB write, no metric, no secret read."""
    webhook.warm()
    assert stored("CA" + "0" * 32) is None
    assert emf_metrics(capfd.readouterr().out) == {}


SHARED_KEY = "webhooks-rule-shared-key-secret"
RULE = "key=webhooks_sharedkey_0123,algorithm=HMAC_SHA256"


def rule_signed(secret: str) -> dict[str, Any]:
    """A /voice request matched by a Webhooks Rule: the settings header, and an HMAC-SHA256 signature."""
    url = f"https://{HOST}/voice"
    signature = RequestValidator(secret).compute_signature(url, VOICE_FORM, "HMAC_SHA256")
    request = event("/voice", VOICE_FORM, signature=signature)
    request["headers"]["x-twilio-webhooks-signature-settings"] = RULE
    return request


def test_a_webhooks_rule_request_is_checked_with_its_shared_key(
    monkeypatch: pytest.MonkeyPatch, webhook: ModuleType
) -> None:
    """twilio-python: the secret is "the SharedKey secret when the request carries
    X-Twilio-Webhooks-Signature-Settings", not the Auth Token."""
    monkeypatch.setenv("TWILIO_WEBHOOK_SHARED_KEY", SHARED_KEY)
    webhook = importlib.reload(webhook)
    assert webhook.handler(rule_signed(SHARED_KEY), CONTEXT)["statusCode"] == 200
    assert webhook.handler(rule_signed(TOKEN), CONTEXT)["statusCode"] == 403  # the Auth Token is not it
    assert webhook.handler(event("/voice", VOICE_FORM), CONTEXT)["statusCode"] == 200  # no rule: the Auth Token


def test_a_webhooks_rule_request_without_a_configured_shared_key_is_refused_and_says_what_to_set(
    webhook: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    assert webhook.handler(rule_signed(SHARED_KEY), CONTEXT)["statusCode"] == 403
    assert webhook.handler(rule_signed(TOKEN), CONTEXT)["statusCode"] == 403
    assert "TWILIO_WEBHOOK_SHARED_KEY is not set" in caplog.text
    assert stored() is None
