"""The rules of DESIGN.md section 2 in the engine's units, built once from the settings.

Defaults live in one place, `core.config.ConversationSettings`; `TurnRules` has none of its own for
anything a team can set, so the two cannot drift. The few fields below with defaults are the
engine's own constants, not settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

from core.audio import EchoConfig, VadConfig
from core.config import ConversationSettings
from core.tools import ToolSpec, builtin_tools


@dataclasses.dataclass(frozen=True)
class TurnRules:
    silence_threshold_ms: int
    barge_in_min_speech_ms: int
    speculate_after_ms: int
    greeting: str
    system_prompt: str
    vad: VadConfig
    barge_in_confirm_ms: int
    resume_window_ms: int
    backchannel_words: frozenset[str]
    goodbye: str
    idle_reprompt: str
    idle_reprompt_ms: int
    idle_max_reprompts: int
    max_call_ms: int
    transfer_destinations: dict[str, str]
    tools: tuple[ToolSpec, ...]  # offered to the model: the built-ins, then the team's HTTP tools
    tool_filler_ms: int
    resume_line: str
    echo: EchoConfig = dataclasses.field(default_factory=EchoConfig)
    apology: str = "Sorry, I'm having trouble answering right now. Could you say that again?"
    # Said before the agent ends a call whose speech-to-text failed for good: it can no longer hear.
    cannot_hear_goodbye: str = (
        "Sorry, I can't hear you any more because of a technical problem. Please call back. Goodbye."
    )
    # The same, when TRANSFER_DESTINATIONS has a `fallback`: a person takes the call over.
    cannot_hear_transfer: str = (
        "Sorry, I can't hear you any more because of a technical problem. Let me put you through to a colleague."
    )
    # Deepgram's word times and the detector's onset disagree by a few tens of ms.
    word_slack_ms: int = 120
    # A stop consonant's closure ("ac-t-ually") is a quiet frame inside speech: one such frame does
    # not break the barge-in count. A short "mm-hm" followed by silence still never reaches it.
    barge_in_gap_ms: int = 20
    llm_attempts: int = 2
    # Said when a tool is slow (TOOL_FILLER_MS), and before a transfer the model did not announce.
    tool_filler: str = "One moment."
    transfer_line: str = "Let me put you through now."
    # A model that keeps calling tools is stopped after this many rounds in one reply.
    max_tool_rounds: int = 4
    # How long speculation waits for Deepgram's answer to `Finalize`, which "is not guaranteed if there
    # is no significant amount of audio data" (its documentation); an answer usually takes ~100 ms.
    finalize_wait_ms: int = 150

    @classmethod
    def from_settings(cls, settings: ConversationSettings) -> Self:
        return cls(
            silence_threshold_ms=round(settings.silence_threshold * 1000),
            barge_in_min_speech_ms=settings.barge_in_min_speech_ms,
            speculate_after_ms=settings.speculate_after_ms,
            greeting=settings.greeting,
            system_prompt=settings.system_prompt,
            vad=VadConfig(
                margin_db=settings.vad_margin_db,
                min_level_dbfs=settings.vad_min_level_dbfs,
                min_speech_ms=settings.vad_min_speech_ms,
            ),
            barge_in_confirm_ms=settings.barge_in_confirm_ms,
            resume_window_ms=settings.resume_window_ms,
            backchannel_words=frozenset(settings.backchannel_words),
            goodbye=settings.goodbye,
            idle_reprompt=settings.idle_reprompt,
            idle_reprompt_ms=round(settings.idle_reprompt_seconds * 1000),
            idle_max_reprompts=settings.idle_max_reprompts,
            max_call_ms=round(settings.max_call_seconds * 1000),
            transfer_destinations=dict(settings.transfer_destinations),
            tools=(*builtin_tools(settings.transfer_destinations), *settings.tools),
            tool_filler_ms=settings.tool_filler_ms,
            resume_line=settings.resume_line,
        )

    @classmethod
    def defaults(cls, **changes: Any) -> Self:
        """The rules a deployment with no settings gets, with `changes` (tests, the stateful model)."""
        return dataclasses.replace(cls.from_settings(ConversationSettings.from_env({})), **changes)
