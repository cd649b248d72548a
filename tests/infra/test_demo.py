"""`parley demo` runs a whole call through real processes and reports it."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import pytest

from infra.demo import run_demo


def test_the_demo_call(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(tmp_path) == 0
    printed = capsys.readouterr().out
    assert "Caller: Hi, I would like to book a table for two. Tomorrow at seven, please." in printed  # one turn
    assert "[interrupted]" in printed and "barge-in: caller speech onset -> clear received" in printed
    assert '[tool check_availability({"people": 2' in printed  # the agent used the team's tool
    assert "[the agent ended the call: completed_by_agent]" in printed
    assert "POST /after-stream -> 200" in printed and printed.index("Hangup") > printed.index("/after-stream")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["twilio"]["ended_by"] == "hangup" and report["item"]["outcome"] == "completed_by_agent"
    assert report["item"]["turn_count"] == 3 and report["item"]["interruptions"] == 1
    assert len(report["report"]["reply_latencies_ms"]) == 3 and len(report["report"]["barge_in_latencies_ms"]) == 1
    with wave.open(str(tmp_path / "call.wav")) as recording:
        assert recording.getnchannels() == 2 and recording.getframerate() == 8000
        assert recording.getnframes() / 8000 > 15
