"""The agent acting on the call (DESIGN.md section 2 rules 10-12 and the call phase, section 2b): tools,
hang-up, transfer, the idle caller and the longest call, as engine scenarios on the audio clock."""

from __future__ import annotations

import json

from core.engine import CallPhase, TurnRules
from core.engine.machines import AgentState
from core.events import (
    CallStarted,
    CancelLlm,
    ClearPlayback,
    EndCall,
    FinishTts,
    PlaceMark,
    ProviderFailed,
    ProviderRole,
    SaveConversation,
    SendTtsText,
    StartLlm,
    ToolAnswered,
)
from core.records import ChatMessage, NextStep, ReplyKind, Role, SavedConversation, ToolCall
from core.tools import ToolSpec, builtin_tools
from tests.core.test_engine import MS_PER_CHAR, Call, caller_turn

END = ToolCall("call_end", "end_call", '{"reason": "the caller is done"}')
LOOKUP = ToolCall("call_lookup", "lookup_order", '{"order": "42"}')
LOOKUP_TOOL = ToolSpec(
    "lookup_order",
    "Find an order",
    {"type": "object", "properties": {"order": {"type": "string"}}},
    url="http://tools.invalid/lookup",
)
DESTINATIONS = {"support": "+15551230000"}


def with_tools(**changes: object) -> dict[str, object]:
    destinations = changes.pop("transfer_destinations", DESTINATIONS)
    assert isinstance(destinations, dict)
    return {
        "transfer_destinations": destinations,
        "tools": (*builtin_tools(destinations), LOOKUP_TOOL),
        **changes,
    }


def transfer(destination: str, summary: str = "wants a refund") -> ToolCall:
    return ToolCall("call_transfer", "transfer_call", json.dumps({"destination": destination, "summary": summary}))


def play_time(text: str) -> int:
    return len(text) * MS_PER_CHAR


def tool_messages(history: list[ChatMessage]) -> list[tuple[Role, str]]:
    return [(m.role, m.content) for m in history if m.tool_calls or m.role is Role.TOOL]


# -- end_call: the goodbye is heard whole, then `next` ---------------------------------------------------


def test_end_call_ends_the_call_only_when_the_goodbye_s_last_mark_is_played() -> None:
    goodbye = "Thanks for calling, goodbye!"
    call = Call(model=[(goodbye, (END,))], **with_tools())
    call.silence(500)
    caller_turn(call, "that's all, thanks")  # speech ends at 1300; 100 ms later, its words
    call.silence(1900)  # the threshold, at 3300: the held goodbye goes out
    assert call.engine.phase.state is CallPhase.CLOSING
    assert call.engine.agent_state is AgentState.SPEAKING
    call.silence(play_time(goodbye) - 100)
    assert call.actions(EndCall) == []  # still playing: nothing happens to the call yet
    call.silence(200)
    assert call.actions(EndCall) == [EndCall("completed_by_agent", NextStep("hangup"))]
    at, _ = call.step_with(EndCall)
    last_mark = call.actions(PlaceMark)[-1].name
    assert last_mark.startswith("r1.") and at >= 500 + 800 + 2000 + play_time(goodbye)
    assert tool_messages(call.engine.history) == [
        (Role.ASSISTANT, goodbye),
        (Role.TOOL, '{"ok": true, "note": "the call ends after your goodbye"}'),
    ]
    assert call.engine.summary().outcome == "completed_by_agent"


def test_end_call_with_no_words_of_the_model_says_the_configured_goodbye() -> None:
    call = Call(model=[("", (END,))], goodbye="Bye now!", **with_tools())
    call.silence(500)
    caller_turn(call, "bye")
    call.silence(2000 + play_time("Bye now!") + 100)
    assert [a.text for a in call.actions(SendTtsText)] == ["Bye now!"]
    assert call.actions(EndCall) == [EndCall("completed_by_agent", NextStep("hangup"))]


