"""The production server's process-level promises: what it writes reaches a pipe at once."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

from tests.e2e.conftest import MEDIA_STREAM_URL, TOKEN


def test_an_idle_media_services_metric_reaches_a_pipe_within_a_second() -> None:
    """On ECS stdout is a pipe, which Python buffers in blocks unless told otherwise."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    environment.update(
        {
            "TWILIO_AUTH_TOKEN": TOKEN,
            "MEDIA_STREAM_URL": MEDIA_STREAM_URL,
            "CALLS_TABLE": "calls",
            "AWS_DEFAULT_REGION": "us-east-1",
            "DEEPGRAM_API_KEY": "dg-test",
            "OPENAI_API_KEY": "sk-test",
            "ELEVENLABS_API_KEY": "el-test",
        }
    )
    command = [sys.executable, "-m", "handlers.cli", "serve", "media", "--host", "127.0.0.1", "--port", "0"]
    server = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue[tuple[float, str]] = queue.Queue()
    assert server.stdout is not None
    stdout = server.stdout
    threading.Thread(target=lambda: [lines.put((time.time(), line)) for line in stdout], daemon=True).start()
    try:
        while True:  # the first ActiveCalls line is written as the service starts, then each minute
            read_at, line = lines.get(timeout=30)  # a buffered line would come only at exit
            if '"ActiveCalls"' in line:
                break
        written_at = json.loads(line)["_aws"]["Timestamp"] / 1000
        assert read_at - written_at < 1.0, f"the metric line took {read_at - written_at:.1f} s to reach the pipe"
    finally:
        server.terminate()
        server.wait(timeout=15)
