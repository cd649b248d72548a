"""The conversation engine (DESIGN.md section 2): sans-I/O turn-taking for one call.

`machines` declares every state machine as a table, `playback` keeps the ledger of what the caller
heard of a reply, `rules` builds the rules from the settings once, and `conversation` decides when
each machine moves and which actions follow.
"""

from core.engine.conversation import Conversation
from core.engine.machines import (
    AGENT_TRANSITIONS,
    CALLER_TRANSITIONS,
    AgentState,
    CallerState,
    CallPhase,
    ConversationError,
)
from core.engine.rules import TurnRules

__all__ = [
    "AGENT_TRANSITIONS",
    "CALLER_TRANSITIONS",
    "AgentState",
    "CallPhase",
    "CallerState",
    "Conversation",
    "ConversationError",
    "TurnRules",
]
