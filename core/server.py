"""The production server: uvicorn on a socket we bind, with a draining shutdown for live calls.

Plain uvicorn drops every WebSocket with 1012 the moment SIGTERM arrives, which on Fargate means
every live call at each deploy. Here SIGTERM starts a drain instead: the health check turns 503 (the
load balancer stops sending new calls), live calls go on until they end or the drain deadline passes,
calls still live then are ended cleanly (their summaries saved), and the process exits 0. A second
signal exits at once. The socket is bound before uvicorn starts, so the address (port 0 allowed) is
known and printed at once, and connections made meanwhile wait in the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn

from core.logs import logger

# The event loop shares the GIL with the books' thread (boto3, a few ms of CPU a write). Python hands the
# GIL back to a waiting thread only every switch interval (5 ms by default), so each time the loop wakes
# while a write runs it can wait that long; at 50 calls, whose turns end in one burst, that was the
# barge-in tail (p95 222 ms in one run of four). At 0.5 ms, seven runs of `parley bench --calls 50` gave
# barge-in p95 164-176 ms, for no measurable CPU; the reply tail is still set by bursts (+3 to +79 ms).
GIL_SWITCH_INTERVAL_S = 0.0005

# uvicorn's sans-I/O WebSocket protocol, named rather than left to "auto": the legacy one is deprecated,
# and the two measured the same per frame within the benchmark's noise.
WS_IMPLEMENTATION = "websockets-sansio"


class Drain:
    """Shared between the app (health, refusing new calls) and the server (when to exit)."""

    def __init__(
        self,
        deadline_s: float,
        wait_idle: Callable[[], Awaitable[None]],
        end_all: Callable[[], None],
        active: Callable[[], int],
    ) -> None:
        self.deadline_s = deadline_s
        self.draining = False
        self._wait_idle = wait_idle
        self._end_all = end_all
        self._active = active

    async def run(self) -> None:
        self.draining = True
        logger.info(
            "draining: no new calls; waiting for live ones",
            extra={"active_calls": self._active(), "deadline_s": self.deadline_s},
        )
        try:
            await asyncio.wait_for(self._wait_idle(), timeout=self.deadline_s)
        except TimeoutError:
            logger.warning(
                "drain deadline reached; ending the calls still live", extra={"active_calls": self._active()}
            )
            self._end_all()
            await self._wait_idle()
        logger.info("drained; exiting")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain | None = None) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is None or self._drain_task is not None or self._loop is None:
            super().handle_exit(sig, frame)  # nothing to drain, or a second signal: go now
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        assert self._drain is not None
        self._drain_task = asyncio.ensure_future(self._drain_then_exit(self._drain))

    async def _drain_then_exit(self, drain: Drain) -> None:
        await drain.run()
        self.should_exit = True


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside a program that owns the event loop and its signals (tests, emulators, the demo)."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


class RunningServer:
    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], url: str) -> None:
        self.server, self._task, self.url = server, task, url

    async def stop(self) -> None:
        self.server.should_exit = True
        await self._task


async def start_in_loop(app: Any, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Serve `app` from the running loop; it accepts connections as soon as this returns."""
    listener = bind(host, port)
    config = uvicorn.Config(
        app,
        lifespan="auto",
        log_level="warning",
        access_log=False,
        ws=WS_IMPLEMENTATION,  # as in production, so the tests run what runs there
        ws_per_message_deflate=False,
        ws_max_size=1 << 20,
        timeout_graceful_shutdown=2,
    )
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    return RunningServer(server, task, f"http://{host}:{listener.getsockname()[1]}")


def bind(host: str, port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    listener.setblocking(False)
    return listener


def serve(app: Any, host: str, port: int, drain: Drain | None = None) -> None:
    """Run `app` until SIGTERM/SIGINT (draining first when `drain` is given)."""
    # Logs and EMF metrics go to stdout, which on ECS is a pipe, so Python buffers it in blocks: an idle
    # task's `ActiveCalls` lines (the scaling metric) sat there for minutes and came out at SIGTERM.
    # Line buffering hands each line over as it is written.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    listener = bind(host, port)
    bound_host, bound_port = listener.getsockname()[:2]
    print(json.dumps({"listening": f"http://{bound_host}:{bound_port}"}), flush=True, file=sys.stdout)
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level="warning",
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips="*",
        ws_max_size=1 << 20,
        timeout_graceful_shutdown=5,
        ws_per_message_deflate=False,  # µ-law frames do not compress; deflate would only cost CPU
        ws=WS_IMPLEMENTATION,
    )
    server = DrainingServer(config, drain)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    _calm_the_collector()
    with asyncio.Runner(loop_factory=_fast_loop()) as runner:
        runner.run(server.serve(sockets=[listener]))


def _calm_the_collector() -> None:
    """Python's cyclic GC stopped the media service's loop for 120-206 ms once per 50-call bench round
    (the loop-lag monitor's max; 21-45 ms with the GC off): a full collection walks every object the
    process holds, the imported libraries' included. Those are moved out of its reach (`gc.freeze`),
    and the young generation is collected less often; cycles are still collected."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _fast_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: its loop and transports cost a fraction of asyncio's per message,
    which with 50 frames a second per call is most of a media service's CPU. PARLEY_LOOP=asyncio
    turns it off."""
    if os.environ.get("PARLEY_LOOP", "uvloop") != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
