"""The call store, against moto and against dynalite (an independent DynamoDB implementation)."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.records import (
    CallSummary,
    ChatMessage,
    NextStep,
    ReplyKind,
    Role,
    SavedConversation,
    Speaker,
    ToolCall,
    ToolUse,
    TurnRecord,
)
from core.store import CallStore, create_table

NOW = 1_795_478_400.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(dynamodb: Any, table_name: str, clock: Clock) -> CallStore:
    create_table(dynamodb, table_name)
    return CallStore(dynamodb, table_name, ttl_days=30, clock=clock)


VOICE = {
    "CallSid": "CA" + "1" * 32,
    "AccountSid": "AC" + "0" * 32,
    "From": "+15551234567",
    "To": "+15557654321",
    "CallStatus": "ringing",
    "Direction": "inbound",
    "ApiVersion": "2010-04-01",
}


def status(call_sid: str, sequence: int, value: str, duration: str = "") -> dict[str, str]:
    params = {
        "CallSid": call_sid,
        "CallStatus": value,
        "SequenceNumber": str(sequence),
        "Timestamp": f"Tue, 24 Nov 2026 00:00:{sequence:02d} +0000",
        "CallbackSource": "call-progress-events",
    }
    if duration:
        params["CallDuration"] = duration
    return params


def test_the_incoming_call_is_recorded_with_its_expiry(store: CallStore) -> None:
    store.record_call(VOICE)
    item = store.get_call(VOICE["CallSid"])
    assert item is not None
    assert item["from_number"] == "+15551234567" and item["to_number"] == "+15557654321"
    assert item["direction"] == "inbound" and item["status"] == "ringing"
    assert item["created_at"] == int(NOW)
    assert item["expires_at"] == int(NOW) + 30 * 86400


def test_a_retried_webhook_changes_nothing(store: CallStore, clock: Clock) -> None:
    store.record_call(VOICE)
    first = store.get_call(VOICE["CallSid"])
    clock.now += 5
    store.record_call({**VOICE, "From": "+19999999999"})
    assert store.get_call(VOICE["CallSid"]) == first


def test_status_follows_sequence_and_final_states_stay_final(store: CallStore) -> None:
    sid = VOICE["CallSid"]
    store.record_call(VOICE)
    store.record_status(status(sid, 3, "completed", "42"))
    store.record_status(status(sid, 2, "in-progress"))  # late
    store.record_status(status(sid, 1, "ringing"))  # later still
    store.record_status(status(sid, 3, "completed", "42"))  # duplicate
    item = store.get_call(sid)
    assert item is not None
    assert item["status"] == "completed" and item["call_duration"] == 42
    assert [h["status"] for h in CallStore.status_history(item)] == ["ringing", "in-progress", "completed"]
    assert item["from_number"] == VOICE["From"]  # the webhook's record is untouched


def test_a_status_callback_before_the_voice_record_still_lands(store: CallStore) -> None:
    sid = "CA" + "2" * 32
    store.record_status(status(sid, 0, "initiated"))
    store.record_call({**VOICE, "CallSid": sid})
    item = store.get_call(sid)
    assert item is not None and item["status"] == "initiated" and item["from_number"] == VOICE["From"]


def test_stream_events_are_kept(store: CallStore) -> None:
    sid = VOICE["CallSid"]
    for event in ("stream-started", "stream-stopped", "stream-started"):
        store.record_stream_event({"CallSid": sid, "StreamSid": "MZ1", "StreamEvent": event, "Timestamp": f"t-{event}"})
    item = store.get_call(sid)
    assert item is not None
    assert item["stream_sid"] == "MZ1"
    assert item["stream_log"] == ["t-stream-started|stream-started|MZ1|", "t-stream-stopped|stream-stopped|MZ1|"]


def test_the_media_service_completes_without_overwriting(store: CallStore) -> None:
    store.record_call(VOICE)
    summary = CallSummary(
        turns=(
            TurnRecord(Speaker.AGENT, "Hello", 40, reply_id="r1", kind=ReplyKind.GREETING, full_text="Hello"),
            TurnRecord(Speaker.CALLER, "hi", 2100),
        ),
        end_reason="stop",
        duration_ms=15000,
        reply_latency_ms=(2012, 2030),
        provider_failures=("speech-to-text: Deepgram refused the connection with HTTP 401",),
    )
    store.complete_call(VOICE["CallSid"], summary, {"From": "+10000000000", "StreamSid": "MZ9"})
    item = store.get_call(VOICE["CallSid"])
    assert item is not None
    assert item["from_number"] == VOICE["From"]  # the webhook wrote it first
    assert item["stream_sid"] == "MZ9"
    assert item["transcript"] == "Agent: Hello\nCaller: hi" and item["turn_count"] == 1
    assert item["latency"]["reply_ms"] == [2012, 2030]
    assert item["turns"][0] == {
        "role": "agent",
        "text": "Hello",
        "at_ms": 40,
        "reply_id": "r1",
        "kind": "greeting",
        "full_text": "Hello",
        "interrupted": False,
    }
    assert item["turns"][1] == {"role": "caller", "text": "hi", "at_ms": 2100}
    assert item["provider_failures"] == list(summary.provider_failures)


def test_the_next_step_is_written_once_until_it_is_acted_on(store: CallStore) -> None:
    call_sid = VOICE["CallSid"]
    store.record_call(VOICE)
    transfer = NextStep("transfer", "support", "+15551230000", "wants a refund")
    assert store.set_next(call_sid, transfer, "MZ1") is True
    assert store.set_next(call_sid, NextStep("hangup"), "MZ2") is False  # a late stream cannot replace it
    item = store.get_call(call_sid)
    assert item is not None and item["next"] == {
        "action": "transfer",
        "destination": "support",
        "number": "+15551230000",
        "summary": "wants a refund",
        "stream_sid": "MZ1",
    }
    assert store.take_next(call_sid) == (True, item["next"])  # read and removed in one write
    assert store.take_next(call_sid) == (True, None)
    assert store.set_next(call_sid, NextStep("hangup"), "MZ2") is True  # acted on: a new step may be set
    assert store.take_next("CA" + "9" * 32) == (False, None)
    assert store.get_call("CA" + "9" * 32) is None  # asking about an unknown call creates nothing


def test_the_conversation_is_saved_and_restored_with_its_tool_calls(store: CallStore) -> None:
    call_sid = VOICE["CallSid"]
    assert store.load_conversation(call_sid) is None
    call = ToolCall("call_1", "check_availability", '{"people": 4}')
    saved = SavedConversation(
        (
            ChatMessage(Role.USER, "a table for four"),
            ChatMessage(Role.ASSISTANT, "Let me check.", tool_calls=(call,)),
            ChatMessage(Role.TOOL, '{"available": true}', tool_call_id="call_1"),
            ChatMessage(Role.ASSISTANT, "It is free."),
        ),
        elapsed_ms=42_000,
    )
    store.save_conversation(call_sid, saved)
    assert store.load_conversation(call_sid) == saved


def test_tool_uses_and_the_outcome_are_on_the_record(store: CallStore) -> None:
    call_sid = VOICE["CallSid"]
    use = ToolUse("check_availability", '{"people": 4}', '{"available": true}', "call_1")
    turns = (TurnRecord(Speaker.AGENT, "It is free.", 100, reply_id="r1", kind=ReplyKind.ANSWER, tools=(use,)),)
    store.complete_call(
        call_sid, CallSummary(turns=turns, end_reason="agent", duration_ms=1000, outcome="completed_by_agent")
    )
    item = store.get_call(call_sid)
    assert item is not None and item["outcome"] == "completed_by_agent"
    assert item["turns"][0]["tools"] == [
        {"name": "check_availability", "arguments": '{"people": 4}', "result": '{"available": true}'}
    ]


def test_the_media_service_creates_a_missing_item(store: CallStore) -> None:
    sid = "CA" + "3" * 32
    store.complete_call(sid, CallSummary(turns=(), end_reason=None, duration_ms=0), {"From": "+1555"})
    item = store.get_call(sid)
    assert item is not None and item["from_number"] == "+1555" and item["expires_at"] > NOW


def test_expired_items_are_not_read(store: CallStore, clock: Clock) -> None:
    store.record_call(VOICE)
    clock.now += 31 * 86400  # DynamoDB may not have deleted it yet
    assert store.get_call(VOICE["CallSid"]) is None


def test_the_table_expires_items_by_ttl(request: pytest.FixtureRequest, dynamodb: Any, table_name: str) -> None:
    if request.node.callspec.params["dynamodb"] == "dynalite":
        pytest.skip("dynalite has no UpdateTimeToLive/DescribeTimeToLive")
    create_table(dynamodb, table_name)
    description = dynamodb.describe_time_to_live(TableName=table_name)["TimeToLiveDescription"]
    assert description == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}


# -- any order and duplication of the callbacks ends as the ordered sequence ---------------------

_progressions = st.sampled_from(
    [
        ["initiated", "ringing", "in-progress", "completed"],
        ["initiated", "ringing", "no-answer"],
        ["initiated", "ringing", "busy"],
        ["initiated", "failed"],
        ["ringing", "canceled"],
        ["initiated", "ringing", "in-progress"],
    ]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(progression=_progressions, data=st.data())
def test_any_order_and_duplication_ends_as_the_ordered_sequence(
    store: CallStore, progression: list[str], data: st.DataObject
) -> None:
    callbacks = [status("", seq, value, "17" if value == "completed" else "") for seq, value in enumerate(progression)]
    shuffled = data.draw(st.permutations(callbacks))
    duplicates = data.draw(st.lists(st.sampled_from(callbacks), max_size=4))
    positions = data.draw(st.lists(st.integers(0, len(shuffled)), min_size=len(duplicates), max_size=len(duplicates)))
    delivered = list(shuffled)
    for position, duplicate in zip(positions, duplicates, strict=True):
        delivered.insert(position, duplicate)

    ordered_sid, shuffled_sid = f"CA{uuid.uuid4().hex}", f"CA{uuid.uuid4().hex}"
    for callback in callbacks:
        store.record_status({**callback, "CallSid": ordered_sid})
    for callback in delivered:
        store.record_status({**callback, "CallSid": shuffled_sid})
    ordered, shuffled_item = store.get_call(ordered_sid), store.get_call(shuffled_sid)
    assert ordered is not None and shuffled_item is not None
    ordered.pop("CallSid"), shuffled_item.pop("CallSid")
    assert shuffled_item == ordered
    terminal = [v for v in progression if v in {"completed", "busy", "failed", "no-answer", "canceled"}]
    assert ordered["status"] == (terminal[0] if terminal else progression[-1])


def test_a_stalled_dynamodb_gives_up_after_two_short_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener that accepts and never answers: the write fails (the webhook then answers anyway),
    after two attempts, instead of botocore's 60 s reads retried."""
    import socket

    import botocore.exceptions
    from botocore.config import Config

    from core.store import CALL_TIMEOUTS, dynamodb_client

    stall = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", f"http://127.0.0.1:{stall.getsockname()[1]}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "t")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "t")
    quick = CALL_TIMEOUTS.merge(Config(read_timeout=0.2))  # the same attempts, a shorter wait
    store = CallStore(dynamodb_client(quick), "calls")
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        store.record_call({"CallSid": "CA" + "5" * 32, "From": "+1", "To": "+2"})
    stall.settimeout(0)
    attempts = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            stall.accept()[0].close()
            attempts += 1
    assert attempts == 2
    stall.close()


def test_the_call_timeouts_fit_inside_the_webhooks_lambda_timeout() -> None:
    from pathlib import Path

    from samtranslator.yaml_helper import yaml_parse

    from core.store import CALL_TIMEOUTS

    lambda_timeout_s = yaml_parse((Path(__file__).parents[2] / "template.yaml").read_text())["Globals"]["Function"][
        "Timeout"
    ]
    attempts = CALL_TIMEOUTS.retries["total_max_attempts"]
    worst_backoff_s = 2.0 * (attempts - 1)  # botocore's standard mode: at most 2 s before a second attempt
    worst_s = attempts * (CALL_TIMEOUTS.connect_timeout + CALL_TIMEOUTS.read_timeout) + worst_backoff_s
    assert worst_s < lambda_timeout_s - 1  # a second left to answer with TwiML
