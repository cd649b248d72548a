"""What a call leaves behind, typed: the chat history the model sees, and the records the store keeps.

The engine writes these and the store reads them; neither side guesses at the other's dict keys.
They are vendor-neutral: `core.providers.openai` turns `ChatMessage` into OpenAI's wire form, and
`core.store` turns `CallSummary` into DynamoDB attributes.

A history may carry tool calls and their results (DESIGN.md section 2b): an assistant message with
`tool_calls`, each answered by a `Role.TOOL` message with the same `tool_call_id`, as OpenAI requires.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model made: `arguments` is the JSON text exactly as the model wrote it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # on a Role.TOOL message: the call it answers


class Speaker(enum.StrEnum):
    CALLER = "caller"
    AGENT = "agent"


class ReplyKind(enum.StrEnum):
    GREETING = "greeting"
    ANSWER = "answer"
    APOLOGY = "apology"
    GOODBYE = "goodbye"
    REPROMPT = "reprompt"


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A tool the agent used in a turn, for the call's record: what it asked and what came back."""

    name: str
    arguments: str
    result: str
    call_id: str = ""


@dataclass(frozen=True, slots=True)
class SavedConversation:
    """What a call's next stream needs to go on where the last one stopped (DESIGN.md section 2b): the
    history as the caller heard it, tool calls and results included, and the call's time so far."""

    history: tuple[ChatMessage, ...]
    elapsed_ms: int

    def as_item(self) -> dict[str, Any]:
        messages = []
        for message in self.history:
            entry: dict[str, Any] = {"role": message.role.value, "content": message.content}
            if message.tool_calls:
                entry["tool_calls"] = [
                    {"id": call.id, "name": call.name, "arguments": call.arguments} for call in message.tool_calls
                ]
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            messages.append(entry)
        return {"messages": messages, "elapsed_ms": self.elapsed_ms}

    @classmethod
    def from_item(cls, item: Any) -> SavedConversation:
        """The saved form back; raises ValueError (naming what is wrong) for anything else."""
        try:
            history = tuple(
                ChatMessage(
                    Role(entry["role"]),
                    str(entry.get("content", "")),
                    tuple(ToolCall(c["id"], c["name"], c["arguments"]) for c in entry.get("tool_calls", ())),
                    entry.get("tool_call_id"),
                )
                for entry in item["messages"]
            )
            return cls(history, int(item.get("elapsed_ms", 0)))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"the saved conversation is malformed: {error!r}") from None


@dataclass(frozen=True, slots=True)
class NextStep:
    """What the call does when the agent closes its stream: the item's `next` (DESIGN.md section 3)."""

    action: Literal["hangup", "transfer"]
    destination: str | None = None  # a TRANSFER_DESTINATIONS name; the number is resolved from it
    number: str | None = None
    summary: str | None = None

    def as_item(self) -> dict[str, Any]:
        item: dict[str, Any] = {"action": self.action}
        if self.action == "transfer":
            item.update(destination=self.destination, number=self.number, summary=self.summary or "")
        return item


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """One turn as it happened. An agent turn's `text` is what the caller heard, `full_text` what was
    written; `at_ms` is the audio-clock time of the end of the caller's speech or of the agent's first
    audio (None when it never played)."""

    speaker: Speaker
    text: str
    at_ms: int | None
    reply_id: str | None = None
    kind: ReplyKind | None = None
    full_text: str | None = None
    interrupted: bool = False
    reply_latency_ms: int | None = None
    tools: tuple[ToolUse, ...] = ()


@dataclass(frozen=True, slots=True)
class CallSummary:
    """The media service's record of a call at its end (DESIGN.md section 2, rule 10)."""

    turns: tuple[TurnRecord, ...]
    end_reason: str | None
    duration_ms: int
    reply_latency_ms: tuple[int, ...] = ()
    barge_in_ms: tuple[int, ...] = ()
    provider_failures: tuple[str, ...] = field(default=())
    false_barge_ins: int = 0  # stops that were a cough, a click or an "mm-hm", and resumed (rule 4)
    outcome: str | None = None  # how the agent ended the call, when it did (DESIGN.md section 2b)
    history: tuple[ChatMessage, ...] = ()  # the conversation as the model knows it, tool calls included

    @property
    def turn_count(self) -> int:
        return sum(1 for turn in self.turns if turn.speaker is Speaker.CALLER)

    @property
    def interruptions(self) -> int:
        return sum(1 for turn in self.turns if turn.interrupted)

    @property
    def transcript(self) -> str:
        """One line per turn as heard, `Agent:` / `Caller:`, interrupted replies marked; the tools the
        agent used, and how it ended the call, on lines of their own."""
        lines: list[str] = []
        for turn in self.turns:
            lines.extend(f"  [tool {use.name}({use.arguments}) -> {use.result}]" for use in turn.tools)
            if turn.text:
                speaker = "Agent" if turn.speaker is Speaker.AGENT else "Caller"
                lines.append(f"{speaker}: {turn.text}" + (" [interrupted]" if turn.interrupted else ""))
        if self.outcome:
            lines.append(f"  [the agent ended the call: {self.outcome}]")
        return "\n".join(lines)