def test_a_caller_who_really_interrupts_the_goodbye_calls_the_hang_up_off() -> None:
    call = Call(model=[("Goodbye then, have a nice day!", (END,)), ("Of course, what else?", ())], **with_tools())
    call.silence(500)
    caller_turn(call, "ok thanks")
    call.silence(2000 + 500)  # half a second into the goodbye
    start = call.now
    call.speak(300)
    call.words("wait one more thing", start, start + 300)
    assert call.engine.phase.state is CallPhase.CONVERSING
    call.silence(2000 + play_time("Of course, what else?") + 100)
    assert call.actions(EndCall) == []
    assert call.committed_prompts()[-1] == "wait one more thing"
    tool_result = next(m for m in call.engine.history if m.role is Role.TOOL)
    assert "interrupted" in tool_result.content  # the model knows the call did not end
    assert call.engine.summary().outcome is None


def test_a_cough_during_the_goodbye_resumes_it_and_the_call_still_ends_after_it() -> None:
    goodbye = "Goodbye then, have a nice day!"
    call = Call(model=[(goodbye, (END,))], **with_tools())
    call.silence(500)
    caller_turn(call, "ok thanks")
    call.silence(2000 + 500)
    call.speak(300)  # a cough: no words
    call.silence(1200)  # the resume window passes: the goodbye goes on from the word being heard
    assert call.engine.phase.state is CallPhase.CLOSING and call.actions(EndCall) == []
    call.silence(play_time(goodbye))
    assert call.actions(EndCall) == [EndCall("completed_by_agent", NextStep("hangup"))]


# -- transfer_call ------------------------------------------------------------------------------------


def test_a_transfer_is_announced_then_the_stream_closes_with_the_destination_s_number() -> None:
    call = Call(model=[("", (transfer("support"),))], **with_tools())
    call.silence(500)
    caller_turn(call, "I want a person")
    line = TurnRules.defaults().transfer_line
    call.silence(2000 + play_time(line) - 100)
    assert call.actions(EndCall) == []
    call.silence(200)
    assert call.actions(EndCall) == [
        EndCall("transferred", NextStep("transfer", "support", "+15551230000", "wants a refund"))
    ]
    assert [a.text for a in call.actions(SendTtsText)] == [line]


def test_an_unknown_destination_is_an_error_result_and_never_a_dial() -> None:
    call = Call(
        model=[("", (transfer("sales"),)), ("Sorry, I can only put you through to support.", ())], **with_tools()
    )
    call.silence(500)
    caller_turn(call, "put me through to sales")
    call.silence(2000 + 3000)
    assert call.actions(EndCall) == [] and call.engine.phase.state is CallPhase.CONVERSING
    second = call.actions(StartLlm)[1]  # the same reply's next round, with the error
    assert second.reply_id == "r1"
    error = second.messages[-1]
    assert error.role is Role.TOOL and "no destination named 'sales'" in error.content
    assert call.engine.history[-1] == ChatMessage(Role.ASSISTANT, "Sorry, I can only put you through to support.")


def test_transfer_is_not_offered_without_destinations() -> None:
    names = [tool.name for tool in builtin_tools({})]
    assert names == ["end_call"]
    call = Call(model=[("", (transfer("support"),)), ("I can't transfer calls.", ())], transfer_destinations={})
    call.silence(500)
    caller_turn(call, "a person please")
    call.silence(4000)
    assert call.actions(EndCall) == []


# -- HTTP tools ----------------------------------------------------------------------------------------


def test_an_http_tool_s_answer_goes_back_to_the_model_in_the_same_reply() -> None:
    call = Call(model=[("Let me check.", (LOOKUP,)), ("It ships on Tuesday.", ())], **with_tools())
    call.silence(500)
    caller_turn(call, "where is my order")
    call.silence(2000)
    assert call.tool_runs == [LOOKUP]
    call.silence(200)
    call.feed(ToolAnswered(call.now, LOOKUP.id, '{"ships": "Tuesday"}'))
    continuation = call.actions(StartLlm)[-1]
    assert continuation.reply_id == "r1"
    assert [(m.role, m.content) for m in continuation.messages[-3:]] == [
        (Role.USER, "where is my order"),
        (Role.ASSISTANT, "Let me check."),
        (Role.TOOL, '{"ships": "Tuesday"}'),
    ]
    assert continuation.messages[-2].tool_calls == (LOOKUP,)
    call.silence(3000)
    assert call.engine.agent_state is AgentState.IDLE
    assert [(m.role, m.content) for m in call.engine.history] == [
        (Role.USER, "where is my order"),
        (Role.ASSISTANT, "Let me check."),
        (Role.TOOL, '{"ships": "Tuesday"}'),
        (Role.ASSISTANT, "It ships on Tuesday."),
    ]
    [turn] = [t for t in call.engine.summary().turns if t.tools]
    assert turn.text == "Let me check. It ships on Tuesday." and turn.tools[0].result == '{"ships": "Tuesday"}'


