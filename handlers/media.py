"""The media service: Twilio Media Streams on `WS /media`, health on `GET /healthz`.

A thin shell: the upgrade's signature, when there is one, is checked against `MEDIA_STREAM_URL` (a bad
one is refused before the socket is accepted, so Twilio sees 403); a missing one is not a refusal by
itself, since Twilio's own sources disagree on whether it signs the upgrade. Every stream is then
admitted by the per-call token in its `start` (checked by `core.call` before any provider is opened),
and `core.call` runs the call. Settings and
shared clients are made once at start-up; `parley serve media` runs it with the draining shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Response, WebSocket, get, websocket

from core import metrics
from core.call import CallRunner, CallServices, call_services
from core.config import ConversationSettings, MediaSettings, ProviderSettings, load_settings, secret_values
from core.logs import logger, redact_secrets
from core.loop_lag import LoopLag
from core.protection import TaskProtection, hold_while_busy
from core.registry import CallRegistry
from core.server import Drain
from core.store import CallStore, dynamodb_client
from core.twilio import validate_upgrade

_POLICY_VIOLATION = 1008
_TRY_AGAIN_LATER = 1013


def make_app(settings: MediaSettings, services: CallServices, registry: CallRegistry, drain: Drain) -> Litestar:
    auth_token = services.stream_token_key or settings.auth_token()

    @websocket("/media")
    async def media(socket: WebSocket[Any, Any, Any]) -> None:
        signature = socket.headers.get("x-twilio-signature")
        signature_settings = socket.headers.get("x-twilio-webhooks-signature-settings")

        def signed() -> bool:  # the cached token, then a fresh read after a rotation (blocking: in a thread)
            return auth_token.accepts(
                lambda token: validate_upgrade(
                    token,
                    settings.media_stream_url,
                    signature,
                    settings_header=signature_settings,
                    shared_key=settings.twilio_webhook_shared_key,
                )
            )

        if signature is not None and not await asyncio.to_thread(signed):
            metrics.count("SignatureRejected")
            logger.warning("refused a media stream whose X-Twilio-Signature does not match MEDIA_STREAM_URL")
            await socket.close(code=_POLICY_VIOLATION)  # before accept: the upgrade gets 403
            return
        if drain.draining:
            await socket.close(code=_TRY_AGAIN_LATER)
            return
        await socket.accept()
        try:
            await registry.run(CallRunner(socket, services))
        finally:
            with contextlib.suppress(Exception):
                await socket.close()

    lag = LoopLag()

    @get("/healthz", sync_to_thread=False)
    def healthz() -> Response[dict[str, Any]]:
        body = {
            "status": "draining" if drain.draining else "ok",
            "active_calls": len(registry),
            "loop_lag_ms": lag.summary_ms(),  # over the last 30 s
        }
        return Response(body, status_code=503 if drain.draining else 200)

    @contextlib.asynccontextmanager
    async def publish_metrics(_: Litestar) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                metrics.count("ActiveCalls", len(registry))
                metrics.milliseconds("EventLoopLag", lag.summary_ms()["p99"])
                metrics.flush()
                await asyncio.sleep(60)

        tasks = [asyncio.create_task(loop()), asyncio.create_task(lag.run())]
        protection = (
            TaskProtection(settings.ecs_agent_uri, settings.task_protection_minutes) if settings.ecs_agent_uri else None
        )
        if protection is not None:
            tasks.append(asyncio.create_task(hold_while_busy(protection, registry.busy, registry.idle)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if protection is not None:
                await protection.aclose()
            metrics.flush()
            await services.aclose()

    # logging_config=None: our JSON logger is the only one; Litestar's default would add a second, plain one.
    return Litestar(
        route_handlers=[media, healthz], lifespan=[publish_metrics], openapi_config=None, logging_config=None
    )


def from_env() -> tuple[Litestar, Drain]:
    settings: MediaSettings
    providers: ProviderSettings
    conversation: ConversationSettings
    settings, providers, conversation = load_settings(
        MediaSettings, ProviderSettings, ConversationSettings, aws_region=True
    )
    redact_secrets([*secret_values(settings), *secret_values(providers)])
    store = CallStore(dynamodb_client(), settings.calls_table, ttl_days=settings.call_ttl_days)
    registry = CallRegistry()
    drain = Drain(settings.drain_seconds, registry.wait_idle, registry.end_all, lambda: len(registry))
    services = call_services(providers, conversation, store, token_key=settings.auth_token())
    return make_app(settings, services, registry, drain), drain


_built: tuple[Litestar, Drain] | None = None


def __getattr__(name: str) -> Any:
    """`app` and `drain` are built from the environment when first asked for (uvicorn, `parley serve`),
    so importing this module for `make_app` needs no settings."""
    global _built
    if name in ("app", "drain"):
        if _built is None:
            _built = from_env()
        return _built[0] if name == "app" else _built[1]
    raise AttributeError(name)
