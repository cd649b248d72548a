"""A provider WebSocket that stays up for the whole call: the part Deepgram's and ElevenLabs' clients share.

It connects (headers, no compression: audio does not compress), pumps an outbox to the socket and
the socket's messages to the subclass, sends a keep-alive whenever nothing went out for a while (a
timer, not a timeout per message), and when the socket drops it reconnects with backoff, letting the
subclass rebuild its outbox for the new socket first (replay audio, re-send unvoiced text). A refusal
that reconnecting cannot fix (HTTP 400/401/402/403/404 at the handshake), or `give_up_after_s` of failed
connections in a row, ends it for good: the role's `ProviderFailed` event says so, naming what to
check. On `close()` the outbox is drained and the subclass's last messages are read before the socket goes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Generic, TypeVar

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.events import ProviderFailed, ProviderRole
from core.logs import logger
from core.providers.roles import Clock, EventSink

Item = TypeVar("Item")
_PERMANENT = (400, 401, 402, 403, 404)  # 402: the plan is out of credit (Deepgram)
_POLICY_VIOLATION = 1008
# A provider that closes every new socket for a policy reason (a key revoked mid-call, a quota used up)
# will not let us back in; ElevenLabs does this with 1008 and an explanation.
_POLICY_CLOSES_IN_A_ROW = 2


class ProviderConnection(Generic[Item]):
    name = "provider"
    role: ProviderRole
    settings_hint = "the provider's key and URL"  # what a person should check when it is refused
    keepalive_message = ""
    permanent_close_reasons: tuple[str, ...] = ()  # a 1008 close whose reason holds one of these is final

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        on_event: EventSink,
        now_ms: Clock,
        *,
        keepalive_s: float,
        give_up_after_s: float = 30.0,
        max_backoff_s: float = 2.0,
        open_timeout_s: float = 5.0,
        max_size: int = 2**22,
        close_timeout_s: float = 2.0,
    ) -> None:
        self._url = url
        self._headers = headers
        self._on_event = on_event
        self._now_ms = now_ms
        # Long enough to ride out a provider's short outage (the words are replayed after it), short
        # enough that a caller is not left talking to a deaf agent for long.
        self._give_up_after_s = give_up_after_s
        self._keepalive_s = keepalive_s
        self._max_backoff_s = max_backoff_s
        self._open_timeout_s = open_timeout_s
        self._max_size = max_size
        self._close_timeout_s = close_timeout_s
        self._outbox: asyncio.Queue[Item | None] = asyncio.Queue()
        self._closing = False
        self._last_send = 0.0
        self.reconnects = 0
        self.connected = asyncio.Event()
        self.failure: str | None = None  # why it stopped for good
        self._heard_from_socket = False  # the current socket delivered what it is for

    # -- what subclasses provide --------------------------------------------------------------------

    def _on_connect(self) -> None:
        """A new socket is open: rebuild the outbox for it (nothing is in flight yet)."""

    def _on_message(self, raw: str | bytes) -> None:
        raise NotImplementedError

    def _on_failed(self, reason: str) -> None:
        """The provider is gone for good: settle whatever waits on it (after `ProviderFailed` is sent)."""

    def _encode(self, item: Item) -> str | bytes:
        assert isinstance(item, str | bytes)
        return item

    # -- the socket ---------------------------------------------------------------------------------

    def _drain_outbox(self) -> list[Item | None]:
        queued = []
        while not self._outbox.empty():
            queued.append(self._outbox.get_nowait())
        return queued

    async def close(self) -> None:
        self._closing = True
        self._outbox.put_nowait(None)

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self.connected.set()  # nobody waits for a connection that will not come
        logger.error(f"{self.name} failed for good; check {self.settings_hint}", extra={"reason": reason})
        self._on_event(ProviderFailed(self._now_ms(), self.role, reason))
        self._on_failed(reason)

    async def run(self) -> None:
        backoff = 0.1
        failures = policy_closes = 0
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        while not self._closing:
            try:
                async with websockets.connect(
                    self._url,
                    additional_headers=self._headers,
                    open_timeout=self._open_timeout_s,
                    max_size=self._max_size,
                    ping_interval=None,
                    compression=None,  # audio does not compress; deflating every frame costs CPU
                ) as socket:
                    self._on_connect()
                    self.connected.set()
                    backoff, failures, failing_since = 0.1, 0, None
                    await self._pump(socket)
                    if self._closing:
                        return
            except InvalidStatus as error:
                status = error.response.status_code
                if status in _PERMANENT:
                    self._fail(f"{self.name} refused the connection with HTTP {status}")
                    return
                logger.warning(f"{self.name} handshake failed; retrying", extra={"status": status})
            except (OSError, ConnectionClosed, TimeoutError) as error:
                if self._closing:
                    return
                close = error.rcvd if isinstance(error, ConnectionClosed) else None
                if close is not None and close.code == _POLICY_VIOLATION:
                    policy_closes = 0 if self._heard_from_socket else policy_closes + 1
                    if any(marker in close.reason for marker in self.permanent_close_reasons):
                        self._fail(f"{self.name} closed the stream: {close.code} {close.reason}")
                        return
                    if policy_closes >= _POLICY_CLOSES_IN_A_ROW:
                        self._fail(f"{self.name} closed {policy_closes} sockets in a row: {close.code} {close.reason}")
                        return
                logger.warning(f"{self.name} socket dropped; reconnecting", extra={"error": repr(error)})
            self.connected.clear()
            failures += 1
            failing_since = loop.time() if failing_since is None else failing_since
            if loop.time() - failing_since >= self._give_up_after_s:
                self._fail(f"{self.name} could not be reached in {failures} attempts over {self._give_up_after_s:g} s")
                return
            self.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)

    async def _pump(self, socket: ClientConnection) -> None:
        reader = asyncio.create_task(self._read(socket))
        writer = asyncio.create_task(self._write(socket))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if writer in done and writer.exception() is None and self._closing:
                with contextlib.suppress(TimeoutError):  # the provider's last results, then its close
                    await asyncio.wait_for(reader, timeout=self._close_timeout_s)
            for task in done:
                task.result()
        finally:
            for task in (reader, writer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task

    async def _write(self, socket: ClientConnection) -> None:
        keepalive = asyncio.create_task(self._keep_alive(socket))
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await self._outbox.get()
                if item is None:
                    return
                await socket.send(self._encode(item))
                self._last_send = loop.time()
        finally:
            keepalive.cancel()

    async def _keep_alive(self, socket: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        self._last_send = loop.time()
        while True:
            await asyncio.sleep(max(0.0, self._last_send + self._keepalive_s - loop.time()))
            if loop.time() - self._last_send >= self._keepalive_s:
                await socket.send(self.keepalive_message)
                self._last_send = loop.time()

    async def _read(self, socket: ClientConnection) -> None:
        self._heard_from_socket = False
        async for raw in socket:
            self._on_message(raw)

    def _socket_works(self) -> None:
        """The current socket delivered what it is for (audio, results): its closes are no pattern."""
        self._heard_from_socket = True