def test_a_slow_tool_gets_a_filler_once_nothing_plays() -> None:
    call = Call(model=[("", (LOOKUP,)), ("It ships on Tuesday.", ())], tool_filler_ms=1000, **with_tools())
    call.silence(500)
    caller_turn(call, "where is my order")
    call.silence(1900)  # released at the threshold: the model said nothing and asked for the tool
    asked = call.now
    call.silence(980)
    assert call.actions(SendTtsText) == []
    call.silence(40)
    [filler] = call.actions(SendTtsText)
    assert filler.text == "One moment." and call.step_with(SendTtsText)[0] - asked in (1000, 1020)
    call.silence(2000)
    call.feed(ToolAnswered(call.now, LOOKUP.id, '{"ships": "Tuesday"}'))
    call.silence(2000)
    assert call.engine.history[-1] == ChatMessage(Role.ASSISTANT, "One moment. It ships on Tuesday.")


def test_a_tool_answer_arriving_after_a_barge_in_still_enters_the_history() -> None:
    call = Call(model=[("Let me look that up for you.", (LOOKUP,)), ("Friday works.", ())], **with_tools())
    call.silence(500)
    caller_turn(call, "where is my order")
    call.silence(2000 + 500)  # "Let me look that up" is playing, the tool is running
    start = call.now
    call.speak(300)
    call.words("actually change my address", start, start + 300)  # confirmed: the reply is given up
    assert call.engine.agent_state is not AgentState.SPEAKING
    tool = next(m for m in call.engine.history if m.role is Role.TOOL)
    assert "pending" in tool.content  # the call is answered in the history, as OpenAI requires
    call.feed(ToolAnswered(call.now, LOOKUP.id, '{"ships": "Tuesday"}'))
    tool = next(m for m in call.engine.history if m.role is Role.TOOL)
    assert tool.content == '{"ships": "Tuesday"}' and tool.tool_call_id == LOOKUP.id
    call.silence(2500)  # the interruption's turn is answered, with the tool's answer in its history
    last = call.actions(StartLlm)[-1]
    assert any(m.role is Role.TOOL and m.content == '{"ships": "Tuesday"}' for m in last.messages)
    assert last.messages[-1] == ChatMessage(Role.USER, "actually change my address")


def test_tools_asked_for_by_a_held_reply_run_only_once_it_is_released() -> None:
    call = Call(model=[("", (LOOKUP,)), ("", (LOOKUP,))], **with_tools())
    call.silence(500)
    caller_turn(call, "where is")
    call.silence(600)  # speculating: the held reply asked for the tool
    assert call.tool_runs == []
    caller_turn(call, "my order")  # the caller went on: the speculation is dropped, nothing ran
    assert call.tool_runs == []
    call.silence(2000)
    assert len(call.tool_runs) == 1


def test_an_unknown_tool_is_an_error_result_and_the_reply_goes_on() -> None:
    bogus = ToolCall("call_x", "delete_everything", "{}")
    call = Call(model=[("", (bogus,)), ("I can't do that.", ())], **with_tools())
    call.silence(500)
    caller_turn(call, "delete everything")
    call.silence(2000 + 1000)
    assert call.tool_runs == []
    assert "no tool named 'delete_everything'" in call.actions(StartLlm)[-1].messages[-1].content
    call.silence(1000)
    assert call.engine.history[-1] == ChatMessage(Role.ASSISTANT, "I can't do that.")


# -- rule 11: the idle caller ----------------------------------------------------------------------------


