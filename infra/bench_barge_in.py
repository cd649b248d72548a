"""`parley bench --barge-in`: the labelled corpus over the agent's reply, through the real media service.

Each call says "book a table"; 1.5 s into the agent's long answer, the caller plays one corpus item
(`infra/corpus.py`), or has the agent's echo or line noise on the line all call. Every item runs in
`CORPUS_ROUNDS` rounds; a round's calls run at once. What the agent did is read at the caller (clears,
when its audio came back) and from the call's item (confirmed interruptions, false barge-ins, turns):

* a non-interruption that ended the reply for good is a false barge-in (target <= 2 %); one that
  stopped it and resumed is counted with its delay, sound onset to audio again (target <=
  RESUME_WINDOW_MS + 100 ms); a backchannel's words in any later turn is a leak (target 0);
* an interruption that never stopped the reply and became a turn is missed (target 0); its latency is
  sound onset to `clear` (target <= 180 ms at p95).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from core.config import ConversationSettings, normalize_word
from infra.bench import MEDIA_STREAM_URL, TOKEN, MediaStack, machine, media_stack, percentile
from infra.caller import CallReport, HangUp, Pause, Say, SimulatedCaller, Step, WaitForAgent
from infra.corpus import ITEMS, Item, Kind
from infra.emulators.scenario import CORPUS_ROUNDS, corpus_call_sid

AFTER_AGENT_MS = 1500


async def _round(stack: MediaStack, round_number: int) -> list[tuple[Item, CallReport]]:
    async def one(index: int, item: Item) -> tuple[Item, CallReport]:
        call_sid = corpus_call_sid(round_number, index)
        script: list[Step] = [Pause(300 + 20 * index), Say("book_table")]
        if item.voice:
            script.append(Say(item.voice, after_agent_ms=AFTER_AGENT_MS))
        script += [WaitForAgent(quiet_ms=800), HangUp()]
        caller = SimulatedCaller(
            stack.media_url,
            TOKEN,
            script,
            signed_url=MEDIA_STREAM_URL,
            call_sid=call_sid,
            stream_sid="MZ" + call_sid[2:],
            echo=item.echo,
            noise_dbfs=item.noise_dbfs,
        )
        return item, await caller.run()

    return list(await asyncio.gather(*(one(index, item) for index, item in enumerate(ITEMS))))


def _outcome(stack: MediaStack, item: Item, report: CallReport) -> dict[str, Any]:
    record = stack.store.get_call(report.call_sid) or {}
    onset = next((start for voice, start, _ in report.speech if voice == item.voice), None)
    if onset is None and report.clear_times_ms:  # the line itself: the detector's onset, 150 ms before
        onset = report.clear_times_ms[0] - ConversationSettings.from_env({}).barge_in_min_speech_ms
    caller_turns = [turn["text"] for turn in record.get("turns", []) if turn["role"] == "caller"]
    item_words = {normalize_word(word) for word in item.transcript.split()}
    later_words = {normalize_word(word) for text in caller_turns[1:] for word in text.split()}
    return {
        "item": item.name,
        "kind": item.kind.value,
        "stopped": report.clears_received > 0,
        "confirmed": int(record.get("interruptions", 0)) > 0,
        "resumed": bool(report.resumed_at_ms) and int(record.get("false_barge_ins", 0)) > 0,
        "resume_delay_ms": report.resumed_at_ms[0] - onset if report.resumed_at_ms and onset is not None else None,
        "barge_in_ms": report.barge_in_latencies_ms[0] if report.barge_in_latencies_ms else None,
        "leaked": bool(item_words) and item.kind is Kind.BACKCHANNEL and bool(item_words & later_words),
        "caller_turns": caller_turns,
    }


def summarize(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    noise = [o for o in outcomes if o["kind"] != Kind.INTERRUPTION.value]
    real = [o for o in outcomes if o["kind"] == Kind.INTERRUPTION.value]
    resumes = [o["resume_delay_ms"] for o in noise if o["resumed"] and o["resume_delay_ms"] is not None]
    latencies = [o["barge_in_ms"] for o in real if o["barge_in_ms"] is not None]
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:
        row = by_kind.setdefault(o["kind"], {"calls": 0, "no stop": 0, "resumed": 0, "ended for good": 0})
        row["calls"] += 1
        row["ended for good" if o["confirmed"] else "resumed" if o["resumed"] else "no stop"] += 1
    return {
        "non_interruptions": len(noise),
        "false_barge_ins_ended_reply": sum(1 for o in noise if o["confirmed"]),
        "false_barge_in_rate": sum(1 for o in noise if o["confirmed"]) / max(1, len(noise)),
        "stopped_then_resumed": len(resumes),
        "resume_delay_ms": {
            "p50": percentile(resumes, 50),
            "p95": percentile(resumes, 95),
            "max": max(resumes, default=float("nan")),
        },
        "backchannels_leaked": sum(1 for o in noise if o["leaked"]),
        "interruptions": len(real),
        "missed_interruptions": sum(1 for o in real if not o["confirmed"]),
        "barge_in_ms": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "n": len(latencies)},
        "by_kind": by_kind,
    }


def run_corpus(out: Path) -> dict[str, Any]:
    outcomes: list[dict[str, Any]] = []
    with media_stack(out, "barge-in") as stack:
        for round_number in range(CORPUS_ROUNDS):
            for item, report in asyncio.run(_round(stack, round_number)):
                outcomes.append(_outcome(stack, item, report))
    summary = summarize(outcomes)
    (out / "barge-in.json").write_text(
        json.dumps({"machine": machine(), "summary": summary, "calls": outcomes}, indent=2)
    )
    print(f"barge-in corpus: {len(outcomes)} calls ({CORPUS_ROUNDS} rounds of {len(ITEMS)} items), {machine()}")
    print(
        f"  false barge-ins that ended the reply: {summary['false_barge_ins_ended_reply']}"
        f"/{summary['non_interruptions']} ({summary['false_barge_in_rate']:.1%});"
        f" stopped then resumed: {summary['stopped_then_resumed']},"
        f" resume delay p50 {summary['resume_delay_ms']['p50']:.0f} p95 {summary['resume_delay_ms']['p95']:.0f} ms"
    )
    print(
        f"  missed interruptions: {summary['missed_interruptions']}/{summary['interruptions']};"
        f" barge-in p50 {summary['barge_in_ms']['p50']:.0f} p95 {summary['barge_in_ms']['p95']:.0f} ms;"
        f" backchannels leaked into a turn: {summary['backchannels_leaked']}"
    )
    for kind, row in summary["by_kind"].items():
        print(f"  {kind:<13} " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return summary
