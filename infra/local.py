"""Local stand-ins for the cloud, as processes: DynamoDB from moto's server (`python -m infra.local`),
and services started as subprocesses that are ready once they print their JSON line (no polling).
Used by the demo, the end-to-end tests and the benchmark.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class Service:
    """A `parley serve` or emulator subprocess, ready once it has printed its JSON line."""

    def __init__(
        self, name: str, command: list[str], environment: dict[str, str], log: Path, cpus: set[int] | None = None
    ) -> None:
        self.name = name
        self._log = log.open("w")
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=self._log, text=True)
        if cpus:  # not preexec_fn: it is unsafe in a process with threads
            os.sched_setaffinity(self.process.pid, cpus)
        assert self.process.stdout is not None
        self._watched: list[tuple[str, threading.Event]] = []
        self.ready = self._first_json_line(self.process.stdout)
        self._drainer = threading.Thread(target=self._drain, args=(self.process.stdout,), daemon=True)
        self._drainer.start()

    def _first_json_line(self, stream: IO[str]) -> dict[str, Any]:
        for line in stream:
            self._log.write(line)
            if line.startswith("{") and ("listening" in line or "_URL" in line):
                parsed: dict[str, Any] = json.loads(line)
                return parsed
        raise RuntimeError(f"{self.name} exited before it was ready; see {self._log.name}")

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            self._log.write(line)
            self._log.flush()
            for text, seen in self._watched:
                if text in line:
                    seen.set()

    def watch_for(self, text: str) -> threading.Event:
        """An event set when a later line of the service's output contains `text`."""
        seen = threading.Event()
        self._watched.append((text, seen))
        return seen

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: the media service drains (no calls are left) and exits 0
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._drainer.join(timeout=5)  # the last lines, before the log file closes
        self._log.close()


@contextlib.contextmanager
def local_dynamodb(cpus: set[int] | None = None) -> Iterator[str]:
    """moto's DynamoDB (and S3) server in a process of its own, so that its work never competes for the
    GIL with the process that uses it (the benchmark's callers measure latency in theirs)."""
    server = Service(
        "moto",
        [sys.executable, "-m", "infra.local"],
        dict(os.environ),
        Path(os.devnull),
        cpus=cpus,
    )
    try:
        yield str(server.ready["listening"])
    finally:
        server.stop()


def local_table(url: str, table: str) -> tuple[Any, dict[str, str]]:
    """A calls table on the local DynamoDB at `url`: a client for it, and the environment that points a
    process (boto3 and our settings) at it."""
    import boto3

    from core.store import create_table

    client = boto3.client(
        "dynamodb", endpoint_url=url, region_name="us-east-1", aws_access_key_id="local", aws_secret_access_key="local"
    )
    create_table(client, table)
    environment = {
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_DYNAMODB": url,
        "CALLS_TABLE": table,
    }
    return client, environment


def _serve_moto(port: int, table: str | None) -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, bound = server.get_host_and_port()
    url = f"http://{host}:{bound}"
    if table:  # for `parley serve` on a laptop (README, "Testing with a real phone")
        local_table(url, table)
    print(json.dumps({"listening": url}), flush=True)
    if table:
        print(f"export AWS_ENDPOINT_URL_DYNAMODB={url} CALLS_TABLE={table}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="moto's DynamoDB and S3 on loopback, until Ctrl-C")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--table", help="create this calls table")
    arguments = parser.parse_args()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # before the server's threads
    _serve_moto(arguments.port, arguments.table)