def test_an_idle_caller_is_reprompted_then_the_agent_says_goodbye_and_hangs_up() -> None:
    call = Call(idle_reprompt_ms=8000, idle_max_reprompts=2, idle_reprompt="Still there?", goodbye="Bye!")
    reprompt_ms, goodbye_ms = play_time("Still there?"), play_time("Bye!")
    call.silence(8000 - 20)
    assert call.actions(SendTtsText) == []
    call.silence(40)
    assert [a.text for a in call.actions(SendTtsText)] == ["Still there?"]  # at 8 s on the audio clock
    call.silence(reprompt_ms + 8000)  # the second one, 8 s after the first was heard
    assert [a.text for a in call.actions(SendTtsText)] == ["Still there?", "Still there?"]
    second_at = call.step_with(SendTtsText)[0]
    assert second_at == 8000
    call.silence(reprompt_ms + 8000 + goodbye_ms + 100)
    assert [a.text for a in call.actions(SendTtsText)][-1] == "Bye!"
    assert call.actions(EndCall) == [EndCall("idle_hangup", NextStep("hangup"))]
    kinds = [t.kind for t in call.engine.summary().turns]
    assert kinds == [ReplyKind.REPROMPT, ReplyKind.REPROMPT, ReplyKind.GOODBYE]


def test_a_caller_who_answers_a_reprompt_starts_the_count_again() -> None:
    call = Call("Great.", idle_reprompt_ms=8000, idle_max_reprompts=1, idle_reprompt="Still there?")
    call.silence(8100 + play_time("Still there?"))
    caller_turn(call, "yes I am")
    call.silence(2000 + play_time("Great.") + 7000)
    assert call.actions(EndCall) == []  # not yet 8 s since the answer was heard
    call.silence(1200)
    assert [a.text for a in call.actions(SendTtsText)][-1] == "Still there?"  # reprompted, not hung up
    assert call.actions(EndCall) == []


# -- rule 12: the longest call ---------------------------------------------------------------------------


def test_the_cap_reached_mid_sentence_lets_that_sentence_finish_then_says_goodbye() -> None:
    call = Call(
        ["Sure, I can help with that. ", "What time would you"],
        llm_finishes=False,
        max_call_ms=4000,
        goodbye="Sorry, we must stop here. Goodbye!",
    )
    call.silence(500)
    caller_turn(call, "hello")  # speech 500..1300; the reply goes out at 3300
    call.silence(2000 + 700)  # the cap at 4000, 0.7 s into "Sure, I can help with that."
    step_at, step = call.step_with(CancelLlm)
    assert step_at == 4000 and FinishTts("r1", drop_unfinished=True) in step
    assert call.engine.phase.state is CallPhase.CLOSING and call.actions(EndCall) == []
    sentence_end = 3300 + play_time("Sure, I can help with that.")
    call.silence(sentence_end - call.now - 40)
    assert call.actions(ClearPlayback) == []  # the sentence is still being said
    call.silence(60)
    cleared_at = call.step_with(ClearPlayback)[0]
    assert sentence_end <= cleared_at <= sentence_end + 20  # the rest, already voiced, is dropped (a frame)
    assert call.engine.history[-1] == ChatMessage(Role.ASSISTANT, "Sure, I can help with that.")
    assert call.actions(SendTtsText)[-1].text == "Sorry, we must stop here. Goodbye!"
    call.silence(play_time("Sorry, we must stop here. Goodbye!") + 100)
    assert call.actions(EndCall) == [EndCall("max_duration", NextStep("hangup"))]
    call.speak(400)  # nothing the caller says changes the cap
    assert call.engine.phase.state is CallPhase.CLOSING


# -- section 6: a dead speech-to-text, with somewhere to transfer to -------------------------------------


def test_a_dead_speech_to_text_transfers_to_the_fallback_destination_when_there_is_one() -> None:
    call = Call(transfer_destinations={"fallback": "+15550001111"})
    call.silence(500)
    call.feed(ProviderFailed(call.now, ProviderRole.STT, "Deepgram refused the connection with HTTP 402"))
    line = TurnRules.defaults().cannot_hear_transfer
    call.silence(play_time(line) + 100)
    [end] = call.actions(EndCall)
    assert end.outcome == "provider_failure"
    assert (end.next.action, end.next.destination, end.next.number) == ("transfer", "fallback", "+15550001111")


# -- section 2b: the conversation survives its stream ---------------------------------------------------

