"""The books of every call: one DynamoDB item per call, keyed by `CallSid`, expiring by `expires_at`.

The webhook writes the item when the call arrives and as its status and stream change; the media
service completes it at the end of the call. Twilio retries webhooks and delivers status callbacks
late, twice or out of order, so every write is idempotent and order-free:

* what the webhook learns first (numbers, direction, creation time) is written `if_not_exists`, so
  a retried `/voice` changes nothing and the media service never overwrites it;
* each status or stream event is added to a string set (`status_log`, `stream_log`): adding the same
  event twice is a no-op, and a set has no order to get wrong;
* the current status is a conditional write that converges whatever the arrival order: a terminal
  status (completed, busy, failed, no-answer, canceled) beats any non-terminal one, the earliest
  terminal one wins, and otherwise the highest `SequenceNumber` wins. That is what applying the
  callbacks in order, with final states final, would give.

DynamoDB deletes expired items up to days late, so reads drop items whose `expires_at` has passed.
The low-level client is used rather than `boto3.resource`: it costs ~10 ms to create instead of
~450 ms, which matters to a Lambda's cold start.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import boto3
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.config import Config
from botocore.exceptions import ClientError

from core.records import CallSummary, NextStep, SavedConversation, Speaker, TurnRecord

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

_PLACEHOLDER = re.compile(r":\w+")
TERMINAL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


# A call cannot wait for botocore's defaults (60 s to connect, 60 s to read, each retried): the webhook's
# Lambda has 10 s and Twilio waits 15 s for TwiML, and the media service's `next` write is the caller's
# silence before a hang-up or transfer. Two attempts of at most 1 s to connect and 2 s to read, with
# standard-mode backoff between them (at most 2 s before the second), end within 8 s; `/voice` answers
# with its TwiML whether or not its write went through.
CALL_TIMEOUTS = Config(
    connect_timeout=1.0,
    read_timeout=2.0,
    retries={"mode": "standard", "total_max_attempts": 2},
    tcp_keepalive=True,
)


def dynamodb_client(config: Config = CALL_TIMEOUTS) -> DynamoDBClient:
    """The DynamoDB client both processes use (`AWS_ENDPOINT_URL_DYNAMODB` points it at a local one)."""
    return boto3.client("dynamodb", config=config)


class StoreError(Exception):
    """A write to the calls table failed for a reason other than a lost (harmless) race."""


def _dynamo(value: Any) -> Any:
    """Python values into what TypeSerializer accepts (floats as Decimal, recursively)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return Decimal(str(round(value, 3)))
    if isinstance(value, Mapping):
        return {str(k): _dynamo(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_dynamo(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """DynamoDB values back into plain Python (Decimal as int or float, sets as sorted lists)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(_plain(v) for v in value)
    return value


class CallStore:
    def __init__(
        self,
        client: DynamoDBClient,
        table: str,
        *,
        ttl_days: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self._table = table
        self._ttl_seconds = int(ttl_days * 86400)
        self._clock = clock

    # -- writes ---------------------------------------------------------------------------------------

    def _update(
        self,
        call_sid: str,
        expression: str,
        values: Mapping[str, Any],
        names: Mapping[str, str] | None = None,
        condition: str | None = None,
    ) -> bool:
        """One UpdateItem; False when its condition did not hold (a lost race, not an error)."""
        now = self._clock()
        base_values = {":now": int(now), ":expires": int(now) + self._ttl_seconds}
        used = set(_PLACEHOLDER.findall(expression + " " + (condition or "")))
        request: dict[str, Any] = {
            "TableName": self._table,
            "Key": {"CallSid": {"S": call_sid}},
            "UpdateExpression": expression,
        }
        # DynamoDB rejects values the expressions do not use, and an empty map of them.
        used_values = {k: _serializer.serialize(_dynamo(v)) for k, v in {**base_values, **values}.items() if k in used}
        if used_values:
            request["ExpressionAttributeValues"] = used_values
        if names:
            request["ExpressionAttributeNames"] = dict(names)
        if condition:
            request["ConditionExpression"] = condition
        try:
            self.client.update_item(**request)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise StoreError(f"calls table {self._table}: update of {call_sid} failed: {error}") from error
        return True

    _CREATED = "created_at = if_not_exists(created_at, :now), expires_at = if_not_exists(expires_at, :expires)"

    def record_call(self, params: Mapping[str, str]) -> None:
        """The incoming-call webhook: who called whom. Written once; a retry changes nothing."""
        fields = {
            "account_sid": params.get("AccountSid"),
            "from_number": params.get("From"),
            "to_number": params.get("To"),
            "direction": params.get("Direction"),
            "caller_name": params.get("CallerName"),
            "forwarded_from": params.get("ForwardedFrom"),
            "parent_call_sid": params.get("ParentCallSid"),
        }
        present = {name: value for name, value in fields.items() if value}
        sets = [f"{name} = if_not_exists({name}, :{name})" for name in present]
        initial_status = params.get("CallStatus", "ringing")
        sets.append("#status = if_not_exists(#status, :initial_status)")
        expression = "SET " + ", ".join([self._CREATED, *sets])
        self._update(
            params["CallSid"],
            expression,
            {**{f":{k}": v for k, v in present.items()}, ":initial_status": initial_status},
            names={"#status": "status"},
        )

    def record_status(self, params: Mapping[str, str]) -> None:
        """A call status callback, in any order and any number of times."""
        call_sid = params["CallSid"]
        status = params["CallStatus"]
        sequence = int(params.get("SequenceNumber", "0") or 0)
        terminal = status in TERMINAL_STATUSES
        entry = "|".join([f"{sequence:06d}", status, params.get("Timestamp", ""), params.get("CallDuration", "")])
        always = f"SET {self._CREATED}"
        values: dict[str, Any] = {":entry": {entry}, ":status": status, ":seq": sequence, ":terminal": terminal}
        if params.get("CallDuration", "").isdigit():
            always += ", call_duration = :duration"
            values[":duration"] = int(params["CallDuration"])
        condition = (
            "attribute_not_exists(status_seq) OR status_terminal = :false OR status_seq > :seq"
            if terminal
            else "attribute_not_exists(status_seq) OR (status_terminal = :false AND status_seq < :seq)"
        )
        values[":false"] = False
        applied = self._update(
            call_sid,
            f"{always}, #status = :status, status_seq = :seq, status_terminal = :terminal ADD status_log :entry",
            values,
            names={"#status": "status"},
            condition=condition,
        )
        if not applied:  # an older or superseded status: keep it in the log only
            self._update(call_sid, f"{always} ADD status_log :entry", values)

    def record_stream_event(self, params: Mapping[str, str]) -> None:
        """A Media Streams status callback (stream-started, stream-stopped, stream-error)."""
        event = params.get("StreamEvent", "unknown")
        entry = "|".join(
            [params.get("Timestamp", ""), event, params.get("StreamSid", ""), params.get("StreamError", "")]
        )
        expression = f"SET {self._CREATED}"
        values: dict[str, Any] = {":entry": {entry}}
        if params.get("StreamSid"):
            expression += ", stream_sid = if_not_exists(stream_sid, :stream_sid)"
            values[":stream_sid"] = params["StreamSid"]
        self._update(params["CallSid"], f"{expression} ADD stream_log :entry", values)

    def set_next(self, call_sid: str, next_step: NextStep, stream_sid: str) -> bool:
        """What the call does when the agent's stream closes (DESIGN.md section 2b). Written only if no
        step is waiting to be acted on; False when one is (it is kept: the webhook clears it when acting)."""
        item = {**next_step.as_item(), "stream_sid": stream_sid}
        return self._update(
            call_sid,
            f"SET {self._CREATED}, #next = :next",
            {":next": item},
            names={"#next": "next"},
            condition="attribute_not_exists(#next)",
        )

    def save_conversation(self, call_sid: str, conversation: SavedConversation) -> None:
        """The restorable conversation (DESIGN.md section 2b), replaced whole each time."""
        self._update(
            call_sid, f"SET {self._CREATED}, conversation = :conversation", {":conversation": conversation.as_item()}
        )

    def load_conversation(self, call_sid: str) -> SavedConversation | None:
        """The conversation a call's earlier streams saved, if any (raises ValueError if it is malformed)."""
        item = self.get_call(call_sid)
        saved = item.get("conversation") if item is not None else None
        return SavedConversation.from_item(saved) if saved is not None else None

    def take_next(self, call_sid: str) -> tuple[bool, dict[str, Any] | None]:
        """Whether the call has an item, and the `next` step it held, which is removed in the same
        request (one strongly consistent write instead of a read and a write: the time between the
        agent's last words and Twilio's next verb is the caller's silence)."""
        try:
            response = self.client.update_item(
                TableName=self._table,
                Key={"CallSid": {"S": call_sid}},
                UpdateExpression="REMOVE #next",
                ConditionExpression="attribute_exists(CallSid)",
                ExpressionAttributeNames={"#next": "next"},
                ReturnValues="ALL_OLD",
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False, None
            raise StoreError(
                f"calls table {self._table}: taking the next step of {call_sid} failed: {error}"
            ) from error
        old = response.get("Attributes", {})
        expires_at = old.get("expires_at")
        if expires_at is not None and int(_deserializer.deserialize(expires_at)) <= self._clock():
            return False, None
        raw_next = old.get("next")
        return True, _plain(_deserializer.deserialize(raw_next)) if raw_next is not None else None

    def count_stream_resume(self, call_sid: str, limit: int) -> bool:
        """One more reconnection of a lost stream, if fewer than `limit` were made; False otherwise."""
        return self._update(
            call_sid,
            "ADD stream_resumes :one",
            {":one": 1, ":limit": limit},
            condition="attribute_not_exists(stream_resumes) OR stream_resumes < :limit",
        )

    def record_transfer(self, call_sid: str, fields: Mapping[str, Any], *, new: bool = False) -> None:
        """The transfer being dialled (`new`: destination, number, summary), or what became of it (merged in)."""
        whole = {"#transfer": "transfer"}
        if new:
            self._update(call_sid, f"SET {self._CREATED}, #transfer = :transfer", {":transfer": dict(fields)}, whole)
            return
        sets, values, names = [], {}, {}
        for index, (name, value) in enumerate(fields.items()):
            names[f"#f{index}"] = name
            values[f":f{index}"] = value
            sets.append(f"#transfer.#f{index} = :f{index}")
        names["#transfer"] = "transfer"
        if not self._update(call_sid, "SET " + ", ".join(sets), values, names, "attribute_exists(#transfer)"):
            self._update(call_sid, f"SET {self._CREATED}, #transfer = :transfer", {":transfer": dict(fields)}, whole)

    def set_outcome(self, call_sid: str, outcome: str) -> None:
        self._update(call_sid, f"SET {self._CREATED}, outcome = :outcome", {":outcome": outcome})

    def complete_call(self, call_sid: str, summary: CallSummary, parameters: Mapping[str, str] | None = None) -> None:
        """The media service's record at call end; creates the item if the webhook's is missing."""
        values: dict[str, Any] = {
            ":transcript": summary.transcript,
            ":turns": [_turn_item(turn) for turn in summary.turns],
            ":turn_count": summary.turn_count,
            ":latency": {"reply_ms": list(summary.reply_latency_ms), "barge_in_ms": list(summary.barge_in_ms)},
            ":interruptions": summary.interruptions,
            ":false_barge_ins": summary.false_barge_ins,
            ":end_reason": summary.end_reason or "unknown",
            ":media_duration_ms": summary.duration_ms,
        }
        sets = [
            self._CREATED,
            "transcript = :transcript",
            "turns = :turns",
            "turn_count = :turn_count",
            "latency = :latency",
            "interruptions = :interruptions",
            "false_barge_ins = :false_barge_ins",
            "end_reason = :end_reason",
            "media_duration_ms = :media_duration_ms",
            "media_completed_at = :now",
        ]
        if summary.provider_failures:
            sets.append("provider_failures = :provider_failures")
            values[":provider_failures"] = list(summary.provider_failures)
        if summary.outcome:
            sets.append("outcome = :outcome")
            values[":outcome"] = summary.outcome
        for name, key in (("from_number", "From"), ("to_number", "To"), ("stream_sid", "StreamSid")):
            if parameters and parameters.get(key):
                sets.append(f"{name} = if_not_exists({name}, :{name})")
                values[f":{name}"] = parameters[key]
        self._update(call_sid, "SET " + ", ".join(sets), values)

    # -- reads ----------------------------------------------------------------------------------------

    def get_call(self, call_sid: str) -> dict[str, Any] | None:
        """The call's item as plain Python, or None if there is none or it has expired."""
        response = self.client.get_item(TableName=self._table, Key={"CallSid": {"S": call_sid}}, ConsistentRead=True)
        raw = response.get("Item")
        if raw is None:
            return None
        item = {k: _plain(_deserializer.deserialize(v)) for k, v in raw.items()}
        expires_at = item.get("expires_at")
        if isinstance(expires_at, int) and expires_at <= self._clock():
            return None
        return item

    @staticmethod
    def status_history(item: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The status log of an item in `SequenceNumber` order."""
        history = []
        for entry in sorted(item.get("status_log", [])):
            sequence, status, timestamp, duration = entry.split("|", 3)
            history.append({"sequence": int(sequence), "status": status, "timestamp": timestamp, "duration": duration})
        return history


def _turn_item(turn: TurnRecord) -> dict[str, Any]:
    """A turn as the item keeps it: its fields by name, the ones that do not apply left out."""
    item: dict[str, Any] = {"role": turn.speaker.value, "text": turn.text}
    for name in ("at_ms", "reply_id", "full_text", "reply_latency_ms"):
        value = getattr(turn, name)
        if value is not None:
            item[name] = value
    if turn.speaker is Speaker.AGENT:
        item["kind"] = turn.kind.value if turn.kind is not None else None
        item["interrupted"] = turn.interrupted
    if turn.tools:
        item["tools"] = [{"name": use.name, "arguments": use.arguments, "result": use.result} for use in turn.tools]
    return item


def create_table(client: DynamoDBClient, table: str) -> None:
    """Create the calls table as template.yaml declares it (tests and the local demo)."""
    client.create_table(
        TableName=table,
        AttributeDefinitions=[{"AttributeName": "CallSid", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "CallSid", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    client.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    try:
        client.update_time_to_live(
            TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"}
        )
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "UnknownOperationException":  # dynalite has no TTL
            raise
