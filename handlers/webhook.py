"""The Twilio webhook: `app` (Litestar) for uvicorn, `handler` (the same app behind Mangum) for Lambda.

Settings and the DynamoDB client are made once at import, which in Lambda is the INIT phase;
Mangum runs with `lifespan="off"` because it would otherwise run start-up and shut-down on every
invocation. The routes only translate HTTP to `core.webhook` and back.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, Response, get, post
from mangum import Mangum

from core import metrics as metric_sink
from core.config import WebhookSettings, load_settings, secret_values
from core.logs import logger, redact_secrets
from core.store import CallStore, dynamodb_client
from core.webhook import IncomingRequest, WebhookReply, WebhookService


async def _incoming(request: Request[Any, Any, Any]) -> IncomingRequest:
    event = request.scope.get("aws.event") or {}
    return IncomingRequest(
        path=request.url.path,
        query=request.scope.get("query_string", b"").decode("latin-1"),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=await request.body(),
        public_path=event.get("rawPath") if isinstance(event, dict) else None,
    )


def _response(reply: WebhookReply) -> Response[str]:
    return Response(content=reply.body, status_code=reply.status, media_type=reply.media_type)


def make_app(service: WebhookService) -> Litestar:
    @post("/voice", status_code=200)
    async def voice(request: Request[Any, Any, Any]) -> Response[str]:
        return _response(service.voice(await _incoming(request)))

    @post("/status", status_code=200)
    async def status(request: Request[Any, Any, Any]) -> Response[str]:
        return _response(service.status(await _incoming(request)))

    @post("/stream-status", status_code=200)
    async def stream_status(request: Request[Any, Any, Any]) -> Response[str]:
        return _response(service.stream_status(await _incoming(request)))

    @post("/after-stream", status_code=200)
    async def after_stream(request: Request[Any, Any, Any]) -> Response[str]:
        return _response(service.after_stream(await _incoming(request)))

    @post("/after-dial", status_code=200)
    async def after_dial(request: Request[Any, Any, Any]) -> Response[str]:
        return _response(service.after_dial(await _incoming(request)))

    @post("/whisper", status_code=200)
    async def whisper(request: Request[Any, Any, Any]) -> Response[str]:
        return _response(service.whisper(await _incoming(request)))

    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    routes = [voice, status, stream_status, after_stream, after_dial, whisper, healthz]
    # logging_config=None: our JSON logger is the only one; Litestar's default would add a second, plain one.
    return Litestar(route_handlers=routes, openapi_config=None, logging_config=None)


def service_from_env() -> WebhookService:
    settings: WebhookSettings
    (settings,) = load_settings(WebhookSettings, aws_region=True)
    redact_secrets(secret_values(settings))
    store = CallStore(dynamodb_client(), settings.calls_table, ttl_days=settings.call_ttl_days)
    return WebhookService(settings, store)


service = service_from_env()
app = make_app(service)
# Litestar types its ASGI callable more narrowly than Mangum's protocol; they are the same at runtime.
_asgi = Mangum(app, lifespan="off")  # type: ignore[arg-type]


@logger.inject_lambda_context(clear_state=True)
@metric_sink.metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return _asgi(event, context)