SAVED = SavedConversation(
    (
        ChatMessage(Role.USER, "I'd like a table for four on Friday"),
        ChatMessage(Role.ASSISTANT, "", tool_calls=(LOOKUP,)),
        ChatMessage(Role.TOOL, '{"available": true}', tool_call_id=LOOKUP.id),
        ChatMessage(Role.ASSISTANT, "Friday at seven is free. Shall I book it?"),
    ),
    elapsed_ms=60_000,
)


def resumed(reason: str) -> CallStarted:
    return CallStarted(0, "CA1", "MZ2", {"resume": reason}, SAVED)


def test_every_committed_turn_saves_the_conversation() -> None:
    call = Call("Sure.")
    call.silence(500)
    caller_turn(call, "hello")
    call.silence(2000 + play_time("Sure.") + 100)
    saves = call.actions(SaveConversation)
    assert saves and saves[-1].conversation.history == (
        ChatMessage(Role.USER, "hello"),
        ChatMessage(Role.ASSISTANT, "Sure."),
    )
    assert len(saves) == 1  # once per change, not per event


def test_a_lost_stream_restores_the_conversation_and_the_agent_speaks_first() -> None:
    call = Call("Booked.", start=resumed("lost-stream"), resume_line="Sorry, I lost you. Where were we?")
    assert [a.text for a in call.actions(SendTtsText)] == ["Sorry, I lost you. Where were we?"]
    call.silence(play_time("Sorry, I lost you. Where were we?") + 100)
    caller_turn(call, "yes please book it")
    call.silence(2000)
    messages = call.actions(StartLlm)[-1].messages
    assert messages[1:4] == SAVED.history[:3]  # the whole conversation, tool call and result included
    # The agent's lines with no caller turn between are one message, as the model expects them.
    assert messages[4] == ChatMessage(Role.ASSISTANT, f"{SAVED.history[3].content} Sorry, I lost you. Where were we?")
    assert messages[-1] == ChatMessage(Role.USER, "yes please book it")


def test_back_from_a_transfer_nobody_answered_the_model_is_told_why_and_speaks_first() -> None:
    call = Call("Nobody picked up, sorry. Can I help?", start=resumed("transfer-failed:no-answer"))
    first = call.actions(StartLlm)[0]
    assert first.messages[1:5] == SAVED.history
    assert first.messages[-1].role is Role.SYSTEM and "no-answer" in first.messages[-1].content
    call.silence(play_time("Nobody picked up, sorry. Can I help?") + 100)
    assert call.engine.history[-1].content.endswith("Shall I book it? Nobody picked up, sorry. Can I help?")


def test_the_duration_cap_counts_the_call_s_earlier_streams() -> None:
    call = Call(start=resumed("lost-stream"), max_call_ms=61_000, goodbye="Goodbye!")
    call.silence(980)
    assert call.engine.phase.state is CallPhase.CONVERSING
    call.silence(40)  # 60 s before this stream + 1 s of it
    assert call.engine.phase.state is CallPhase.CLOSING


def test_the_next_round_follows_the_tool_results_even_after_a_filler() -> None:
    call = Call(model=[("", (LOOKUP,)), ("It ships on Tuesday.", ())], tool_filler_ms=500, **with_tools())
    call.silence(500)
    caller_turn(call, "where is my order")
    call.silence(1900 + 600)  # the filler has been said
    call.feed(ToolAnswered(call.now, LOOKUP.id, '{"ships": "Tuesday"}'))
    assert call.actions(StartLlm)[-1].messages[-1] == ChatMessage(
        Role.TOOL, '{"ships": "Tuesday"}', tool_call_id=LOOKUP.id
    )


def test_words_said_before_a_reprompt_but_transcribed_after_make_it_give_way() -> None:
    """Found by the stateful model: the reprompt started at 8 s of quiet, then Deepgram delivered words
    the caller said at 7.5 s. The caller was there: the reprompt stops and their words are the turn."""
    reprompt = "Are you still there? I can wait if you need a moment."  # still playing at the threshold
    call = Call("Sure.", idle_reprompt_ms=8000, idle_reprompt=reprompt)
    call.silence(8100)
    assert [a.text for a in call.actions(SendTtsText)] == [reprompt]
    call.words("book a table", 7400, 7700)
    call.silence(2000 + play_time("Sure.") + 100)
    assert call.committed_prompts()[-1] == "book a table"
    assert call.engine.history[-1] == ChatMessage(Role.ASSISTANT, "Sure.")
